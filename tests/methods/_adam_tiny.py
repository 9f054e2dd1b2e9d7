"""A tiny real multimodal model satisfying the `MultimodalClassifier` contract
(docs/architecture.md), synthetic batches, and a loop that drives a method's hooks exactly
as the trainer's contract says: one AdamW param group per modality encoder plus one for the
rest, lr = scheduled_lr * factor set every step AFTER the scheduler, clipping after gradient
edits. Used by the step-size tests (multifair_adam, lr_split), independent of the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from multifair.methods.base import Method, ModelOutput, StepContext


class TinyMultimodal(nn.Module):
    """Per-modality MLP encoders -> h_m (B, d); concat fusion -> head; aux heads on detached h."""

    def __init__(self, in_dims: Mapping[str, int], dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.modalities = list(in_dims)
        self.n_classes = 2
        self.dim = dim
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, dim))
                for m, k in in_dims.items()
            }
        )
        self.fusion = nn.Sequential(nn.Linear(dim * len(self.modalities), dim), nn.GELU())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(dim, self.n_classes))
        self.aux_heads = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, self.n_classes))
                for m in self.modalities
            }
        )

    def encode(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return {m: self.encoders[m](batch[m]) for m in self.modalities}  # (B, d) each

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        features = self.encode(batch)
        fused = self.fusion(torch.cat([features[m] for m in self.modalities], dim=1))  # (B, d)
        head_input = self.head[0](fused)
        logits = self.head[1](head_input)  # (B, 2)
        aux = {m: self.aux_heads[m](h.detach()) for m, h in features.items()}
        return ModelOutput(logits, features, aux, head_input)

    def aux_last_layer(self, modality: str) -> nn.Linear:
        return self.aux_heads[modality][-1]

    def head_last_layer(self) -> nn.Linear:
        return self.head[1]

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {m: list(self.encoders[m].parameters()) for m in self.modalities}

    def other_parameters(self) -> list[nn.Parameter]:
        return [*self.fusion.parameters(), *self.head.parameters()]

    def aux_parameters(self) -> list[nn.Parameter]:
        return list(self.aux_heads.parameters())


def make_batches(
    n_batches: int, batch_size: int = 32, seed: int = 0, lag_signal: float = 1.0
) -> list[dict[str, Any]]:
    """Modality "lead": a strong linear cue. Modality "lag": a nonlinear (XOR-like) cue of
    strength `lag_signal` (0 = pure noise). Groups 0/1/2 with shares 0.7/0.2/0.1."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        y = (torch.rand(batch_size, generator=g) < 0.5).long()
        sign = (2 * y - 1).float()  # (B,)
        lead = torch.randn(batch_size, 4, generator=g)
        lead[:, 0] += 1.5 * sign
        lag = torch.randn(batch_size, 4, generator=g)
        xor = lag[:, 0].abs() * torch.sign(lag[:, 1]) * sign  # sign(x0 * x1) = label sign
        lag[:, 0] = lag_signal * xor + (1 - lag_signal) * lag[:, 0]
        u = torch.rand(batch_size, generator=g)
        group = (u > 0.7).long() + (u > 0.9).long()
        batches.append(
            {
                "lead": lead,
                "lag": lag,
                "label": y,
                "group": group,
                "attributes": {"race": group},
                "sample_id": [f"s{i}" for i in range(batch_size)],
                "index": torch.arange(batch_size),
            }
        )
    return batches


def make_context(step: int, total_steps: int, n_groups: int, model: nn.Module) -> StepContext:
    """A single-process StepContext (gather and scale are the identity, as without DDP/fp16)."""
    return StepContext(
        step=step,
        epoch=0,
        total_steps=total_steps,
        n_groups=n_groups,
        gather=lambda t: t,
        scale=lambda t: t,
        model=model,
    )


def build_optimizer(
    model: TinyMultimodal, method: Method, lr: float, weight_decay: float = 0.01
) -> tuple[torch.optim.AdamW, list[str | None]]:
    """One AdamW group per modality encoder (exactly model.modality_parameters()) + the rest.
    Returns the optimizer and each group's modality (None for the rest)."""
    groups = [{"params": ps, "lr": lr} for ps in model.modality_parameters().values()]
    rest = [*model.other_parameters(), *model.aux_parameters(), *method.parameters()]
    groups.append({"params": rest, "lr": lr})
    names: list[str | None] = [*model.modality_parameters(), None]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay), names


def train_steps(
    method: Method,
    model: TinyMultimodal,
    batches: list[dict[str, Any]],
    *,
    lr: float = 1e-2,
    clip: float = 0.8,
    grad_factors: Mapping[str, float] | None = None,
    n_groups: int = 3,
) -> list[dict[str, float]]:
    """Run one optimisation step per batch with the trainer's hook order; return, per step,
    each encoder's update norm ||theta_after - theta_before|| ("update_norm/<m>") and the
    factors used. `grad_factors` multiplies encoder gradients (the gradient-scaling control)."""
    optimizer, names = build_optimizer(model, method, lr)
    enc = model.modality_parameters()
    total = len(batches)
    log = []
    for step, batch in enumerate(batches):
        ctx = make_context(step, total, n_groups, model)
        scheduled = lr * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule
        before = {m: [p.detach().clone() for p in ps] for m, ps in enc.items()}
        out = method.forward(model, batch)
        loss = method.loss(out, batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        method.backward(loss, out, batch, ctx)
        method.modulate_gradients(model, loss, ctx)
        for m, factor in (grad_factors or {}).items():
            for p in enc[m]:
                p.grad.mul_(factor)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
        factors = method.lr_factors(loss, ctx)
        for group, name in zip(optimizer.param_groups, names):
            factor = 1.0 if factors is None or name is None else float(factors[name])
            group["lr"] = scheduled * factor
        optimizer.step()
        row = {}
        for m, ps in enc.items():
            sq = sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[m]))
            row[f"update_norm/{m}"] = float(torch.as_tensor(sq).sqrt())
            row[f"lr_factor/{m}"] = 1.0 if factors is None else float(factors[m])
        log.append(row)
    return log
