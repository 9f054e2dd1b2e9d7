"""MultiFair (Zubair et al., arXiv 2510.07328): dual-level gradient modulation.

Modality level: B_i gives the encoder whose auxiliary-head batch AUC moved less a larger share
of the update; L_gm aligns each auxiliary head's last-layer gradient with the fused head's.
Group level: per-(modality, group) EMAs of a surrogate AUC give L_f (their spread) and f_i
(a factor > 1 when the batch's groups are below the modality's average); both act only while
the fused prediction's group AUC gap on the batch exceeds tau. Encoder i's update is scaled
by rho * B_i * (f_i in fairness mode), on its gradient (as published) or on its step size.

Two registered variants (spec method.md, sections 3-4; equations in docs/methods.md):
- `multifair`: the paper's intent - L_gm and L_f carry real gradients, any number of
  modalities and groups, f_i clamped.
- `multifair_released`: the public code's behaviour - L_gm and L_f are logged but add no
  gradient, probability-logistic surrogate with 0.5 for groups it cannot score, unclamped f_i.
  Behaviour-equivalent to that code without its extra no-grad forward and extra backward.

Every signal is computed from the ONE forward pass of the step, on the device, with no host
synchronisation (see `signals.py`); the per-sample inputs of the batch signals are gathered
across ranks with one collective so every rank applies identical factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from multifair.errors import UserError
from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
    masked_ce,
    presence,
    presence_matrix,
)
from multifair.methods.signals import (
    apply_encoder_factors,
    auc_gap,
    binary_auc,
    gather_batch,
    group_auc,
    group_masks,
    group_shares,
    onehot,
    pairwise_surrogate_auc,
    surrogate_scores,
    unwrap_model,
)


class ReleasedParams(MethodParams):
    """Hyper-parameters shared by both variants (defaults: the released FairVision runs)."""

    rho: float = Field(1.2, gt=0, description="scale of the modality factor rho * B_i")
    lambda_gm: float = Field(0.15, ge=0, description="weight of the alignment loss L_gm")
    tau: float = Field(0.04, ge=0, description="fairness mode iff fused group AUC gap > tau")
    lambda_f: float = Field(0.5, ge=0, description="weight of the group loss L_f")
    delta: float = Field(0.3, ge=0, description="strength of the group factor F_i^g")
    ema: float = Field(0.9, ge=0, lt=1, description="EMA decay s of the group surrogate AUCs")
    modality_level: bool = Field(True, description="B_i and L_gm (off: MultiFair_G)")
    group_level: bool = Field(True, description="f_i, L_f and the trigger (off: MultiFair_M)")
    factor_on: Literal["gradient", "step_size"] = Field(
        "gradient", description="scale each encoder's gradient (published) or its learning rate"
    )


class IntentParams(ReleasedParams):
    """`multifair` adds the surrogate choice and the clamp on f_i."""

    surrogate: Literal["sigmoid", "logistic"] = "sigmoid"
    surrogate_temperature: float = Field(1.0, gt=0, description="T of sigmoid((u_p - u_n) / T)")
    clamp: tuple[float, float] = Field((0.5, 2.0), description="bounds of f_i")

    @field_validator("clamp")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("needs 0 < low <= high")
        return value


@METHODS.register("multifair")
class MultiFair(Method):
    """MultiFair, paper intent. See the module docstring and docs/methods.md."""

    Params = IntentParams
    released: ClassVar[bool] = False
    # B_i, A_i, the group surrogates and L_aux use only the samples that have modality i
    supports_missing = True
    params: ReleasedParams

    @classmethod
    def check_classes(cls, params: MethodParams, n_classes: int) -> None:
        if n_classes != 2:
            raise UserError(
                f"method {cls._name()!r} needs a binary label (data has {n_classes} classes): "
                "its modality balance and group gap are binary AUCs of the positive-class "
                "probability (and a pairwise positive/negative AUC surrogate); use a "
                "cross-entropy method (erm, reweight, groupdro, fis, ...) for multi-class"
            )

    def __init__(self, params: ReleasedParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        if params.modality_level and len(modalities) < 2:
            raise UserError(
                f"method {self._name()!r}: modality_level needs at least two modalities "
                f"(got {modalities}); set method.modality_level=false or add a modality"
            )
        # What the released code fixes and `multifair` lets the user choose.
        intent = params if isinstance(params, IntentParams) else None
        self.surrogate: Literal["sigmoid", "logistic"] = intent.surrogate if intent else "logistic"
        self.temperature = intent.surrogate_temperature if intent else 1.0
        self.clamp_bounds = intent.clamp if intent and not self.released else None
        m, g = len(modalities), max(n_groups, 0)
        # A_i(t-1): the auxiliary heads' previous batch AUC, A_i(0) = 0.5.
        self.register_buffer("prev_auc", torch.full((m,), 0.5))
        # Abar_i^g: EMA of the surrogate AUC of modality i on group g, start 0.5.
        self.register_buffer("group_ema", torch.full((m, g), 0.5))

    @classmethod
    def _name(cls) -> str:
        return "multifair_released" if cls.released else "multifair"

    # ---- loss: steps 1-7 -------------------------------------------------------------------
    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        p = self.params
        net = unwrap_model(ctx.model)
        y = batch["label"]  # (B,)
        mods = self.modalities
        ones = torch.ones(len(mods), device=y.device)

        # 1-2. Task loss on the fused logits; auxiliary CE trains only C_i (detached h_i).
        task = nn.functional.cross_entropy(out.logits.float(), y)
        # each C_i on the samples that have modality i (all of them without missing modalities)
        aux_each = [masked_ce(out.aux_logits[m], y, presence(batch, m)) for m in mods]
        total = task + torch.stack(aux_each).sum()
        parts = {"task": task.detach(), "aux": torch.stack(aux_each).sum().detach()}

        # Group surrogate scores: attached to the encoders in `multifair` (so L_f reaches them).
        group_level = p.group_level and self.n_groups > 0
        scores_local = torch.zeros(len(mods), 0, device=y.device)
        if group_level:
            surrogate_logits = self._surrogate_logits(net, out)
            scores_local = torch.stack(
                [surrogate_scores(surrogate_logits[m], self.surrogate) for m in mods]
            )  # (M, B)

        # One collective for every per-sample input of the batch signals.
        columns = {
            "aux_prob": torch.stack(
                [torch.softmax(out.aux_logits[m].float(), -1)[:, 1] for m in mods], 1
            ),  # (B, M)
            "fused_prob": torch.softmax(out.logits.float(), -1)[:, 1],  # (B,)
            "label": y,
            "group": batch["group"],
        }
        if group_level:
            columns["surrogate"] = scores_local.T  # (B, M)
        have = presence_matrix(batch, mods)  # missing modalities: signals on present samples
        if have is not None:
            columns["present"] = have.float()  # (B, M)
        glob = gather_batch(ctx.gather, columns)
        y_all = glob["label"]  # (B_global,)
        have_all = glob["present"].T > 0.5 if "present" in glob else None  # (M, B_global)
        have_local = None if have is None else have.T  # (M, B)

        signals: dict[str, Tensor] = {}
        factor = ones
        # 3-4. Modality balance B_i and direction alignment L_gm.
        if p.modality_level:
            balance, auc_now = self._modality_balance(
                glob["aux_prob"].T, y_all, ctx.advance, have_all
            )
            gm = self._alignment_loss(net, out, y, aux_each, balance)
            parts["gm"] = gm.detach()
            if not self.released:
                total = total + p.lambda_gm * gm
            factor = p.rho * balance
            for i, m in enumerate(mods):
                signals[f"aux_auc/{m}"] = auc_now[i]
        else:
            balance = ones
        # 5-6. Group signals and the fairness trigger.
        fair = torch.zeros((), dtype=torch.bool, device=y.device)
        group_factor = ones
        if self.n_groups > 0:
            masks_all = group_masks(glob["group"], self.n_groups)  # (B_global, G)
            signals["gap"] = self._fused_gap(glob["fused_prob"], y_all, masks_all)
            if group_level:
                fair = signals["gap"] > p.tau
                lf, group_factor = self._group_fairness(
                    scores_local,
                    glob["surrogate"].T,
                    y,
                    batch["group"],
                    y_all,
                    masks_all,
                    ctx.advance,
                    have_local,
                    have_all,
                )
                parts["fair"] = lf.detach()
                if not self.released:
                    # 7. The fairness term joins the loss only in fairness mode.
                    total = total + torch.where(fair, p.lambda_f * lf, torch.zeros_like(lf))
                factor = factor * torch.where(fair, group_factor, ones)
        signals["fair_mode"] = fair.float()
        for i, m in enumerate(mods):
            signals[f"B/{m}"] = balance[i]
            signals[f"f/{m}"] = group_factor[i]
            signals[f"factor/{m}"] = factor[i].detach()
        return LossOutput(total, parts, signals)

    def _surrogate_logits(self, net: nn.Module, out: ModelOutput) -> dict[str, Tensor]:
        """Auxiliary logits the group surrogate is computed from.

        `multifair`: C_i applied to the NON-detached h_i, with C_i's weights detached: the
        fairness gradient reaches the encoders (and projections), while the auxiliary heads stay
        plain probes trained by L_aux alone, so A_i keeps measuring what each modality's
        features support. `multifair_released`: the step's detached auxiliary logits.
        """
        if self.released:
            return {m: out.aux_logits[m].detach() for m in self.modalities}
        logits = {}
        for m in self.modalities:
            head = net.aux_heads[m]
            frozen = {name: w.detach() for name, w in head.named_parameters()}
            logits[m] = torch.func.functional_call(head, frozen, (out.features[m],))
        return logits

    def _modality_balance(
        self, aux_prob: Tensor, y_all: Tensor, advance: bool, have: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Step 3. aux_prob (M, B_global). Returns (B_i (M,), A_i (M,)); updates A_i(t-1)
        in training when `advance` (the step's last micro-batch).

        B_i = (S + eps - |dA_i|) / (S + eps), S = sum_j |dA_j|, eps = 1e-8, as the released
        code computes it. This equals the spec's (S - |dA_i|) / (S + eps) up to eps / S, except
        when no AUC moved (S = 0, e.g. a one-class batch): then every B_i = 1 (a plain step)
        rather than 0 (frozen encoders).
        """
        auc, valid = binary_auc(aux_prob, y_all, have)  # (M,); have (M, B): present samples
        auc_now = torch.where(valid, auc, self.prev_auc)  # one-class batch: reuse A_i(t-1)
        change = (auc_now - self.prev_auc).abs()  # (M,)
        spread = change.sum() + 1e-8
        if self.training and advance:  # once per training step (Python flags, no sync)
            self.prev_auc.copy_(auc_now)
        return (spread - change) / spread, auc_now

    def _alignment_loss(
        self, net: nn.Module, out: ModelOutput, y: Tensor, aux_each: list[Tensor], balance: Tensor
    ) -> Tensor:
        """Step 4. L_gm = (1/M) sum_i (|B_i| - B_i cos(g_i, g_F)).

        g_F = dL_task/dW_head = (softmax(z) - onehot(y))^T a / B in closed form (a = the head's
        last-layer input), differentiable in `multifair`; g_i = dCE(u_i, y)/dW_{C_i}, detached,
        from a backward through the small auxiliary head only.
        """
        z, a = out.logits.float(), out.head_input.float()  # (B, C), (B, d)
        if self.released:
            z, a = z.detach(), a.detach()
        g_fused = (torch.softmax(z, -1) - onehot(y, z.shape[-1])).T @ a / z.shape[0]  # (C, d)
        cosines = []
        for m, aux_loss in zip(self.modalities, aux_each):
            weight = net.aux_last_layer(m).weight
            (g_aux,) = torch.autograd.grad(aux_loss, weight, retain_graph=True)
            assert g_aux.shape == g_fused.shape, "aux and head last layers must have equal shapes"
            cosines.append(
                nn.functional.cosine_similarity(
                    g_aux.detach().float().flatten(), g_fused.flatten(), dim=0
                )
            )
        return (balance.abs() - balance * torch.stack(cosines)).mean()

    def _group_fairness(
        self,
        scores_local: Tensor,
        scores_all: Tensor,
        y: Tensor,
        groups: Tensor,
        y_all: Tensor,
        masks_all: Tensor,
        advance: bool,
        have_local: Tensor | None = None,
        have_all: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Step 5. Updates the EMAs (in training when `advance`); returns (L_f, f_i (M,)).

        The EMA's new value is the surrogate on the global batch (identical on every rank); its
        gradient is that of the same surrogate on this rank's samples (straight-through: the
        value of one, the gradient of the other; equal in one process). The trainer averages
        gradients over ranks.
        """
        p = self.params
        form, temperature = self.surrogate, self.temperature
        s_all, valid = _surrogate_by_modality(
            scores_all, y_all, masks_all, have_all, form=form, temperature=temperature
        )  # (M, G), (G,) or (M, G) with missing modalities
        prev = self.group_ema  # (M, G)
        if self.released:
            # Groups it cannot score enter the EMA as 0.5, as in the released code.
            s_new = torch.where(valid, s_all, torch.full_like(s_all, 0.5))
            ema = p.ema * prev + (1 - p.ema) * s_new
        else:
            masks_local = group_masks(groups, self.n_groups)
            s_local, _ = _surrogate_by_modality(
                scores_local, y, masks_local, have_local, form=form, temperature=temperature
            )
            s_new = s_all + (s_local - s_local.detach())
            # Absent or one-class groups keep their previous value.
            ema = torch.where(valid, p.ema * prev + (1 - p.ema) * s_new, prev)
        if self.training and advance:
            self.group_ema.copy_(ema.detach())
        mean = ema.mean(-1, keepdim=True)  # (M, 1) Abar_i
        lf = (ema - mean).abs().mean()
        gain = 1 + p.delta * (mean - ema).detach() / max(p.tau, 1e-4)  # (M, G) F_i^g
        shares, any_known = group_shares(masks_all)  # (G,)
        f = torch.where(any_known, gain @ shares, torch.ones_like(gain[:, 0]))  # (M,)
        if self.clamp_bounds is not None:
            f = f.clamp(*self.clamp_bounds)
        return lf, f

    def _fused_gap(self, fused_prob: Tensor, y_all: Tensor, masks_all: Tensor) -> Tensor:
        """Step 6. Group AUC gap of the fused prediction over groups with >= 2 samples.

        `multifair` skips one-class groups; the released code scores them 0.5.
        """
        auc, valid, count = group_auc(fused_prob, y_all, masks_all)  # (G,)
        if self.released:
            usable = count >= 2
            auc = torch.where(valid, auc, torch.full_like(auc, 0.5))
        else:
            usable = valid
        return auc_gap(auc, usable)

    # ---- step 8: where the factor acts -----------------------------------------------------
    def modulate_gradients(
        self, model: nn.Module, loss: LossOutput, ctx: StepContext
    ) -> dict[str, Tensor]:
        """grad(theta_i) *= rho * B_i * (f_i in fairness mode), encoder parameters only."""
        if self.params.factor_on == "gradient":
            factors = {m: loss.signals[f"factor/{m}"] for m in self.modalities}
            apply_encoder_factors(unwrap_model(model).modality_parameters(), factors)
        return {}

    def lr_factors(self, loss: LossOutput, ctx: StepContext) -> dict[str, Tensor] | None:
        """With factor_on=step_size the same factors scale each encoder's learning rate."""
        if self.params.factor_on == "step_size":
            return {m: loss.signals[f"factor/{m}"] for m in self.modalities}
        return None


def _surrogate_by_modality(
    scores: Tensor,
    labels: Tensor,
    masks: Tensor,
    have: Tensor | None,
    *,
    form: Literal["sigmoid", "logistic"],
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Per-group surrogate AUCs of each modality's scores (M, B) -> (M, G), valid. With
    missing modalities (`have` (M, B) bool) modality i's groups hold only the samples that
    have it, so valid is (M, G)."""
    if have is None:
        return pairwise_surrogate_auc(scores, labels, masks, form=form, temperature=temperature)
    pieces = [
        pairwise_surrogate_auc(
            scores[i], labels, masks & have[i][:, None], form=form, temperature=temperature
        )
        for i in range(scores.shape[0])
    ]
    return torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces])


@METHODS.register("multifair_released")
class MultiFairReleased(MultiFair):
    """MultiFair as the public code behaves (spec section 4), for reproduction."""

    Params = ReleasedParams
    released: ClassVar[bool] = True
    supports_missing = False  # reproduces the released code, which has no missing modalities
