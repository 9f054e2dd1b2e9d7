"""`pmr`: Prototypical Modal Rebalance (Fan et al., CVPR 2023).

At the start of every epoch, each modality's class prototypes are the mean feature h_m of each
class over part of the TRAINING set (`proto_batches` batches), blended with the previous ones:

    c_{m,k} <- mu * c_{m,k} + (1 - mu) * mean{h_m(x) : y(x) = k}     (first epoch: the mean)

Per step, prototype logits are negative Euclidean distances, p_m = softmax(-||h_m - c_{m,k}||),
and the prototype score ratio decides which modality is behind:

    s_m = sum_batch p_m[y]                  (global batch)
    r_m = s_m / max_{j != m} s_j
    L = CE(z, y) + alpha * sum_m [r_m < 1] * CE(-||h_m - c_m||, y)   (+ the auxiliary heads' CE)

i.e. the prototype CE (on attached features: it trains encoder m) is added for the weaker
modality only - a hard switch, as in the released code. With more than two modalities every
modality that is not the strongest gets it. The paper's entropy regulariser on the dominant
modality was never implemented in the released code and is not here either. Distances use
`torch.cdist`, whose gradient at zero distance is 0 (not NaN; tested).

What the trainer must provide in `ctx.extras` at `on_epoch_start` (either is enough):
- "train_batches": an iterable of training batches (dicts as in architecture.md: one entry per
  modality plus "label"), already on the model's device; or
- "train_loader" (an iterable of CPU batches) with "to_device" (`to_device(batch, device,
  train=False)`) and "device": the batches are moved here, without augmentation.
Only the first `proto_batches` batches are read (0: all). The model runs in eval mode under
no_grad for this, and its training mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from pydantic import Field
from torch import nn

from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
)
from multifair.methods.estimators import ratio_to_others, require_model, true_class_score
from multifair.methods.signals import onehot


class PMRParams(MethodParams):
    alpha: float = Field(1.0, ge=0)  # weight of the prototype CE (paper: 1 - 2)
    momentum: float = Field(0.2, ge=0, le=1)  # mu: weight of the previous epoch's prototypes
    proto_batches: int = Field(10, ge=0)  # training batches per prototype refresh (0: all)


def training_batches(ctx: StepContext) -> Iterable[Mapping[str, Any]]:
    """The training batches the trainer offers in ctx.extras (see the module docstring)."""
    extras = ctx.extras
    if "train_batches" in extras:
        return extras["train_batches"]
    if {"train_loader", "to_device", "device"} <= set(extras):
        to_device, device = extras["to_device"], extras["device"]
        return (to_device(batch, device, train=False) for batch in extras["train_loader"])
    raise RuntimeError(
        "pmr needs training batches at epoch start: ctx.extras must hold 'train_batches' "
        f"(or 'train_loader', 'to_device' and 'device'); it holds {sorted(extras)}"
    )


@METHODS.register("pmr")
class PMR(Method):
    """Adds a prototype CE for the modality whose prototype score lags."""

    Params = PMRParams
    params: PMRParams

    def __init__(self, params: PMRParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        self.register_buffer("prototypes", torch.zeros(0))  # (M, C, d) after setup
        self.register_buffer("refreshed", torch.zeros((), dtype=torch.bool))  # any epoch yet

    def setup(self, model: nn.Module) -> None:
        shape = (len(self.modalities), model.n_classes, model.dim)
        self.prototypes = torch.zeros(shape, device=self.refreshed.device)

    @torch.no_grad()
    def on_epoch_start(self, ctx: StepContext) -> dict[str, Any]:
        model = require_model(ctx)
        if self.prototypes.dim() != 3:
            raise RuntimeError("pmr: call method.setup(model) before training (the trainer does)")
        M, C, d = self.prototypes.shape
        sums = torch.zeros(M, C, d, device=self.prototypes.device)
        counts = torch.zeros(C, device=self.prototypes.device)
        limit = self.params.proto_batches or None
        was_training = model.training
        model.eval()
        try:
            for batch in islice(training_batches(ctx), limit):
                features = model.encode(batch)
                member = onehot(batch["label"], C)  # (B, C)
                for i, m in enumerate(self.modalities):
                    sums[i] += member.T @ features[m].float()  # (C, d)
                counts += member.sum(0)
        finally:
            model.train(was_training)
        sums = ctx.gather(sums[None]).sum(0)  # every rank: the same prototypes
        counts = ctx.gather(counts[None]).sum(0)
        fresh = sums / counts.clamp_min(1)[None, :, None]  # (M, C, d)
        mu = torch.where(self.refreshed, self.params.momentum, 0.0)
        blended = mu * self.prototypes + (1 - mu) * fresh
        seen = (counts > 0)[None, :, None]  # a class absent from the sample keeps its prototype
        self.prototypes.copy_(torch.where(seen, blended, self.prototypes))
        self.refreshed.fill_(True)
        return {f"prototype_count/{k}": counts[k] for k in range(C)}

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        if self.prototypes.dim() != 3:
            raise RuntimeError("pmr: call method.setup(model) before training (the trainer does)")
        result = super().loss(out, batch, ctx)  # task CE + auxiliary heads' CE
        y = batch["label"]
        proto_losses, scores = [], []
        for i, m in enumerate(self.modalities):
            distance = torch.cdist(out.features[m].float(), self.prototypes[i])  # (B, C)
            proto_losses.append(nn.functional.cross_entropy(-distance, y))
            scores.append(ctx.gather(true_class_score(-distance.detach(), y)).sum())
        score = torch.stack(scores)  # (M,)
        ratio = ratio_to_others(score, "max")  # (M,)
        # hard switch: the weaker modality; nothing before the first prototypes exist
        weight = self.params.alpha * (ratio < 1).float() * self.refreshed.float()  # (M,)
        proto = (weight * torch.stack(proto_losses)).sum()
        result.total = result.total + proto
        result.parts["prototype"] = proto.detach()
        for i, m in enumerate(self.modalities):
            result.signals[f"proto_score/{m}"] = score[i]
            result.signals[f"proto_weight/{m}"] = weight[i]
        return result
