"""`reweight`: group reweighting by inverse group frequency.

Each sample's task loss is weighted by its group's inverse training frequency to a power:

    w_g = p_g^(-power) / sum_h p_h^(1 - power)      (so the expected weight sum_g p_g w_g = 1)
    L   = mean_n w_{g(n)} CE(z_n, y_n)               (+ the auxiliary heads' CE)

power 1 equalises the groups' total weight, power 0.5 goes half way (on a log scale), power 0
is ERM. Because the weights average to 1 over the training set, the loss keeps ERM's scale.
Samples with an unknown group (-1) get weight 1.

The frequencies p_g are the training set's when the trainer offers them in
`ctx.extras["group_counts"]` at `on_epoch_start` (a length-G sequence or tensor of sample
counts of the training attribute); otherwise they are the running counts of every batch seen so
far (global batch under DDP), which are the training frequencies after one epoch. A group with
no sample counted yet gets weight 0 (it has no sample to weight either). No host sync.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
    aux_loss,
)
from multifair.methods.signals import group_masks, group_weighted_ce


class ReweightParams(MethodParams):
    power: float = Field(1.0, ge=0)  # 1: inverse frequency; 0.5: its square root


def inverse_frequency_weights(counts: Tensor, power: float) -> Tensor:
    """(G,) counts -> (G,) weights p_g^(-power) normalised so that sum_g p_g w_g = 1."""
    p = counts / counts.sum().clamp_min(1)
    seen = counts > 0
    raw = torch.where(seen, p.clamp_min(1e-12) ** (-power), torch.zeros_like(p))
    return raw / (p * raw).sum().clamp_min(1e-12)


@METHODS.register("reweight")
class Reweight(Method):
    """ERM with each sample's loss weighted by its group's inverse frequency ** power."""

    Params = ReweightParams
    supports_missing = True  # auxiliary CE over the samples that have the modality
    params: ReweightParams

    def __init__(self, params: ReweightParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        self.register_buffer("counts", torch.zeros(n_groups))  # samples per group
        self.register_buffer("frozen", torch.zeros(()))  # 1: counts are the training set's

    def on_epoch_start(self, ctx: StepContext) -> dict[str, Any]:
        counts = ctx.extras.get("group_counts")
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.float32, device=self.counts.device)
            assert counts.shape == self.counts.shape, (
                f"group_counts has shape {tuple(counts.shape)}, expected ({self.n_groups},)"
            )
            self.counts.copy_(counts)
            self.frozen.fill_(1.0)
        return {}

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        y, groups = batch["label"], batch["group"]
        member = group_masks(groups, self.n_groups).float()  # (B, G)
        batch_counts = ctx.gather(member.sum(0)[None]).sum(0)  # (G,) global batch
        self.counts.add_((1 - self.frozen) * batch_counts)
        weights = inverse_frequency_weights(self.counts, self.params.power)  # (G,)
        task = group_weighted_ce(out.logits, y, groups, weights)  # unknown group: weight 1
        aux = aux_loss(out, batch)  # each C_m on the samples that have m
        signals = {f"weight/{g}": weights[g] for g in range(self.n_groups)}
        return LossOutput(task + aux, {"task": task.detach(), "aux": aux.detach()}, signals)
