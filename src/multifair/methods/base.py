"""The method hook protocol: every training method is one small file implementing these hooks
around the one loop in `multifair.training.trainer`.

The loop, per optimisation step (see trainer.py for the real code):

    out = method.forward(model, batch)                  # ONE forward pass -> ModelOutput
    loss = method.loss(out, batch, ctx)                 # LossOutput(total, parts, signals)
    method.backward(loss, out, batch, ctx)              # default: ctx.scale(loss.total).backward()
    ctx.unscale_()                                      # fp16 GradScaler: gradients in true units
    method.modulate_gradients(model, loss, ctx)         # gradient edits (OGM-GE, CGGM, MultiFair)
    clip_grad_norm_(all params, clip)                   # clipping AFTER gradient edits
    factors = method.lr_factors(loss, ctx)              # per-modality step-size factors or None
    set lr of group m = scheduled_lr * factors[m]       # encoder groups only
    optimizer.step(); scheduler.step()

Epoch hooks: `on_epoch_start(ctx)` (e.g. PMR prototypes, OGM-GE window), `on_epoch_end(ctx)`;
after each validation pass `on_validation(preds, groups)`. After training, with the selected
checkpoint loaded, `on_selected(val preds, groups)` when `fits_after_selection` (post-hoc
fits such as group stacking; the trainer then re-saves best.pt with the method's state).
State (EMAs, previous AUCs, group weights) lives in registered buffers, so the method's
`state_dict()` goes into the checkpoint and `--resume` restores it. A method's learnable
parameters (FIN, adversary) are trained with the "rest" optimizer group.

Hot-path rule: no host synchronisation inside the step. Signals stay tensors on the device
(`torch.where`, masked matrices, no `.item()`, no boolean indexing, no Python branch on a
tensor value); the loop turns `loss.signals` into numbers only every `log_every` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from multifair.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")

# Keys of a batch that are not modalities.
RESERVED_KEYS = frozenset({"label", "group", "attributes", "sample_id", "index", "present"})


def presence(batch: Mapping[str, Any], modality: str) -> Tensor | None:
    """batch["present"][modality] (B,) bool, or None when every sample has the modality (the
    batch carries `present` only for data with missing modalities)."""
    present = batch.get("present")
    return None if present is None else present.get(modality)


def presence_matrix(batch: Mapping[str, Any], modalities: Sequence[str]) -> Tensor | None:
    """(B, M) bool: which samples have each modality, in `modalities` order; None when the
    batch carries no `present` (every sample has every modality). A modality that `present`
    leaves out is one no sample of the data lacks: True throughout."""
    present = batch.get("present")
    if not present:
        return None
    some = next(iter(present.values()))
    return torch.stack([present.get(m, torch.ones_like(some)) for m in modalities], 1)


def masked_ce(logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    """Mean cross-entropy over the samples where `mask` (B,) is True (all when None); 0 when
    none is. A per-modality loss on a sample that lacks the modality would train on the
    placeholder the encoder ran on."""
    if mask is None:
        return nn.functional.cross_entropy(logits.float(), labels)
    per_sample = nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
    weight = mask.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def aux_loss(out: ModelOutput, batch: Mapping[str, Any]) -> Tensor:
    """sum_m CE(C_m(h_m), y) over the samples that have modality m."""
    y = batch["label"]
    return sum(masked_ce(u, y, presence(batch, m)) for m, u in out.aux_logits.items())  # type: ignore[return-value]


def supporting_methods() -> list[str]:
    """The registered methods that train on data with missing modalities."""
    return [name for name in METHODS.names() if METHODS.get(name).supports_missing]


@dataclass
class ModelOutput:
    """What one forward pass of `MultimodalClassifier` returns."""

    logits: Tensor  # (B, C) fused prediction
    features: dict[str, Tensor]  # h_i (B, d) per modality, attached to the encoders' graph
    aux_logits: dict[str, Tensor]  # C_i(stopgrad(h_i)) (B, C): trains only the auxiliary heads
    head_input: Tensor  # (B, d) input of the head's last linear layer (closed-form gradients)


@dataclass
class LossOutput:
    """What `Method.loss` returns. `total` is what gets backpropagated."""

    total: Tensor  # scalar
    parts: dict[str, Tensor] = field(default_factory=dict)  # detached loss parts, for the log
    # per-step signals for the log and later hooks (B_i, f_i, gap, fairness mode, ...): tensors
    signals: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StepContext:
    """What the loop hands to the hooks. Built once per step by the trainer."""

    step: int  # global optimisation step (0-based)
    epoch: int  # 0-based
    total_steps: int
    n_groups: int  # number of groups of the training attribute (codes 0..n_groups-1; -1 unknown)
    # all_gather of a per-rank tensor along dim 0 (identity when not distributed). Use it for
    # detached batch signals so every rank computes identical factors.
    gather: Callable[[Tensor], Tensor]
    # multiply a loss by the AMP GradScaler scale (identity without fp16)
    scale: Callable[[Tensor], Tensor]
    model: nn.Module | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. a train-loader iterator for PMR
    # False for every micro-batch of a step but the last (train.accumulate > 1): state that
    # tracks progress from step to step (previous AUCs, EMAs) advances once per optimisation
    # step, from the last micro-batch, whose signals also set that step's factors.
    advance: bool = True


class MethodParams(BaseModel):
    """Base for each method's hyper-parameters; unknown keys are errors naming the key."""

    model_config = ConfigDict(extra="forbid")


