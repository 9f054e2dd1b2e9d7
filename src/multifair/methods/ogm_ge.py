"""`ogm_ge`: On-the-fly Gradient Modulation with Generalization Enhancement (Peng et al., CVPR 2022).

Per step, with f_m the per-modality prediction (shared estimator, default "zero_others": the
fused head with the other modalities zeroed, the analogue of the paper's per-modality share of
the fused linear classifier):

    s_m = sum_batch softmax(f_m)[y]                 (summed over the GLOBAL batch under DDP)
    r_m = s_m / min_{j != m} s_j                    (two modalities: s_1 / s_2)
    k_m = 1 - tanh(alpha * (r_m - 1))   if r_m > 1   (the dominant modality is slowed)
          1                             otherwise
    grad(theta_m) <- k_m * grad(theta_m) + N(0, std(grad(theta_m))^2)     (the GE noise)

only in the epoch window [modulation_starts, modulation_ends] (0-based, inclusive; the
paper's code uses the same inclusive window). The noise is added to every encoder, per
parameter tensor, with the std of that tensor's unmodulated gradient (the reference code's
choice). The released code computes tanh(alpha * relu(r)) instead of tanh(alpha * (r - 1));
we follow the paper's equation (k -> 1 as r -> 1).

`factor_on: step_size` applies k_m to encoder m's learning rate instead of its gradient (Adam
largely cancels a constant gradient factor; spec baselines.md); the GE noise stays on the
gradient. Near-zero cost: M extra fusion + head passes without gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

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
from multifair.methods.estimators import (
    Estimator,
    ratio_to_others,
    require_model,
    true_class_score,
    unimodal_logits,
)
from multifair.methods.signals import apply_encoder_factors, unwrap_model


class OGMGEParams(MethodParams):
    alpha: float = Field(0.5, ge=0)  # modulation strength (paper/README: 0.1 - 0.8)
    modulation_starts: int = Field(0, ge=0)  # first epoch (0-based) with modulation
    modulation_ends: int | None = Field(None, ge=0)  # last epoch with modulation (None: all)
    noise: bool = True  # the GE part; False gives plain OGM
    estimator: Estimator = "zero_others"
    factor_on: Literal["gradient", "step_size"] = "gradient"


@METHODS.register("ogm_ge")
class OGMGE(Method):
    """Slows the dominant modality's encoder by k_m = 1 - tanh(alpha (r_m - 1)), plus GE noise."""

    Params = OGMGEParams
    params: OGMGEParams

    def _active(self, ctx: StepContext) -> bool:
        end = self.params.modulation_ends
        return self.params.modulation_starts <= ctx.epoch and (end is None or ctx.epoch <= end)

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        result = super().loss(out, batch, ctx)  # task CE + auxiliary heads' CE
        y = batch["label"]
        logits = unimodal_logits(require_model(ctx), out, self.params.estimator, grad=False)
        # s_m over the global batch: every rank gets the same k_m
        scores = torch.stack(
            [ctx.gather(true_class_score(logits[m], y)).sum() for m in self.modalities]
        )  # (M,)
        ratio = ratio_to_others(scores, "min")  # (M,)
        k = torch.where(
            ratio > 1, 1 - torch.tanh(self.params.alpha * (ratio - 1)), torch.ones_like(ratio)
        )  # (M,)
        for i, m in enumerate(self.modalities):
            result.signals[f"score/{m}"] = scores[i]
            result.signals[f"ratio/{m}"] = ratio[i]
            result.signals[f"k/{m}"] = k[i]
        return result

    def coefficients(self, loss: LossOutput) -> dict[str, Tensor]:
        """k_m of this step, read back from the loss signals."""
        return {m: loss.signals[f"k/{m}"] for m in self.modalities}

    def modulate_gradients(
        self, model: nn.Module, loss: LossOutput, ctx: StepContext
    ) -> dict[str, Tensor]:
        if not self._active(ctx):
            return {}
        encoders = unwrap_model(model).modality_parameters()
        # the noise std comes from the unmodulated gradient, so draw it before scaling
        noise = {}
        if self.params.noise:
            for params in encoders.values():
                for p in params:
                    if p.grad is not None:
                        std = p.grad.std() if p.grad.numel() > 1 else p.grad.new_zeros(())
                        noise[p] = torch.randn_like(p.grad) * (std + 1e-8)
        if self.params.factor_on == "gradient":
            apply_encoder_factors(encoders, self.coefficients(loss))
        for p, n in noise.items():
            p.grad.add_(n)
        return {}

    def lr_factors(self, loss: LossOutput, ctx: StepContext) -> dict[str, Tensor] | None:
        if self.params.factor_on != "step_size" or not self._active(ctx):
            return None
        return self.coefficients(loss)
