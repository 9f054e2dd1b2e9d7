"""`groupdro`: Group Distributionally Robust Optimisation (Sagawa et al., ICLR 2020).

Minimises the worst group's loss through an online mirror-ascent weight q on the groups:

    loss_g = mean CE over the batch's samples of group g      (0 for a group absent from the batch)
    q_g    <- q_g * exp(eta * loss_g);  q <- q / sum(q)         (before the loss, as in the paper)
    L      = sum_g q_g loss_g                                   (+ the auxiliary heads' CE)

Groups are the training attribute's codes ("attribute") or (attribute, label) pairs
("attribute_label", 2 G groups). Samples with an unknown group (-1) are in no group and do not
enter L. The q update uses the group losses of the GLOBAL batch (identical on every rank); q
is a buffer, so it is checkpointed. Nearly free. The paper notes GroupDRO only helps with
strong regularisation (weight decay) or early stopping - which our selection by validation
provides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from multifair.errors import UserError
from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
    aux_loss,
)
from multifair.methods.signals import group_masks


class GroupDROParams(MethodParams):
    eta: float = Field(0.01, ge=0)  # step size of the group weights
    groups: Literal["attribute", "attribute_label"] = "attribute"


@METHODS.register("groupdro")
class GroupDRO(Method):
    """Weights each group's loss by q_g, which grows exponentially with that group's loss."""

    Params = GroupDROParams
    supports_missing = True  # auxiliary CE over the samples that have the modality
    params: GroupDROParams

    @classmethod
    def check_classes(cls, params: MethodParams, n_classes: int) -> None:
        assert isinstance(params, GroupDROParams)
        if n_classes != 2 and params.groups == "attribute_label":
            raise UserError(
                f"method 'groupdro' with groups: attribute_label pairs each group with a 0/1 "
                f"label (2 G groups); the data has {n_classes} classes: use groups: attribute"
            )

    def __init__(self, params: GroupDROParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        self.n_dro_groups = n_groups * (2 if params.groups == "attribute_label" else 1)
        self.register_buffer("q", torch.full((self.n_dro_groups,), 1.0 / self.n_dro_groups))

    def group_codes(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B,) DRO group of each sample; -1 where the attribute is unknown."""
        g = batch["group"]
        if self.params.groups == "attribute":
            return g
        return torch.where(g >= 0, g * 2 + batch["label"], -1)

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        y = batch["label"]
        per_sample = nn.functional.cross_entropy(out.logits.float(), y, reduction="none")  # (B,)
        member = group_masks(self.group_codes(batch), self.n_dro_groups).float()  # (B, G)
        sums = member.T @ per_sample  # (G,)
        counts = member.sum(0)  # (G,)
        group_loss = sums / counts.clamp_min(1)  # (G,) local, attached

        # q update from the global batch's group losses (detached)
        stats = ctx.gather(torch.stack([sums.detach(), counts])[None]).sum(0)  # (2, G)
        global_loss = stats[0] / stats[1].clamp_min(1)
        q = self.q * torch.exp(self.params.eta * global_loss)
        self.q.copy_(q / q.sum())

        q = self.q.clone()  # a snapshot for the log: the buffer moves on next step
        robust = (q * group_loss).sum()
        aux = aux_loss(out, batch)  # each C_m on the samples that have m
        parts = {"task": per_sample.mean().detach(), "robust": robust.detach(), "aux": aux.detach()}
        signals = {f"q/{g}": q[g] for g in range(self.n_dro_groups)}
        signals.update({f"group_loss/{g}": global_loss[g] for g in range(self.n_dro_groups)})
        return LossOutput(robust + aux, parts, signals)
