"""`mmpareto`: Pareto integration of multimodal and unimodal gradients (Wei & Hu, ICML 2024).

Losses: the fused CE L_mm and one unimodal CE L_m per modality (shared estimator, default
"aux": the auxiliary head on the ATTACHED feature, so L_m trains C_m and encoder m). For each
encoder m, with g_mm = grad L_mm and g_m = grad L_m over all of its parameters (flattened):

    cos(g_mm, g_m) > 0:  w = (1/2, 1/2)
    otherwise:           w = the two-task min-norm weights, w_mm = clip(<g_m - g_mm, g_m> / |g_mm - g_m|^2, 0, 1)
    g = 2 (w_mm g_mm + w_m g_m)
    g <- gamma * g * max(1, |g_mm + g_m| / |g|)      (never smaller than the plain sum), gamma = 1.5

The min-norm point has a non-negative inner product with both gradients, so the update never
works against either loss (the paper's guarantee). The released code applies the last rescale
per parameter TENSOR, with a different factor per tensor, which can break that guarantee; we
rescale the encoder's whole gradient by one factor, which keeps it. Fusion, head and auxiliary
heads get the plain gradient of L_mm + sum_m L_m.

Cost and host syncs: backward runs M + 2 autograd passes (g_mm for all encoders, g_m per
encoder, then the plain backward) - inherent to the method. The weights themselves are chosen
with `torch.where`, without host syncs. Under DDP the per-loss gradients (computed by
`autograd.grad`, which DistributedDataParallel does not average) are averaged with
`ctx.gather`, and with gradient accumulation they are averaged over the micro-batches, so they
are in the same units as the averaged `.grad` the trainer hands to `modulate_gradients`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
)
from multifair.methods.estimators import Estimator, require_model, unimodal_logits
from multifair.methods.signals import unwrap_model


class MMParetoParams(MethodParams):
    gamma: float = Field(1.5, gt=0)  # final gradient scale
    estimator: Estimator = "aux"


@dataclass
class ParetoLoss(LossOutput):
    """LossOutput plus the attached pieces `backward` differentiates separately."""

    fused: Tensor = field(default_factory=lambda: torch.zeros(()))
    unimodal: dict[str, Tensor] = field(default_factory=dict)


def pareto_direction(g_mm: Tensor, g_m: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """The MMPareto gradient for one encoder from its two flattened gradients (n,), (n,).

    Returns (gradient (n,), w_mm ()). No host sync.
    """
    cos = nn.functional.cosine_similarity(g_mm, g_m, dim=0)
    diff = g_mm - g_m
    denom = diff.dot(diff)
    # min-norm point of the segment [g_m, g_mm]: w_mm g_mm + (1 - w_mm) g_m
    w_min = torch.where(denom > 0, (g_m - g_mm).dot(g_m) / torch.where(denom > 0, denom, 1.0), 0.5)
    w_mm = torch.where(cos > 0, torch.full_like(cos, 0.5), w_min.clamp(0.0, 1.0))
    direction = 2 * (w_mm * g_mm + (1 - w_mm) * g_m)  # (n,)
    plain = (g_mm + g_m).norm()
    norm = direction.norm()
    up = torch.where(norm > 0, plain / torch.where(norm > 0, norm, 1.0), 1.0).clamp_min(1.0)
    return gamma * up * direction, w_mm


@METHODS.register("mmpareto")
class MMPareto(Method):
    """Per encoder, combines the fused and unimodal gradients without conflict (min-norm)."""

    Params = MMParetoParams
    params: MMParetoParams

    def __init__(self, params: MMParetoParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        # per-step scratch, not state: {m: [sum g_mm, sum g_m]} over micro-batches, and their count
        self._grads: dict[str, list[Tensor]] = {}
        self._step: int | None = None
        self._micro = 0

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        y = batch["label"]
        fused = nn.functional.cross_entropy(out.logits.float(), y)
        logits = unimodal_logits(require_model(ctx), out, self.params.estimator, grad=True)
        unimodal = {m: nn.functional.cross_entropy(logits[m].float(), y) for m in self.modalities}
        total = fused + sum(unimodal.values())
        parts = {"task": fused.detach()}
        if self.params.estimator == "zero_others":
            # the auxiliary heads are not part of the losses: train them as every method does
            aux = sum(nn.functional.cross_entropy(u.float(), y) for u in out.aux_logits.values())
            total = total + aux
            parts["aux"] = aux.detach()
        parts.update({f"unimodal/{m}": v.detach() for m, v in unimodal.items()})
        return ParetoLoss(total, parts, {}, fused=fused, unimodal=unimodal)

    def backward(
        self, loss: LossOutput, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext
    ) -> None:
        assert isinstance(loss, ParetoLoss), "mmpareto.backward needs the loss of mmpareto.loss"
        encoders = require_model(ctx).modality_parameters()
        params = {m: [p for p in encoders[m] if p.requires_grad] for m in self.modalities}
        flat = [p for m in self.modalities for p in params[m]]
        # gradients in true units: computed on the scaled loss (fp16 range), divided back
        inv_scale = 1.0 / ctx.scale(torch.ones((), device=loss.total.device))
        g_mm = torch.autograd.grad(
            ctx.scale(loss.fused), flat, retain_graph=True, allow_unused=True
        )
        g_mm_by = dict(zip(map(id, flat), g_mm))
        if self._step != ctx.step:  # first micro-batch of this optimisation step
            self._step, self._micro, self._grads = ctx.step, 0, {}
        self._micro += 1
        for m in self.modalities:
            g_m = torch.autograd.grad(
                ctx.scale(loss.unimodal[m]), params[m], retain_graph=True, allow_unused=True
            )
            pair = [
                _flatten([g_mm_by[id(p)] for p in params[m]], params[m]) * inv_scale,
                _flatten(list(g_m), params[m]) * inv_scale,
            ]
            if m in self._grads:
                pair = [a + b for a, b in zip(self._grads[m], pair)]
            self._grads[m] = pair
        ctx.scale(loss.total).backward()

    def modulate_gradients(
        self, model: nn.Module, loss: LossOutput, ctx: StepContext
    ) -> dict[str, Tensor]:
        assert self._step == ctx.step, "mmpareto: modulate_gradients without its backward"
        encoders = unwrap_model(model).modality_parameters()
        stats = {}
        for m in self.modalities:
            params = [p for p in encoders[m] if p.requires_grad]
            if not params:
                continue
            pair = torch.stack(self._grads[m]) / self._micro  # (2, n) mean over micro-batches
            g_mm, g_m = ctx.gather(pair[None]).mean(0)  # mean over ranks
            direction, w_mm = pareto_direction(g_mm, g_m, self.params.gamma)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = direction[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
            stats[f"w_mm/{m}"] = w_mm
            stats[f"cos/{m}"] = nn.functional.cosine_similarity(g_mm, g_m, dim=0)
        self._grads = {}
        return stats


def _flatten(grads: list[Tensor | None], params: list[nn.Parameter]) -> Tensor:
    """Concatenate gradients into one float32 vector; an unused parameter contributes zeros."""
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).float().flatten()
            for g, p in zip(grads, params)
        ]
    )
