"""`cggm`: Classifier-Guided Gradient Modulation (Guo et al., NeurIPS 2024; MultiFair's ancestor).

Auxiliary classifiers C_m on h_m (the model's auxiliary heads, trained on detached features)
measure how much each modality is improving. Per step:

    acc_m = batch accuracy of C_m                    (global batch under DDP; acc_m(0) = 0)
    d_m   = acc_m(t) - acc_m(t-1)
    k_m   = (sum_j d_j - d_m) / sum_j d_j            (the modality that improved less gets more)
    grad(theta_m) <- rho * k_m * grad(theta_m)

plus a direction term on the output layers,

    L_gm = (1/M) sum_m ( |k_m| - k_m cos(g_m, g_F) )

where g_m is the gradient of CE(C_m) w.r.t. C_m's last linear weight (detached) and g_F the
gradient of the task CE w.r.t. the fused head's last linear weight, kept differentiable through
its closed form (softmax(z) - onehot(y))^T a / B, a = that layer's input. The released code
compares the two layers' WEIGHTS (not gradients) from the PREVIOUS step; we do what the paper
says: this step's gradients. L = CE(z, y) + lambda_gm * L_gm (+ the auxiliary heads' CE).

k_m is unbounded and changes sign when one modality's accuracy drops (d_m < 0): that is the
paper's rule. Where sum_j d_j = 0 (exactly: accuracies move in steps of 1/B) we use (M - 1) / M, the value k takes when all modalities
improve equally (the released code divides by sum + 1e-8 and explodes there). `clamp` bounds
rho * k_m; use it with `factor_on: step_size`, where a negative or huge factor becomes a
negative or huge learning rate (clipping bounds a gradient, not a step size) - so step_size
mode requires it (e.g. `clamp: [0, 2]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
)
from multifair.methods.estimators import require_model
from multifair.methods.signals import apply_encoder_factors, onehot, unwrap_model


class CGGMParams(MethodParams):
    rho: float = Field(1.3, gt=0)  # gradient scale
    lambda_gm: float = Field(0.1, ge=0)  # weight of the direction term (paper: 0.05 - 0.2)
    clamp: tuple[float, float] | None = None  # bounds on rho * k_m (None: the paper's rule)
    factor_on: Literal["gradient", "step_size"] = "gradient"

    @model_validator(mode="after")
    def _bounded_step_size(self) -> CGGMParams:
        if self.factor_on == "step_size" and self.clamp is None:
            raise ValueError(
                "factor_on=step_size needs clamp (e.g. [0, 2]): k_m is unbounded and can be "
                "negative, which would become a negative or huge learning rate"
            )
        if self.clamp is not None and self.clamp[0] > self.clamp[1]:
            raise ValueError(f"clamp: low > high ({list(self.clamp)})")
        return self


def head_weight_gradient(logits: Tensor, labels: Tensor, head_input: Tensor) -> Tensor:
    """d CE(z, y) / d W of the head's last linear layer, z = a W^T + b, in closed form:
    (softmax(z) - onehot(y))^T a / B -> (C, d), differentiable w.r.t. z and a."""
    residual = torch.softmax(logits.float(), dim=-1) - onehot(labels, logits.shape[-1])  # (B, C)
    return residual.T @ head_input.float() / logits.shape[0]  # (C, d)


@METHODS.register("cggm")
class CGGM(Method):
    """Scales encoder m's gradient by rho * k_m from the auxiliary heads' accuracy gains, and
    aligns the fused head's gradient direction with the auxiliary heads' (L_gm)."""

    Params = CGGMParams
    params: CGGMParams

    def __init__(self, params: CGGMParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        self.register_buffer("prev_acc", torch.zeros(len(modalities)))  # acc_m(t-1)

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        y = batch["label"]
        model = require_model(ctx)
        task = nn.functional.cross_entropy(out.logits.float(), y)
        aux_losses = [nn.functional.cross_entropy(out.aux_logits[m].float(), y) for m in self.modalities]  # fmt: skip

        # k_m from the auxiliary heads' accuracy improvement (global batch)
        acc = torch.stack(
            [
                ctx.gather((out.aux_logits[m].detach().argmax(-1) == y).float()).mean()
                for m in self.modalities
            ]
        )  # (M,)
        d = acc - self.prev_acc  # (M,)
        if ctx.advance:  # once per optimisation step (gradient accumulation)
            self.prev_acc.copy_(acc)
        total_d = d.sum()
        M = len(self.modalities)
        # accuracy steps are multiples of 1 / batch size, so |sum| < 1e-6 means "exactly 0"
        moved = total_d.abs() > 1e-6
        k = torch.where(
            moved, (total_d - d) / torch.where(moved, total_d, 1.0), (M - 1) / M
        )  # (M,)

        # direction term: cos(g_m, g_F) with g_F differentiable
        g_fused = head_weight_gradient(out.logits, y, out.head_input)  # (C, d)
        cos = []
        for m, aux_loss in zip(self.modalities, aux_losses):
            weight = model.aux_last_layer(m).weight
            (g_m,) = torch.autograd.grad(aux_loss, weight, retain_graph=True)  # (C, d)
            cos.append(nn.functional.cosine_similarity(g_m.flatten(), g_fused.flatten(), dim=0))
        cos_t = torch.stack(cos)  # (M,)
        l_gm = (k.abs() - k * cos_t).mean()

        total = task + self.params.lambda_gm * l_gm + sum(aux_losses)
        factor = self.params.rho * k
        if self.params.clamp is not None:
            factor = factor.clamp(*self.params.clamp)
        parts = {"task": task.detach(), "aux": sum(aux_losses).detach(), "gm": l_gm.detach()}
        signals = {}
        for i, m in enumerate(self.modalities):
            signals[f"acc/{m}"] = acc[i]
            signals[f"k/{m}"] = k[i]
            signals[f"cos/{m}"] = cos_t[i].detach()
            signals[f"factor/{m}"] = factor[i]
        return LossOutput(total, parts, signals)

    def factors(self, loss: LossOutput) -> dict[str, Tensor]:
        """rho * k_m (clamped when asked) of this step, read back from the loss signals."""
        return {m: loss.signals[f"factor/{m}"] for m in self.modalities}

    def modulate_gradients(
        self, model: nn.Module, loss: LossOutput, ctx: StepContext
    ) -> dict[str, Tensor]:
        if self.params.factor_on == "gradient":
            apply_encoder_factors(unwrap_model(model).modality_parameters(), self.factors(loss))
        return {}

    def lr_factors(self, loss: LossOutput, ctx: StepContext) -> dict[str, Tensor] | None:
        return self.factors(loss) if self.params.factor_on == "step_size" else None
