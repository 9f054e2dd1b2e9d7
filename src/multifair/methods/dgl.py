"""`dgl`: Disentangled Gradient Learning (Wei et al., ICCV 2025).

Joint training lets the fused loss's gradient decide what each encoder learns, and the strong
modality then suppresses the weak one's gradient. DGL decouples the two paths:

    L_fused = CE(head(fusion(stopgrad(h_1..h_M))), y)     trains ONLY fusion + head
    L_uni   = alpha * sum_m CE(f_m, y)                    trains ONLY the encoders

f_m is the shared per-modality estimator: "zero_others" (default: the same fusion + head with
the other modalities zeroed) or "aux" (the auxiliary head on h_m). L_uni's gradient is stopped
at h_m: it is backpropagated into everything upstream of h_m (encoder and projection) and
removed from fusion, head and auxiliary heads. The auxiliary heads are trained as in every
method, by their own CE on detached features.

One backward: the gradient of L_uni w.r.t. the features is taken first (autograd.grad, through
fusion + head without accumulating into them), then one backward pass pushes L_fused + L_aux
and those feature gradients together. No host sync.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
from multifair.methods.estimators import Estimator, require_model, unimodal_logits
from multifair.methods.signals import unwrap_model


class DGLParams(MethodParams):
    alpha: float = Field(4.0, ge=0)  # weight of the unimodal losses (paper: ~4)
    estimator: Estimator = "zero_others"


@dataclass
class DGLLoss(LossOutput):
    """LossOutput plus the two paths `backward` sends to different parameters."""

    head_path: Tensor = field(default_factory=lambda: torch.zeros(()))  # L_fused + L_aux
    encoder_path: Tensor = field(default_factory=lambda: torch.zeros(()))  # L_uni


@METHODS.register("dgl")
class DGL(Method):
    """Fused loss trains fusion + head on detached features; unimodal losses train the encoders."""

    Params = DGLParams
    params: DGLParams

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> ModelOutput:  # type: ignore[override]
        # the fused prediction sees detached features: its loss never reaches an encoder
        model = unwrap_model(model)
        features = model.encode(batch)
        detached = {m: h.detach() for m, h in features.items()}
        head_input, logits = model.fuse(detached)
        aux_logits = {m: model.aux_heads[m](h) for m, h in detached.items()}
        return ModelOutput(logits, features, aux_logits, head_input)

    def loss(self, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext) -> LossOutput:
        y = batch["label"]
        fused = nn.functional.cross_entropy(out.logits.float(), y)
        aux = sum(nn.functional.cross_entropy(u.float(), y) for u in out.aux_logits.values())
        logits = unimodal_logits(require_model(ctx), out, self.params.estimator, grad=True)
        unimodal = {m: nn.functional.cross_entropy(logits[m].float(), y) for m in self.modalities}
        encoder_path = self.params.alpha * sum(unimodal.values())
        head_path = fused + aux
        parts = {"task": fused.detach(), "aux": aux.detach()}
        parts.update({f"unimodal/{m}": v.detach() for m, v in unimodal.items()})
        return DGLLoss(
            head_path + encoder_path, parts, {}, head_path=head_path, encoder_path=encoder_path
        )

    def backward(
        self, loss: LossOutput, out: ModelOutput, batch: Mapping[str, Any], ctx: StepContext
    ) -> None:
        assert isinstance(loss, DGLLoss), "dgl.backward needs the loss of dgl.loss"
        features = [out.features[m] for m in self.modalities]
        # d L_uni / d h_m only: nothing accumulates into fusion, head or auxiliary heads
        feature_grads = torch.autograd.grad(
            ctx.scale(loss.encoder_path), features, retain_graph=True, allow_unused=True
        )
        feature_grads = [
            torch.zeros_like(h) if g is None else g for g, h in zip(feature_grads, features)
        ]
        torch.autograd.backward([ctx.scale(loss.head_path), *features], [None, *feature_grads])