class Method(nn.Module):
    """Plain joint training (ERM) behaviour; subclasses override the hooks they need."""

    Params: ClassVar[type[MethodParams]] = MethodParams
    # FIN-style methods that need the sensitive attribute at inference set this (on the class,
    # or on the instance when an option decides it), and every table they appear in says so.
    uses_attribute_at_test: bool = False
    # Methods that fit something on the selected checkpoint's validation predictions
    # (`on_selected`) set this; the trainer then re-saves checkpoints/best.pt with the fit.
    fits_after_selection: bool = False
    # ... and those that also fit on the training split's predictions (made in eval mode, after
    # selection) set this (or a property: false once the loaded state holds the fit); they
    # arrive as `on_selected`'s `train_preds` / `train_groups`.
    fits_on_train: bool = False
    # Methods that read per-modality step-size factors need one optimizer group per encoder
    # (the trainer always builds them; this flag only documents the intent).
    acts_on_step_size: ClassVar[bool] = False
    # Methods whose per-modality signals and losses use only the samples that have the
    # modality (batch["present"]) set this; the trainer refuses the others on data with
    # missing modalities (`data.missing_modalities: mask`).
    supports_missing: ClassVar[bool] = False

    @classmethod
    def check_classes(cls, params: MethodParams, n_classes: int) -> None:
        """Raise `UserError` (naming the method and why) when these params cannot train a
        `n_classes`-way label; called by `build_method`, so a binary-only method refuses a
        multi-class run before anything trains. Default: any number of classes (softmax CE)."""

    @classmethod
    def model_modalities(cls, params: MethodParams, modalities: list[str]) -> list[str]:
        """Which of the dataset's modalities the model is built with (unimodal: one)."""
        return list(modalities)

    def __init__(self, params: MethodParams, modalities: list[str], n_groups: int) -> None:
        super().__init__()
        self.params = params
        self.modalities = list(modalities)
        self.n_groups = n_groups

    def setup(self, model: nn.Module) -> None:
        """Called once by the trainer after the model is built and before the optimizer and
        any checkpoint load: create learnable parameters or buffers whose shapes depend on the
        model (FIN's per-group statistics of width `model.dim`). Default: nothing."""

    # ---- forward -----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> ModelOutput:  # type: ignore[override]
        return model(batch)

    # ---- loss --------------------------------------------------------------------------
    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        """Task CE on the fused logits plus the auxiliary heads' CE (which only train C_i)."""
        y = batch["label"]
        task = nn.functional.cross_entropy(out.logits.float(), y)
        aux = aux_loss(out, batch)  # each C_m on the samples that have modality m
        total = task + aux
        return LossOutput(total, {"task": task.detach(), "aux": torch.as_tensor(aux).detach()})

    # ---- backward and gradient edits ---------------------------------------------------
    def backward(
        self, loss: LossOutput, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext
    ) -> None:
        ctx.scale(loss.total).backward()

    def modulate_gradients(
        self, model: nn.Module, loss: LossOutput, ctx: StepContext
    ) -> dict[str, Tensor]:
        """Edit gradients in place (after unscaling, before clipping). Returns stats to log."""
        return {}

    def lr_factors(self, loss: LossOutput, ctx: StepContext) -> dict[str, Tensor] | None:
        """Per-modality step-size factors (tensors or floats) or None for plain steps."""
        return None

    # ---- epochs ------------------------------------------------------------------------
    def on_epoch_start(self, ctx: StepContext) -> dict[str, Any]:
        return {}

    def on_epoch_end(self, ctx: StepContext) -> dict[str, Any]:
        return {}

    def on_validation(self, preds: Any, groups: np.ndarray | None = None) -> dict[str, Any]:
        """After each epoch's validation pass, with its predictions (`training.inference.
        Predictions` of the whole validation split - labels, fused and auxiliary scores -
        identical on every rank) and each sample's code of the training attribute (-1 unknown).
        Returns stats for the epoch record."""
        return {}

    def on_selected(
        self,
        preds: Any,
        groups: np.ndarray | None = None,
        train_preds: Any | None = None,
        train_groups: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Called once after training when `fits_after_selection`: the selected checkpoint is
        loaded and `preds` are its validation predictions (with `groups`, as in
        `on_validation`); with `fits_on_train`, also its training-split predictions. Fit
        post-hoc state here; returns stats for metrics.json."""
        return {}


def build_method(
    name: str,
    params: Mapping[str, Any] | None,
    modalities: list[str],
    n_groups: int,
    n_classes: int = 2,
) -> Method:
    """Look up a registered method and validate its hyper-parameters (and that it can train a
    `n_classes`-way label: `Method.check_classes`)."""
    from multifair.config import validate

    cls = METHODS.get(name)
    parsed = validate(cls.Params, dict(params or {}), source=f"method {name!r}")
    cls.check_classes(parsed, n_classes)
    return cls(parsed, modalities, n_groups)
