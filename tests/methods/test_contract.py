"""The contract every registered method keeps (timm's "test over every registered model").

For each name in METHODS: build it with its default hyper-parameters, run its epoch-start hook
and ONE optimisation step through the trainer's real `train_step` (hooks in protocol order,
AdamW groups, clipping after edits) on the real model with tiny MLP encoders, then check:
- the loss is finite and every trainable parameter (model and method) got a finite gradient;
- every encoder got a non-zero gradient (no method silently freezes a modality);
- lr factors, when returned, are finite and name only the model's modalities;
- the state dict round-trips: a fresh method loaded from it has the same buffers and computes
  the same loss on the next batch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_ctx, one_step, tiny_batch, tiny_model
from torch import nn

import multifair.methods  # noqa: F401  (registers every method)
from multifair.methods.base import METHODS, Method, StepContext, build_method
from multifair.training.config import TrainConfig
from multifair.training.trainer import build_optimizer

MODS = ["a", "b"]
G = 3


def make_method(name: str, model: nn.Module, modalities: list[str]) -> Method:
    method = build_method(name, {}, modalities, G)
    method.setup(model)
    return method


def epoch_ctx(model: nn.Module, batches: list[dict[str, Any]]) -> StepContext:
    ctx = make_ctx(model, G)
    ctx.extras["train_batches"] = batches
    return ctx


@pytest.mark.parametrize("name", METHODS.names())
def test_one_step_contract(name: str) -> None:
    cls = METHODS.get(name)
    modalities = cls.model_modalities(cls.Params(), MODS)
    model = tiny_model(modalities)
    method = make_method(name, model, modalities)
    batch = tiny_batch(MODS, size=24, n_groups=G, seed=1)  # the dataset's batch: every modality
    ctx = epoch_ctx(model, [batch, tiny_batch(MODS, size=24, n_groups=G, seed=2)])

    model.train()
    method.train()
    assert isinstance(method.on_epoch_start(ctx), dict)
    optimizer, groups = build_optimizer(model, method, TrainConfig(lr=1e-3), torch.device("cpu"))
    result = one_step(
        batch, model=model, method=method, optimizer=optimizer, groups=groups, ctx=ctx
    )
    assert isinstance(method.on_epoch_end(ctx), dict)

    assert torch.isfinite(result.loss.total), f"{name}: non-finite loss"
    assert result.loss.total.dim() == 0
    for part, value in result.loss.parts.items():
        assert not value.requires_grad, f"{name}: loss part {part!r} is not detached"
    trainable = [*model.named_parameters(), *(("method." + n, p) for n, p in method.named_parameters())]  # fmt: skip
    missing = [n for n, p in trainable if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without a gradient: {missing}"
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients: {bad}"
    for m, params in model.modality_parameters().items():
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params))
        assert norm > 0, f"{name}: encoder {m!r} got a zero gradient"
    factors = {k[len("lr_factor/") :]: v for k, v in result.stats.items() if k.startswith("lr_factor/")}  # fmt: skip
    assert set(factors) <= set(modalities)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in factors.values())

    # state dict round trip: same buffers, then the same loss on the next batch
    state = method.state_dict()
    fresh = make_method(name, model, modalities)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), f"{name}: {key} did not round-trip"
    model.eval()
    method.eval()
    fresh.eval()
    nxt = tiny_batch(MODS, size=24, n_groups=G, seed=3)
    losses = []
    for m_ in (method, fresh):
        torch.manual_seed(0)
        out = m_(model, nxt)
        losses.append(m_.loss(out, nxt, make_ctx(model, G, step=1)).total.detach())
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("name", METHODS.names())
def test_hyperparameters_are_validated(name: str) -> None:
    """An unknown key is a user error naming the key (config.validate over Params)."""
    from multifair.errors import UserError

    with pytest.raises(UserError, match="no_such_key"):
        build_method(name, {"no_such_key": 1}, MODS, G)
