"""Plain joint training (ERM), and the constant-gradient-multiplier control.

`erm`: the task CE on the fused logits plus the auxiliary heads' CE (which trains only the
auxiliary heads: they see detached features). Every other method is measured against it.

`grad_factor`: ERM with a fixed per-modality multiplier on each encoder's gradient (after
unscaling, before clipping, exactly where MultiFair's factors act). It is the control of
method.md section 6: under AdamW a constant gradient multiplier is a no-op up to Adam's eps,
so a gradient-modulation method that ties with it is not doing anything. Its step-size twin is
`lr_split` (the same factors on each encoder's learning rate), which does change the update.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat
from torch import Tensor, nn

from multifair.methods.base import METHODS, LossOutput, Method, MethodParams, StepContext
from multifair.methods.signals import apply_encoder_factors, constant_factors, unwrap_model


@METHODS.register("erm")
class ERM(Method):
    """Plain joint training: the base `Method` behaviour, registered under its own name."""

    supports_missing = True  # the auxiliary CE is over the samples that have the modality


class GradFactorParams(MethodParams):
    """`factors`: modality -> constant gradient multiplier (> 0); missing modalities keep 1."""

    factors: dict[str, PositiveFloat] = Field(default_factory=dict)


@METHODS.register("grad_factor")
class GradFactor(Method):
    """ERM with grad(theta_m) *= c_m on every encoder parameter of modality m."""

    Params = GradFactorParams
    params: GradFactorParams

    def __init__(self, params: GradFactorParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        # A buffer, so the factors move to the device with the method (no host copy per step).
        factor = constant_factors("grad_factor", params.factors, modalities)
        self.register_buffer("factor", factor, persistent=False)

    def modulate_gradients(
        self, model: nn.Module, loss: LossOutput, ctx: StepContext
    ) -> dict[str, Tensor]:
        factors = {m: self.factor[i] for i, m in enumerate(self.modalities)}
        apply_encoder_factors(unwrap_model(model).modality_parameters(), factors)
        return {}
