"""One shared per-modality prediction estimator for the baselines that need "what does modality
m alone predict?" (OGM-GE, MMPareto, DGL; spec baselines.md).

Two estimators, chosen per method by its `estimator` parameter:

- "aux": the auxiliary head on the modality's feature, C_m(h_m) (CGGM / MMPareto style). The
  model already computes C_m(stopgrad(h_m)) in every forward, so the detached estimate is free.
- "zero_others": zero every other modality's token and re-run fusion + head, z_m =
  head(fusion(h with only m present)). No extra parameters; M extra fusion + head passes, which
  are small next to the encoders. This is the closest analogue of OGM-GE's "this modality's
  share of the fused linear layer" for a non-linear (attention) fusion.

`grad` says whether the estimate must carry gradient:
- False: a training signal (scores, ratios); nothing is built for backward.
- True: a unimodal loss that trains the modality's encoder (MMPareto, DGL). With "aux" the
  loss also trains C_m; with "zero_others" it also reaches fusion + head - a method that must
  keep it out of them (DGL) routes it through h_m only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from multifair.methods.base import ModelOutput, StepContext
from multifair.methods.signals import unwrap_model

Estimator = Literal["aux", "zero_others"]


def require_model(ctx: StepContext) -> nn.Module:
    """The (unwrapped) model from the step context; the trainer always sets it."""
    return unwrap_model(ctx.model)


def unimodal_logits(
    model: nn.Module, out: ModelOutput, estimator: Estimator, *, grad: bool
) -> dict[str, Tensor]:
    """Per-modality logits {m: (B, C)} from one forward's features (see the module docstring)."""
    if estimator == "aux":
        if grad:
            return {m: model.aux_heads[m](h) for m, h in out.features.items()}
        return {m: u.detach() for m, u in out.aux_logits.items()}
    if estimator != "zero_others":
        raise ValueError(f"unknown estimator {estimator!r}")
    modalities = list(out.features)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        features = out.features if grad else {m: h.detach() for m, h in out.features.items()}
        logits = {}
        for m in modalities:
            present = {j: j == m for j in modalities}
            _, logits[m] = model.fuse(features, present)  # (B, C)
    return logits


def true_class_score(logits: Tensor, labels: Tensor) -> Tensor:
    """softmax(logits)[y] per sample: (B, C), (B,) -> (B,)."""
    return torch.softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)


def ratio_to_others(scores: Tensor, reduce: Literal["min", "max"]) -> Tensor:
    """r_m = s_m / (min or max over the other modalities of s_j). scores (M,) -> (M,).

    For two modalities both reductions give s_1 / s_2 and s_2 / s_1. With one modality there
    is nothing to compare with and the ratio is 1.
    """
    n = scores.shape[0]
    if n == 1:
        return torch.ones_like(scores)
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    fill = float("inf") if reduce == "min" else float("-inf")
    others = torch.where(eye, torch.full_like(scores, fill)[None, :], scores[None, :])  # (M, M)
    ref = others.amin(dim=1) if reduce == "min" else others.amax(dim=1)  # (M,)
    return scores / ref.clamp_min(1e-12)
