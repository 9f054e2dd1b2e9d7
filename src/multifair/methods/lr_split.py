"""`lr_split`: a constant per-encoder learning-rate split, set by hand - the control for
`multifair_adam` (spec method.md section 7).

lr_i = scheduled_lr * factors[i] on encoder i's optimizer group, every step, nothing else
changed. Given the adaptive method's mean factors (e.g. {fundus: 0.64, oct: 1.36}) it shows
how much of that method's effect a fixed split already buys (in the prototype: two thirds;
the rest is the adaptive part finding which modality lags without being told). Modalities not
named keep factor 1; no factors at all is plain training (`erm`). Its gradient twin is
`grad_factor`, which under AdamW changes (almost) nothing.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat
from torch import Tensor

from multifair.methods.base import METHODS, LossOutput, Method, MethodParams, StepContext
from multifair.methods.signals import constant_factors


class LrSplitParams(MethodParams):
    """`factors`: modality -> constant learning-rate factor (> 0); missing modalities keep 1."""

    factors: dict[str, PositiveFloat] = Field(default_factory=dict)


@METHODS.register("lr_split")
class LrSplit(Method):
    """Constant per-encoder step-size factors: lr_m = scheduled_lr * factors[m]."""

    Params = LrSplitParams
    params: LrSplitParams
    acts_on_step_size = True

    def __init__(self, params: LrSplitParams, modalities: list[str], n_groups: int) -> None:
        super().__init__(params, modalities, n_groups)
        # A buffer, so the factors move to the device with the method (no host copy per step).
        self.register_buffer("factor", constant_factors("lr_split", params.factors, modalities))

    def lr_factors(self, loss: LossOutput, ctx: StepContext) -> dict[str, Tensor]:
        return {m: self.factor[i] for i, m in enumerate(self.modalities)}
