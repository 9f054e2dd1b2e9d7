"""`adversarial`: adversarial debiasing (Zhang, Lemoine & Mitchell, AIES 2018), gradient-reversal form.

An adversary A tries to predict the sensitive attribute from the model's fused prediction; the
model is trained to make that impossible:

    L_adv = CE(A(R_lambda(z) [, onehot(y)]), g)          over samples with a known group
    L     = CE(z, y) + L_adv                              (+ the auxiliary heads' CE)

R_lambda is the identity forward and multiplies the gradient by -lambda_t backward, so one
backward pass trains A to minimise L_adv and the classifier to maximise it (weight lambda_t).
Giving A the label as well ("equalized_odds", default) asks for a prediction that carries no
attribute information beyond the label (equalised odds); without it, none at all (demographic
parity). lambda_t ramps linearly from 0 to `weight` over the first `warmup` share of training
(the adversary first needs to learn something to push against). Zhang et al. also subtract the
projection of the classifier's gradient onto the adversary's; this gradient-reversal version
leaves it out. Reported unstable in medical imaging: keep it as a reference, not a default.

The adversary is a small MLP owned by the method (an nn.Module submodule, trained in the
trainer's "rest" optimizer group), created in `setup` from the model's number of classes.
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
from multifair.methods.signals import group_masks, onehot, unwrap_model


class AdversarialParams(MethodParams):
    weight: float = Field(1.0, ge=0)  # lambda: strength of the reversed gradient
    warmup: float = Field(0.1, ge=0, le=1)  # share of all steps over which lambda ramps up
    equalized_odds: bool = True  # the adversary also sees the label
    hidden: int = Field(32, ge=1)  # width of the adversary's hidden layer


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """Identity forward; gradient multiplied by -strength backward."""
    return _ReverseGradient.apply(x, strength)


@METHODS.register("adversarial")
class Adversarial(Method):
    """ERM plus an attribute adversary on the fused logits, through gradient reversal."""

    Params = AdversarialParams
    params: AdversarialParams

    def __init__(self, params: AdversarialParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        self.adversary: nn.Module | None = None  # created in setup (needs n_classes)

    def setup(self, model: nn.Module) -> None:
        model = unwrap_model(model)
        n_classes = model.n_classes
        width = n_classes * (2 if self.params.equalized_odds else 1)
        device = next(model.parameters()).device
        self.adversary = nn.Sequential(
            nn.Linear(width, self.params.hidden),
            nn.ReLU(),
            nn.Linear(self.params.hidden, max(self.n_groups, 1)),
        ).to(device)

    def strength(self, ctx: StepContext) -> float:
        """lambda_t: linear warm-up over the first `warmup` share of the steps."""
        ramp = self.params.warmup * ctx.total_steps
        return self.params.weight * (min(1.0, ctx.step / ramp) if ramp > 0 else 1.0)

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        if self.adversary is None:
            raise RuntimeError(
                "adversarial: call method.setup(model) before training (the trainer does)"
            )
        result = super().loss(out, batch, ctx)  # task CE + auxiliary heads' CE
        y, groups = batch["label"], batch["group"]
        strength = self.strength(ctx)
        z = reverse_gradient(out.logits.float(), strength)  # (B, C)
        if self.params.equalized_odds:
            z = torch.cat([z, onehot(y, out.logits.shape[-1])], dim=1)  # (B, 2C)
        attr_logits = self.adversary(z)  # (B, G)
        known = group_masks(groups, self.n_groups).any(1).float()  # (B,)
        target = groups.clamp(0, max(self.n_groups - 1, 0))  # in range; unknown masked out
        per_sample = nn.functional.cross_entropy(attr_logits, target, reduction="none")
        adv = (per_sample * known).sum() / known.sum().clamp_min(1)
        correct = (attr_logits.detach().argmax(-1) == groups).float()
        result.total = result.total + adv
        result.parts["adversary"] = adv.detach()
        result.signals["adversary_acc"] = (correct * known).sum() / known.sum().clamp_min(1)
        result.signals["adversary_strength"] = out.logits.new_full((), strength).float()
        return result
