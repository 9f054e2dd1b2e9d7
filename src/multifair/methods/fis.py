"""`fis`: Fair Identity Scaling (FairVision, Luo et al. 2024), per-sample loss reweighting.

Each sample's task loss l_n gets a weight mixed from an individual and a group part:

    w_ind(n) = B * softmax_n(l_n / T)                          (harder samples weigh more; mean 1)
    D_g      = Sinkhorn OT cost between group g's losses and the pooled losses of the batch
    s_g      = softmax_g(D_g / T) over the groups present      (a group whose losses differ
                                                                from the rest gets more mass)
    w_grp(n) = K * s_{g(n)} / n_{g(n)}                         (K samples with a known group:
                                                                each group gets its share s_g)
    L        = mean_n ( ((1 - c) w_ind(n) + c w_grp(n)) * l_n )   (+ the auxiliary heads' CE)

c = 0.5, T = 1. The weights are importance weights: detached, recomputed every step from the
batch. The OT cost is the entropic one (squared-difference ground cost, eps = blur^2, blur 0.1
as in FairVision's defaults), from a fixed number of log-domain Sinkhorn iterations run for all
groups at once - no host sync. Samples with an unknown group (-1) have w_grp = 1.

FairVision's code draws an extra batch per group from separate loaders to estimate each group's
loss distribution; we use the groups' samples in the training batch itself (one loader, one
forward), and the mapping from distances to group weights above is our reading of the paper.
It is a reference method: compare it, do not build on it.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from multifair.methods.signals import group_masks


class FISParams(MethodParams):
    mix: float = Field(0.5, ge=0, le=1)  # c: share of the group weight
    temperature: float = Field(1.0, gt=0)  # T of both softmaxes
    blur: float = Field(0.1, gt=0)  # Sinkhorn blur; eps = blur ** 2
    iterations: int = Field(200, ge=1)  # Sinkhorn iterations (eps-scaling in the first half)


def sinkhorn_costs(
    values: Tensor, masks: Tensor, pooled: Tensor, eps: float, iterations: int
) -> Tensor:
    """Entropic OT cost between each group's empirical distribution and the pooled one.

    values (B,) the samples; masks (B, G) bool group membership; pooled (B,) bool the samples
    of the reference distribution. Uniform weights within each set; ground cost (x - y)^2.
    Returns (G,) costs; a group without samples gets 0.
    """
    cost = (values[:, None] - values[None, :]) ** 2  # (B, B)
    neg = torch.finfo(values.dtype).min / 4  # log(0) that stays finite under logsumexp
    count = masks.sum(0)  # (G,)
    present = count > 0
    log_a = torch.where(masks.T, -torch.log(count.clamp_min(1).to(values.dtype))[:, None], neg)
    log_a = torch.where(present[:, None], log_a, 0.0)  # (G, B); empty groups: a dummy uniform
    log_b = torch.where(pooled, -torch.log(pooled.sum().clamp_min(1).to(values.dtype)), neg)
    f = torch.zeros_like(log_a)  # (G, B) potentials on the group side
    g = torch.zeros_like(log_a)  # (G, B) potentials on the pooled side
    # eps-scaling (as geomloss does): start at the squared diameter, anneal geometrically to
    # eps over the first half of the iterations, then iterate at eps - converges far faster
    # than a fixed small eps. The diameter stays a tensor (no host sync).
    diameter = cost.max().clamp_min(eps)
    anneal = max(iterations // 2, 1)
    for it in range(iterations):
        level = eps * (diameter / eps) ** (max(anneal - 1 - it, 0) / anneal)
        f = -level * torch.logsumexp((g[:, None, :] - cost) / level + log_b, dim=2)
        g = -level * torch.logsumexp((f[:, :, None] - cost) / level + log_a[:, :, None], dim=1)
    log_plan = (f[:, :, None] + g[:, None, :] - cost) / eps + log_a[:, :, None] + log_b
    transport = (log_plan.exp() * cost).sum((1, 2))  # (G,)
    return torch.where(present, transport, 0.0)


@METHODS.register("fis")
class FIS(Method):
    """Reweights each sample's loss by its own difficulty and its group's loss shift."""

    Params = FISParams
    params: FISParams

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        y, groups = batch["label"], batch["group"]
        p = self.params
        per_sample = nn.functional.cross_entropy(out.logits.float(), y, reduction="none")  # (B,)
        losses = per_sample.detach()
        B = losses.shape[0]
        w_ind = B * torch.softmax(losses / p.temperature, dim=0)  # (B,)

        masks = group_masks(groups, self.n_groups)  # (B, G)
        known = masks.any(1)  # (B,)
        distance = sinkhorn_costs(losses, masks, known, p.blur**2, p.iterations)  # (G,)
        count = masks.sum(0)  # (G,)
        logits = torch.where(count > 0, distance / p.temperature, float("-inf"))
        share = torch.softmax(logits, dim=0)  # (G,)
        share = torch.nan_to_num(share)  # no known group at all: every share 0
        per_group = known.sum() * share / count.clamp_min(1)  # (G,) weight of one sample
        w_grp = torch.where(known, masks.float() @ per_group, 1.0)  # (B,)

        weight = (1 - p.mix) * w_ind + p.mix * w_grp
        task = (weight * per_sample).mean()
        aux = sum(nn.functional.cross_entropy(u.float(), y) for u in out.aux_logits.values())
        signals = {f"sinkhorn/{g}": distance[g] for g in range(self.n_groups)}
        signals.update({f"group_share/{g}": share[g] for g in range(self.n_groups)})
        return LossOutput(task + aux, {"task": task.detach(), "aux": aux.detach()}, signals)
