"""`fin`: Fair Identity Normalization (Harvard-GF, Luo et al. 2023).

A learnable mean mu_g and scale sigma_g per group normalise the fused feature z (the input of
the head's last linear layer) before the classifier:

    z' = (1 - beta) * (z - mu_g) / (softplus(sigma_g) + eps) + beta * z,   g = the sample's group
    logits = W z' + b

with beta = 0.3 (the reference code's `momentum`), mu ~ N(0, 0.01^2) and sigma ~ N(0, 1) at
initialisation, eps = 1e-6. mu and sigma are trained with the model by the task loss (the
trainer puts the method's parameters in the "rest" optimizer group). A sample with an unknown
group (-1) passes through unchanged.

NEEDS THE SENSITIVE ATTRIBUTE AT TEST TIME: the prediction for a patient depends on the group
it is told the patient belongs to (`uses_attribute_at_test = True`; every table it appears in
says so). The evaluation must therefore call `method.forward(model, batch)` with
`batch["group"]` set, as `training.inference.predict` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from multifair.methods.base import METHODS, Method, MethodParams, ModelOutput
from multifair.methods.group_fusion import (
    GroupFusionParams,
    GroupStacking,
    GroupStackingHook,
    SharedStacking,
    build_stacking,
    check_fusion_classes,
)
from multifair.methods.signals import group_masks, unwrap_model


class FINParams(GroupFusionParams):
    beta: float = Field(0.3, ge=0, le=1)  # share of the un-normalised feature kept
    mu_std: float = Field(0.01, ge=0)  # init std of mu_g
    sigma_std: float = Field(1.0, ge=0)  # init std of sigma_g (softplus-ed)
    # group_fusion: stacking (GroupFusionParams): after selection, also fit each group's
    # recombination of the fused and modality margins (methods/group_fusion.py, as in
    # multifair_adam)


class FairIdentityNormalizer(nn.Module):
    """Per-group affine normalisation of a (B, d) feature."""

    def __init__(self, n_groups: int, dim: int, params: FINParams, eps: float = 1e-6) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(n_groups, dim) * params.mu_std)  # (G, d)
        self.sigma = nn.Parameter(torch.randn(n_groups, dim) * params.sigma_std)  # (G, d)
        self.beta = params.beta
        self.eps = eps

    def forward(self, z: Tensor, groups: Tensor) -> Tensor:
        z = z.float()
        member = group_masks(groups, self.mu.shape[0]).float()  # (B, G), unknown: no row
        mu = member @ self.mu  # (B, d) the sample's group mean
        scale = member @ (nn.functional.softplus(self.sigma) + self.eps)  # (B, d)
        known = member.sum(1, keepdim=True) > 0  # (B, 1)
        normalised = (z - mu) / torch.where(known, scale, torch.ones_like(scale))
        out = (1 - self.beta) * normalised + self.beta * z  # (B, d)
        return torch.where(known, out, z)


@METHODS.register("fin")
class FIN(GroupStackingHook, Method):
    """Group-specific normalisation of the fused feature; uses the attribute at test time."""

    Params = FINParams
    params: FINParams
    uses_attribute_at_test = True

    def __init__(self, params: FINParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        self.normalizer: FairIdentityNormalizer | None = None  # created in setup (needs d)
        self.group_stack: GroupStacking | SharedStacking | None = None
        self.fits_after_selection = params.group_fusion != "off"

    @classmethod
    def check_classes(cls, params: MethodParams, n_classes: int) -> None:
        check_fusion_classes("fin", params, n_classes)  # FIN itself trains K classes

    def setup(self, model: nn.Module) -> None:
        model = unwrap_model(model)
        device = next(model.parameters()).device
        self.normalizer = FairIdentityNormalizer(self.n_groups, model.dim, self.params).to(device)
        if self.params.group_fusion != "off":
            self.group_stack = build_stacking(model, self.n_groups, "fin", self.params.group_fusion)

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> ModelOutput:  # type: ignore[override]
        if self.normalizer is None:
            raise RuntimeError("fin: call method.setup(model) before training (the trainer does)")
        model = unwrap_model(model)
        out = model(batch)
        z = self.normalizer(out.head_input, batch["group"])  # (B, d)
        logits = model.head_last_layer()(z)  # (B, C)
        if self.group_stack is not None and not self.training:  # post hoc, fitted on validation
            logits = self.group_stack(logits, out.aux_logits, batch["group"])
        return ModelOutput(logits, out.features, out.aux_logits, z)
