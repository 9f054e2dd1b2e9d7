"""`multifair_adam`: modality balance on each encoder's STEP SIZE, plus an optional
group-AUC-gap loss on the fused prediction (spec method.md section 7).

Why step sizes: AdamW divides every gradient by its running RMS, so a constant multiplier on an
encoder's gradient (MultiFair's B_i, f_i) is undone (section 6). A factor on that encoder's
learning rate is not. Per step, with A_i the batch ROC-AUC of auxiliary head C_i:

    Abar_i <- 0.95 Abar_i + 0.05 A_i                     (start 0.5; one-class batch: A_i(t-1))
    c_i     = M * softmax_i(-(Abar_i - mean_j Abar_j) / T)  (sum_i c_i = M; lagging c_i > 1)
    lr_i    = scheduled_lr * c_i                         (the trainer, after the scheduler)

Guards against the CNN failure of section 7 (a lagging encoder that cannot learn while the
useful one is throttled):
- floor: no factor below `floor` (default 0.5); the mass taken from the lagging modalities
  to lift a floored one keeps sum_i c_i = M (water-filling, see `balance_factors`);
- gate (`guard`): the factors are 1 + gate * (c - 1), the gate ramping from 0 to 1 with a
  z-score of the lagging modality measured in units of the noise that batch sampling alone
  puts on Abar. Default "level": z = (Abar_lag - 0.5) / noise - balance while the lagging
  head is demonstrably above chance; a modality with no learnable signal keeps z ~ N(0, 1)
  and the method is plain ERM up to rare, small excursions. "trend": z = (Abar_lag -
  slowEMA(Abar_lag)) / noise - balance only while it is still rising. In 12-epoch runs of a
  few hundred steps the trend gate never opened (a slowly learnt modality rises by less than
  the noise over the slow window), so the method was ERM there; it is kept for long runs.
  The level guard opens the gate for the first `trial` fraction of the run (default 0.25)
  regardless: in a scenario with real modality imbalance (synthetic table, B = sign triples,
  30 epochs) joint training held B's head at chance (0.49), where the level guard alone never
  opened; balanced from the start, B's level rose to 0.78 (docs/results.md).

Levels from held-out data (`levels: validation`): the levels above are AUCs on TRAINING
batches, and an encoder that memorises its training samples looks ahead there while it
generalises worse. With image encoders on 500 subjects (docs/results.md) the OCT encoder did
exactly that: its training-batch level led the fundus', so the method throttled the modality
that lagged on held-out data. With `levels: validation` the levels are instead each auxiliary
head's AUC on the validation split, measured after every epoch (`on_validation`; factors are
then constant over the next epoch, 1 before the first validation). The guard becomes: balance
while the lagging modality is still improving on validation (not more than `val_tolerance`
below its best so far: an overfitting modality stops being pushed), and - after the `trial`
fraction of the run - only while it is above chance by `level_z_on` standard errors of a
no-signal AUC on that split (sqrt((n+ + n- + 1) / (12 n+ n-))).

Group weights from held-out data (`group_weights: validation`, off by default): after each
epoch, the gap of each group's validation AUC of the FUSED prediction to the overall one (both
over the samples of known group),
shrunk towards 0 by `group_z` standard errors of the group's AUC (a no-signal AUC's on the
group's validation samples: small groups have noisy AUCs, and a gap within noise moves no
weight) and smoothed over epochs (gap_g <- m gap_g + (1 - m) shrunk gap, the first validation
sets it), weights each sample's task loss:

    w_g = exp(gap_g / T_g) / sum_h pi_h exp(gap_h / T_g)   (pi: the measured groups' shares of
                                                          the split: their mean weight is 1)

A group the fused model serves worse gets more weight; where no group lags (gaps ~ 0) the
weights are ~1 and training is plain. Unlike inverse-frequency reweighting it follows the
measured gap, not the group's size, and unlike GroupDRO's training losses (which go to 0 for
every group on memorised data) the gap comes from data the model does not fit. Unlike
MultiFair's f_i, a relative weight between the samples of a batch is not undone by AdamW's
normalisation. Samples with an unknown group keep weight 1, and so does a group never measured
(absent from the split, or never with both classes there); a measured group with one class in
a later validation keeps its last gap. Weights are 1 before the first validation. The
auxiliary heads' CE and the unimodal loss stay unweighted.

Multi-class labels (K > 2, docs/training.md "Multi-class labels"): every AUC above becomes the
macro one-vs-rest AUC, mean over classes k of the AUC of class k's score against the rest - the
metric the evaluation reports. In-batch levels A_i average over the classes with both sides in
the batch, each class scored by its one-vs-rest log-odds z_k - logsumexp_{j != k} z_j (the
ranking of its softmax probability); validation levels and group gaps use
`multifair.metrics.roc_auc` on the softmax scores (N, K) (a group or split missing a class has
no macro AUC and is treated like a one-class one above), and the no-signal standard error
becomes sqrt(sum_k v_k / (K (K - 1))), v_k = (n_k + r_k + 1) / (12 n_k r_k) the binary one of
class k against the rest r_k: the binary formula at K = 2, within 10% of the simulated spread of
a no-signal macro AUC for K = 3..5. The fused gap loss averages the pairwise surrogate over
classes likewise, on the one-vs-rest log-odds. Levels stay on the AUC scale (chance 0.5), so
temperature, floor and guards keep their meaning. `unimodal_weight` is softmax CE for any K.
K = 2 runs the binary code unchanged (tests/methods/test_multifair_adam_multiclass.py holds
fingerprints of binary runs recorded before). `group_fusion` stacking is binary-only and
refuses K > 2 when the method is built.

Group level, fused loss (off by default; preset "fair"): L_gap = mean_g |S_g - mean_g' S_g'| over groups
with both classes in the batch, S_g = mean over (positive, negative) pairs of group g of
sigmoid((z_p - z_n) / T_s) on fused logit margins. It sends no gradient to the auxiliary
heads (they read detached features). No gradient multipliers, no rho, no L_gm, no f_i.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
    aux_loss,
    masked_ce,
    presence,
    presence_matrix,
)
from multifair.methods.estimators import require_model, unimodal_logits
from multifair.methods.group_fusion import (
    GroupFusionParams,
    GroupStacking,
    GroupStackingHook,
    SharedStacking,
    build_stacking,
    check_fusion_classes,
)
from multifair.methods.signals import (
    binary_auc,
    gather_batch,
    group_masks,
    group_weighted_ce,
    macro_ovr_auc,
    macro_pairwise_surrogate_auc,
    ovr_margins,
    pairwise_surrogate_auc,
    surrogate_scores,
    unwrap_model,
)

# Preset -> (temperature T, gap_weight). "fair" adds the fused gap loss at weight 1 (weight 3
# collapsed AUC in the prototype) and keeps the default T; combine it with temperature=0.1.
PRESETS: dict[str, dict[str, float]] = {
    "default": {"temperature": 0.2, "gap_weight": 0.0},
    "strong": {"temperature": 0.1, "gap_weight": 0.0},
    "fair": {"temperature": 0.2, "gap_weight": 1.0},
}


class MultiFairAdamParams(GroupFusionParams):
    """Hyper-parameters of `multifair_adam`. `temperature` and `gap_weight` left unset take the
    values of `preset`; an explicit value wins."""

    preset: Literal["default", "strong", "fair"] = "default"
    temperature: float | None = Field(None, gt=0)  # T of the level softmax (inf = all factors 1)
    gap_weight: float | None = Field(None, ge=0)  # weight of the fused group-AUC-gap loss
    gap_temperature: float = Field(1.0, gt=0)  # T_s of the pairwise sigmoid on fused margins
    floor: float = Field(0.5, ge=0, le=1)  # smallest factor any encoder gets
    level_momentum: float = Field(0.95, ge=0, lt=1)  # Abar EMA (and its noise estimate)
    trend_momentum: float = Field(0.995, ge=0, lt=1)  # slow EMA of Abar: trend window ~ 1/(1-x)
    # When to balance (spec section 7's guard against a lagging modality with nothing to learn):
    #   "level": while the lagging modality's smoothed aux AUC is above chance by more than
    #            batch noise explains (z-score of Abar - 0.5) - a noise modality never opens it;
    #   "trend": only while its smoothed AUC is still rising (z-score of Abar - slow EMA); its
    #            window (~1/(1 - trend_momentum) steps) must be short next to the run;
    #   "off" (or false): balance always (the section-7 prototype).
    guard: Literal["level", "trend", "off"] = "level"
    # Optimistic start for the level guard: during the first `trial` fraction of the run the
    # gate is open whatever the level says. A learnable modality that joint training
    # suppresses sits at chance exactly like a pure-noise one until it is given steps; given
    # them, its level rises and keeps the gate open, a noise modality's does not.
    trial: float = Field(0.25, ge=0, le=1)
    # Where the levels come from: auxiliary AUCs on training batches (smoothed per step), or on
    # the validation split after each epoch (see the module docstring).
    levels: Literal["train", "validation"] = "train"
    val_tolerance: float = Field(0.02, ge=0)  # "still improving": within this of its best AUC
    # Weight of each modality's own CE through its auxiliary head on the ATTACHED feature, so
    # that it trains the encoder (the unimodal loss of MMPareto / uni-modal ensembles). 0: the
    # auxiliary heads read detached features, as in erm. With temperature .inf (all factors 1)
    # this is plain joint training plus unimodal losses: the control for the lr balance.
    unimodal_weight: float = Field(0.0, ge=0)
    # Per-sample task-loss weights from each group's validation-AUC gap (module docstring).
    group_weights: Literal["off", "validation"] = "off"
    group_temperature: float = Field(0.1, gt=0)  # T_g: a gap of T_g multiplies a weight by e
    group_momentum: float = Field(0.5, ge=0, lt=1)  # smoothing of the gaps over epochs
    group_z: float = Field(1.0, ge=0)  # gaps count only beyond this many standard errors
    # group_fusion, stacking_prior, stacking_data: `GroupFusionParams` (methods.group_fusion)
    level_z_on: float = 2.0  # level gate opens above this z-score of (Abar_lag - 0.5) ...
    level_z_full: float = 4.0  # ... and is fully open from this one
    trend_z_on: float = 1.0  # trend gate opens above this trend z-score of the lagging modality
    trend_z_full: float = 3.0  # ... and is fully open from this one

    @field_validator("guard", mode="before")
    @classmethod
    def _guard_bool(cls, value: Any) -> Any:
        # booleans are accepted: true = the default guard ("level"), false = "off"
        if isinstance(value, bool):
            return "level" if value else "off"
        return value

    @model_validator(mode="after")
    def _resolve(self) -> MultiFairAdamParams:
        preset = PRESETS[self.preset]
        if self.temperature is None:
            self.temperature = preset["temperature"]
        if self.gap_weight is None:
            self.gap_weight = preset["gap_weight"]
        if self.trend_z_full <= self.trend_z_on:
            raise ValueError(
                f"trend_z_full ({self.trend_z_full}) must exceed trend_z_on ({self.trend_z_on})"
            )
        if self.level_z_full <= self.level_z_on:
            raise ValueError(
                f"level_z_full ({self.level_z_full}) must exceed level_z_on ({self.level_z_on})"
            )
        return self


def balance_factors(levels: Tensor, temperature: float, floor: float) -> Tensor:
    """c_i = M softmax_i(-(Abar_i - mean Abar) / T), then no c_i below `floor`.

    Floored entries are pinned at `floor` and the rest share M - floor * (#pinned) in
    proportion to their softmax weights, repeated until no entry falls below the floor (at
    most M rounds, fixed count: no host sync). So sum c_i = M always: the lagging encoders
    give back exactly what lifting a throttled one costs, and the total step budget equals
    plain training's. Works in the dtype of `levels` (float64 in tests).
    """
    m = levels.shape[-1]
    weights = torch.softmax(-(levels - levels.mean()) / temperature, dim=-1)  # (M,) sums to 1
    factors = m * weights
    if floor <= 0:
        return factors
    pinned = torch.zeros_like(factors, dtype=torch.bool)
    for _ in range(m):
        pinned = pinned | (factors < floor)
        free_mass = m - floor * pinned.to(weights.dtype).sum()
        free_weight = torch.where(pinned, 0.0, weights).sum().clamp_min(1e-30)
        # exactly m * weights when nothing is pinned (bit-for-bit ERM at equal levels)
        scale = torch.where(pinned.any(), free_mass / (m * free_weight), 1.0)
        factors = torch.where(pinned, torch.full_like(factors, floor), m * weights * scale)
    return factors


def no_signal_auc_se(class_counts: np.ndarray) -> float:
    """Standard error of a no-signal (macro one-vs-rest) AUC on samples with these class
    counts (every count > 0): sqrt(sum_k v_k / (K (K - 1))), v_k = (n_k + r_k + 1) /
    (12 n_k r_k) for class k against the rest r_k. For K = 2 the binary
    sqrt((n+ + n- + 1) / (12 n+ n-)); for K > 2 the class AUCs of a no-signal score are
    correlated, and this matched the simulated spread within 10% (K = 3..5, softmax scores)."""
    counts = np.asarray(class_counts, dtype=float)
    k, rest = len(counts), counts.sum() - counts
    per_class = (counts + rest + 1) / (12 * counts * rest)
    return math.sqrt(float(per_class.sum()) / (k * (k - 1)))


def group_gap_loss(
    fused_logits: Tensor, labels: Tensor, groups: Tensor, n_groups: int, temperature: float
) -> Tensor:
    """Differentiable group-AUC gap of the fused prediction: mean over the groups present with
    both classes of |S_g - mean S|, S_g = mean over (p, n) pairs of group g of
    sigmoid((z_p - z_n) / T_s) on fused logit margins. 0 when fewer than two groups qualify.
    K > 2: S_g is the mean over the classes with both sides in group g of that surrogate for
    class k against the rest, on the one-vs-rest log-odds (`ovr_margins`)."""
    masks = group_masks(groups, n_groups)  # (B, G); unknown (-1) in no group
    if fused_logits.shape[-1] == 2:
        margin = surrogate_scores(fused_logits, "sigmoid")  # (B,) z_1 - z_0
        surrogate, present = pairwise_surrogate_auc(
            margin, labels, masks, form="sigmoid", temperature=temperature
        )  # (G,), (G,)
    else:
        surrogate, present = macro_pairwise_surrogate_auc(
            ovr_margins(fused_logits).T, labels, masks, form="sigmoid", temperature=temperature
        )  # (G,), (G,) macro over classes
    weight = present.float()
    n_present = weight.sum().clamp_min(1.0)
    mean = (surrogate * weight).sum() / n_present
    return ((surrogate - mean).abs() * weight).sum() / n_present


@METHODS.register("multifair_adam")
class MultiFairAdam(GroupStackingHook, Method):
    """Level-based modality balance on per-encoder learning rates (+ optional fused gap loss)."""

    Params = MultiFairAdamParams
    acts_on_step_size = True
    # levels, validation levels and unimodal losses use only the samples that have the modality
    supports_missing = True

    @classmethod
    def check_classes(cls, params: MethodParams, n_classes: int) -> None:
        # levels, group weights, the gap loss and the unimodal loss take K classes (macro
        # one-vs-rest); the post-hoc stacking recombines binary margins only
        check_fusion_classes("multifair_adam", params, n_classes)

    def __init__(self, params: MultiFairAdamParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        self.params: MultiFairAdamParams = params
        m = len(self.modalities)
        self.register_buffer("level", torch.full((m,), 0.5))  # Abar_i
        self.register_buffer("level_slow", torch.full((m,), 0.5))  # slow EMA of Abar_i
        # EMA of (A_i - Abar_i)^2: batch-AUC noise, ~0.1^2 for 32-sample batches at start
        self.register_buffer("auc_var", torch.full((m,), 0.01))
        self.register_buffer("last_auc", torch.full((m,), 0.5))  # A_i(t-1), for one-class batches
        # levels: validation - the last validation AUC of each aux head, its best so far, the
        # std of a no-signal AUC on that split, and whether a validation has happened yet
        self.register_buffer("val_level", torch.full((m,), 0.5))
        self.register_buffer("val_best", torch.zeros(m))  # the first validation sets it
        self.register_buffer("val_noise", torch.ones(()))
        self.register_buffer("val_seen", torch.zeros(()))
        # group_weights: validation - smoothed gap of each group's validation AUC to the
        # overall one, and the per-sample task-loss weight it gives each group
        self.register_buffer("group_gap", torch.zeros(n_groups))
        self.register_buffer("group_weight", torch.ones(n_groups))
        self.register_buffer("group_measured", torch.zeros(n_groups, dtype=torch.bool))
        # group_fusion: stacking - created in setup, fitted by on_selected; the prediction then
        # depends on the group the sample is said to belong to
        # (blind_stacking: one recombination for everyone, the group read by the fit only)
        self.group_stack: GroupStacking | SharedStacking | None = None
        self.uses_attribute_at_test = params.group_fusion == "stacking"
        self.fits_after_selection = params.group_fusion != "off"

    def setup(self, model: nn.Module) -> None:
        if self.params.group_fusion != "off":
            self.group_stack = build_stacking(
                unwrap_model(model), self.n_groups, "multifair_adam", self.params.group_fusion
            )

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> ModelOutput:  # type: ignore[override]
        out = model(batch)
        if self.params.group_fusion == "off" or self.training:
            return out  # training fits the shared model; the stacking is post hoc
        if self.group_stack is None:
            raise RuntimeError(
                "multifair_adam group_fusion: call method.setup(model) first (the trainer does)"
            )
        # blind_stacking never reads the attribute: the batch need not carry one
        groups = batch["group"] if self.params.group_fusion == "stacking" else None
        # missing modalities: an absent modality's head margin enters the stacking as 0
        out.logits = self.group_stack(out.logits, out.aux_logits, groups, batch.get("present"))
        return out

    # State added after the first release of this method: a checkpoint written before it lacks
    # these buffers, and they load as their initial values ("no validation seen yet").
    _LATER_STATE = (
        *("val_level", "val_best", "val_noise", "val_seen"),
        *("group_gap", "group_weight", "group_measured"),
    )

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in self._LATER_STATE:
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        state_dict.pop(prefix + "group_seen", None)  # written by a development version
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def observe(
        self, auc: Tensor, has_both: Tensor, update: bool = True, in_trial: bool = False
    ) -> dict[str, Tensor]:
        """Advance the state with this step's batch AUCs (M,) and return the per-modality
        factors and signals. The factor logic alone, so tests can drive it with sequences."""
        p = self.params
        auc = torch.where(has_both, auc.to(self.level.dtype), self.last_auc)  # (M,)
        level = p.level_momentum * self.level + (1 - p.level_momentum) * auc
        level_slow = p.trend_momentum * self.level_slow + (1 - p.trend_momentum) * level
        auc_var = p.level_momentum * self.auc_var + (1 - p.level_momentum) * (auc - self.level) ** 2
        if update:
            self.last_auc.copy_(auc)
            self.level.copy_(level)
            self.level_slow.copy_(level_slow)
            self.auc_var.copy_(auc_var)

        if p.levels == "validation":
            return self._validation_signals(auc, level, in_trial)
        raw = balance_factors(level, p.temperature, p.floor)  # (M,)
        # Trend: rise of Abar over the slow window, in units of the std that batch noise alone
        # gives Abar - slowEMA(Abar) (~ std(Abar) = std(A) sqrt((1-a)/(1+a)) for a slow window).
        trend = level - level_slow
        noise = (auc_var * (1 - p.level_momentum) / (1 + p.level_momentum)).sqrt().clamp_min(1e-4)
        trend_z = trend / noise
        # The lagging modalities are those the balance speeds up; weight their z by the boost
        # (for M = 2: the lagging modality's own z). No boost anywhere -> gate 0, factors 1.
        boost = (raw - 1).clamp_min(0)
        # Level: how far Abar sits above chance, in units of the same noise std.
        level_z = (level - 0.5) / noise
        if p.guard == "off":
            gate = torch.ones((), dtype=level.dtype, device=level.device)
            factors = raw
        else:
            z, z_on, z_full = (
                (trend_z, p.trend_z_on, p.trend_z_full)
                if p.guard == "trend"
                else (level_z, p.level_z_on, p.level_z_full)
            )
            lag_z = (boost * z).sum() / boost.sum().clamp_min(1e-12)
            gate = ((lag_z - z_on) / (z_full - z_on)).clamp(0.0, 1.0)
            if in_trial and p.guard == "level":  # a Python bool (step count): no host sync
                gate = torch.ones_like(gate)
            factors = 1 + gate * (raw - 1)  # gate 0: exactly 1 (plain training)

        signals: dict[str, Tensor] = {"active": gate.detach()}
        for i, name in enumerate(self.modalities):
            signals[f"aux_auc/{name}"] = auc[i].detach()
            signals[f"level/{name}"] = level[i].detach()
            signals[f"trend/{name}"] = trend_z[i].detach()
            signals[f"lr_factor/{name}"] = factors[i].detach()
        return signals

    def _validation_signals(self, auc: Tensor, level: Tensor, in_trial: bool) -> dict[str, Tensor]:
        """Factors from the last validation's aux AUCs (`levels: validation`), gated by the
        lagging modality still improving there and, after the trial window, above chance."""
        p = self.params
        raw = balance_factors(self.val_level, p.temperature, p.floor)  # (M,)
        boost = (raw - 1).clamp_min(0)  # the lagging modalities, weighted by their boost
        weight = boost / boost.sum().clamp_min(1e-12)
        drop = (weight * (self.val_best - self.val_level)).sum()  # below its best so far
        lag_z = (weight * (self.val_level - 0.5)).sum() / self.val_noise
        gate = self.val_seen * (drop <= p.val_tolerance).to(raw.dtype)
        if not in_trial:  # a Python bool (step count): no host sync
            gate = gate * (lag_z >= p.level_z_on).to(raw.dtype)
        factors = 1 + gate * (raw - 1)  # gate 0: exactly 1 (plain training)
        signals: dict[str, Tensor] = {"active": gate.detach()}
        for i, name in enumerate(self.modalities):
            signals[f"aux_auc/{name}"] = auc[i].detach()
            signals[f"level/{name}"] = self.val_level[i].clone()
            signals[f"train_level/{name}"] = level[i].detach()
            signals[f"lr_factor/{name}"] = factors[i].detach()
        return signals

    def on_validation(self, preds: Any, groups: np.ndarray | None = None) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.params.levels == "validation":
            stats.update(self._update_val_levels(preds))
        if self.params.group_weights == "validation":
            stats.update(self._update_group_weights(preds, groups))
        return stats

    def _update_group_weights(self, preds: Any, groups: np.ndarray | None) -> dict[str, Any]:
        """gap_g <- m gap_g + (1 - m) shrunk(AUC - AUC_g) on the fused validation scores of the
        samples with a known group (macro one-vs-rest AUCs for scores (N, K)); then the weights
        exp(gap_g / T_g), normalised to a mean of 1 over the measured groups' samples. A group
        never measured (absent from the split, or never with both classes - every class for
        K > 2) keeps weight 1, like a sample of unknown group."""
        from multifair.metrics import roc_auc

        if groups is None:
            raise ValueError("group_weights: validation needs the validation split's groups")
        labels, score = np.asarray(preds.label), np.asarray(preds.score)
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(
                f"group_weights: {groups.shape[0]} group codes for {labels.shape[0]} predictions"
            )
        known = (groups >= 0) & (groups < self.n_groups)
        overall = roc_auc(labels[known], score[known]) if known.any() else math.nan
        if not math.isfinite(overall):
            return {"group_weights": "skipped: no known-group samples of both classes"}
        m = self.params.group_momentum
        gap = self.group_gap.detach().cpu().double().numpy().copy()
        measured = self.group_measured.detach().cpu().numpy().astype(bool)
        counts = np.zeros(self.n_groups)
        for g in range(self.n_groups):
            member = groups == g
            counts[g] = member.sum()
            auc_g = roc_auc(labels[member], score[member]) if member.any() else math.nan
            if not math.isfinite(auc_g):  # one class (or no sample): keep the last gap
                continue
            if score.ndim == 1:
                n_pos = int(labels[member].sum())
                n_neg = int(member.sum()) - n_pos
                se = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))  # no-signal AUC
            else:  # macro one-vs-rest: every class is present (else auc_g is NaN)
                se = no_signal_auc_se(np.bincount(labels[member], minlength=score.shape[1]))
            raw_gap = overall - auc_g
            # soft threshold: only the part of the gap beyond `group_z` standard errors
            shrunk = math.copysign(max(abs(raw_gap) - self.params.group_z * se, 0.0), raw_gap)
            gap[g] = (m * gap[g] + (1 - m) * shrunk) if measured[g] else shrunk
            measured[g] = True
        weight = np.ones(self.n_groups)
        if measured.any():
            logit = gap[measured] / self.params.group_temperature
            raw = np.exp(logit - logit.max())  # the normalisation cancels the shift
            shares = counts[measured] / max(counts[measured].sum(), 1.0)
            weight[measured] = raw / max(float((shares * raw).sum()), 1e-300)
        self.group_gap.copy_(
            torch.as_tensor(gap, dtype=self.group_gap.dtype, device=self.group_gap.device)
        )
        self.group_weight.copy_(
            torch.as_tensor(weight, dtype=self.group_weight.dtype, device=self.group_weight.device)
        )
        self.group_measured.copy_(torch.as_tensor(measured, device=self.group_measured.device))
        stats: dict[str, Any] = {}
        for g in range(self.n_groups):
            stats[f"group_gap/{g}"] = float(self.group_gap[g])
            stats[f"group_weight/{g}"] = float(self.group_weight[g])
        return stats

    def _update_val_levels(self, preds: Any) -> dict[str, Any]:
        from multifair.metrics import roc_auc

        labels = np.asarray(preds.label)
        # each head on the samples that have its modality (absent ones carry NaN scores; a
        # multi-class head's row (K,) of class probabilities: its macro one-vs-rest AUC)
        aucs = []
        n_classes = 2
        for m in self.modalities:
            scores = np.asarray(preds.aux_scores[m], dtype=float)
            have = np.isfinite(scores) if scores.ndim == 1 else np.isfinite(scores).all(axis=1)
            n_classes = 2 if scores.ndim == 1 else scores.shape[1]
            aucs.append(roc_auc(labels[have], scores[have]) if have.any() else math.nan)
        if n_classes == 2:
            n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
            lacks_class = min(n_pos, n_neg) == 0
        else:
            counts = np.bincount(labels[(labels >= 0) & (labels < n_classes)], minlength=n_classes)
            lacks_class = bool((counts == 0).any())
        if lacks_class or not all(math.isfinite(a) for a in aucs):
            return {"val_levels": "skipped: the validation split lacks a class"}
        new = torch.tensor(aucs, dtype=self.val_level.dtype, device=self.val_level.device)
        self.val_level.copy_(new)
        self.val_best.copy_(torch.maximum(self.val_best, new))
        if n_classes == 2:
            self.val_noise.fill_(math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg)))
        else:
            self.val_noise.fill_(no_signal_auc_se(counts))
        self.val_seen.fill_(1.0)
        return {f"val_level/{m}": a for m, a in zip(self.modalities, aucs)}

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        y = batch["label"]
        if self.params.group_weights == "off":
            base = super().loss(out, batch, ctx)  # task CE + auxiliary CE (trains only C_i)
        else:
            base = self._group_weighted_loss(out, batch)

        # A_i on the global batch: aux margins and labels from all ranks, one collective.
        n_classes = out.logits.shape[-1]  # a shape: a Python branch without a host sync
        if n_classes == 2:
            margins = torch.stack(
                [surrogate_scores(out.aux_logits[m], "sigmoid") for m in self.modalities]
            )  # (M, B)
            columns = {"scores": margins.T, "label": y}
        else:  # macro one-vs-rest: each class's log-odds against the rest, modality-major
            ovr = torch.stack([ovr_margins(out.aux_logits[m]) for m in self.modalities], 1)
            columns = {"scores": ovr.flatten(1), "label": y}  # (B, M * K)
        local = presence_matrix(batch, self.modalities)  # missing modalities: A_i over the
        if local is not None:  # samples that have modality i
            columns["present"] = local.float()  # (B, M)
        cols = gather_batch(ctx.gather, columns)  # (B_global, M)
        have = cols["present"].T > 0.5 if "present" in cols else None  # (M, B_global)
        if n_classes == 2:
            auc, has_both = binary_auc(cols["scores"].T, cols["label"], have)  # (M,), (M,)
        else:
            scores = cols["scores"].T.reshape(len(self.modalities), n_classes, -1)  # (M, K, Bg)
            auc, has_both = macro_ovr_auc(scores, cols["label"], have)  # (M,), (M,)
        # Validation passes (no grad / eval mode) read the state but never advance it.
        update = self.training and torch.is_grad_enabled() and ctx.advance
        in_trial = ctx.step < self.params.trial * ctx.total_steps
        signals = self.observe(auc, has_both, update=update, in_trial=in_trial)

        gap = group_gap_loss(
            out.logits, y, batch["group"], ctx.n_groups, self.params.gap_temperature
        )
        signals["gap"] = gap.detach()
        total = base.total
        parts = dict(base.parts)
        if self.params.gap_weight:
            total = total + self.params.gap_weight * gap
            parts["gap"] = gap.detach()
        if self.params.unimodal_weight:
            # each modality's own CE through its auxiliary head on the ATTACHED feature: it
            # trains the encoder (MMPareto's unimodal loss, summed without the Pareto weights)
            uni = unimodal_logits(require_model(ctx), out, "aux", grad=True)
            unimodal = sum(masked_ce(u, y, presence(batch, m)) for m, u in uni.items())
            total = total + self.params.unimodal_weight * unimodal
            parts["unimodal"] = torch.as_tensor(unimodal).detach()
        return LossOutput(total, parts, signals)

    def _group_weighted_loss(self, out: ModelOutput, batch: Mapping[str, Any]) -> LossOutput:
        """Task CE with each sample weighted by its group's `group_weight` (unknown: 1), plus
        the auxiliary heads' plain CE (each over the samples that have its modality)."""
        task = group_weighted_ce(out.logits, batch["label"], batch["group"], self.group_weight)
        aux = aux_loss(out, batch)
        return LossOutput(task + aux, {"task": task.detach(), "aux": torch.as_tensor(aux).detach()})

    def lr_factors(self, loss: LossOutput, ctx: StepContext) -> dict[str, Tensor]:
        return {m: loss.signals[f"lr_factor/{m}"] for m in self.modalities}
