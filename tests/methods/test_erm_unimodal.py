"""`erm`, `unimodal`, the `grad_factor` control, and the AdamW control of method.md section 6."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_ctx, tiny_batch, tiny_model
from torch import nn

from multifair.errors import UserError
from multifair.methods import METHODS, build_method
from multifair.methods.base import Method

MODS = ["a", "b"]


def test_erm_loss_is_task_plus_auxiliary_ce_and_reaches_every_parameter() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=1)
    method = build_method("erm", None, MODS, 3)
    ctx = make_ctx(model, 3)
    out = method(model, batch)
    loss = method.loss(out, batch, ctx)
    y = batch["label"]
    task = nn.functional.cross_entropy(out.logits, y)
    aux = sum(nn.functional.cross_entropy(u, y) for u in out.aux_logits.values())
    torch.testing.assert_close(loss.total, task + aux)
    method.backward(loss, out, batch, ctx)
    assert all(p.grad is not None for p in model.parameters())
    # The auxiliary CE trains only the auxiliary heads: without it the encoders' gradient is
    # the same.
    grads = [p.grad.clone() for ps in model.modality_parameters().values() for p in ps]
    model.zero_grad()
    nn.functional.cross_entropy(model(batch).logits, y).backward()
    plain = [p.grad for ps in model.modality_parameters().values() for p in ps]
    assert all(torch.allclose(g, h) for g, h in zip(grads, plain))


def test_unimodal_builds_the_model_with_one_modality() -> None:
    cls = METHODS.get("unimodal")
    assert cls.model_modalities(cls.Params(modality="b"), MODS) == ["b"]
    assert cls.model_modalities(cls.Params(), MODS) == ["a"]  # default: the first modality
    with pytest.raises(UserError, match=r"modality 'c' not found\. Available: \['a', 'b'\]"):
        cls.model_modalities(cls.Params(modality="c"), MODS)
    with pytest.raises(UserError, match="unknown key"):
        build_method("unimodal", {"modalty": "a"}, MODS, 2)
    # Built from the dataset's list or from the model's reduced list: the same method.
    for given in (MODS, ["b"]):
        method = build_method("unimodal", {"modality": "b"}, given, 2)
        assert method.modalities == ["b"]
    model = tiny_model(["b"])
    batch = tiny_batch(["b"], seed=2)
    method = build_method("unimodal", {"modality": "b"}, ["b"], 2)
    loss = method.loss(method(model, batch), batch, make_ctx(model, 2))
    loss.total.backward()
    assert list(model.modality_parameters()) == ["b"]
    assert all(p.grad is not None for p in model.parameters())


def test_grad_factor_scales_named_encoder_gradients_only() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=3)
    method = build_method("grad_factor", {"factors": {"a": 0.25}}, MODS, 3)
    assert "factor" not in method.state_dict()  # from the config, not the checkpoint
    ctx = make_ctx(model, 3)
    out = method(model, batch)
    loss = method.loss(out, batch, ctx)
    method.backward(loss, out, batch, ctx)
    before = {id(p): p.grad.clone() for p in model.parameters()}
    method.modulate_gradients(model, loss, ctx)
    scaled = {id(p) for p in model.modality_parameters()["a"]}
    for p in model.parameters():
        expected = before[id(p)] * (0.25 if id(p) in scaled else 1.0)
        torch.testing.assert_close(p.grad, expected)
    assert method.lr_factors(loss, ctx) is None
    with pytest.raises(UserError, match="unknown modality 'c'"):
        build_method("grad_factor", {"factors": {"c": 2.0}}, MODS, 3)
    with pytest.raises(UserError, match="factors"):
        build_method("grad_factor", {"factors": {"a": -1.0}}, MODS, 3)


# ---- the AdamW control (method.md section 6) -----------------------------------------------
def train_updates(
    name: str, params: dict[str, Any], steps: int, clip: float | None
) -> list[torch.Tensor]:
    """Train a fresh tiny model (same init, same batches) with the trainer's protocol and
    optimizer layout: AdamW, one param group per modality encoder (model.modality_parameters())
    plus one for the rest; gradient edits, then clipping, then lr = base lr * lr factor.
    Returns encoder a's update size ||theta_a(t+1) - theta_a(t)|| per step."""
    model = tiny_model(MODS, seed=0)
    method: Method = build_method(name, params, MODS, 3)
    encoders = model.modality_parameters()
    taken = {id(p) for ps in encoders.values() for p in ps}
    rest = [p for p in model.parameters() if id(p) not in taken]
    base_lr = 1e-3
    optimizer = torch.optim.AdamW(
        [{"params": encoders[m], "modality": m} for m in MODS] + [{"params": rest}],
        lr=base_lr,
        weight_decay=6e-3,
    )
    sizes = []
    for step in range(steps):
        batch = tiny_batch(MODS, seed=100 + step, size=32)
        ctx = make_ctx(model, 3, step)
        optimizer.zero_grad()
        out = method(model, batch)
        loss = method.loss(out, batch, ctx)
        method.backward(loss, out, batch, ctx)
        method.modulate_gradients(model, loss, ctx)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        factors = method.lr_factors(loss, ctx) or {}
        for group in optimizer.param_groups:
            factor = factors.get(group.get("modality"), 1.0)
            group["lr"] = base_lr * float(factor)
        before = torch.cat([p.detach().flatten() for p in encoders["a"]])
        optimizer.step()
        after = torch.cat([p.detach().flatten() for p in encoders["a"]])
        sizes.append((after - before).norm())
    return sizes


def test_adamw_cancels_a_constant_gradient_factor_but_not_a_step_size_factor() -> None:
    steps = 12
    plain = torch.stack(train_updates("erm", {}, steps, clip=None))
    on_grad = torch.stack(train_updates("grad_factor", {"factors": {"a": 0.5}}, steps, clip=None))
    on_lr = torch.stack(train_updates("lr_split", {"factors": {"a": 0.5}}, steps, clip=None))
    grad_ratio = on_grad / plain  # (steps,)
    lr_ratio = on_lr / plain
    # x0.5 on the gradient: Adam divides it out (m and sqrt(v) both halve); only eps remains.
    torch.testing.assert_close(grad_ratio, torch.ones(steps), atol=1e-3, rtol=0)
    # x0.5 on the step size: the first update is exactly half, and it stays about half.
    assert float(lr_ratio[0]) == pytest.approx(0.5, abs=1e-4)
    assert 0.4 < float(lr_ratio.mean()) < 0.6
    assert float(lr_ratio.max()) < 0.75


def test_adamw_control_holds_with_clipping_at_the_released_norm() -> None:
    """With clip 0.8 (the released setting) the gradient factor changes the clip coefficient,
    so it is no longer an exact no-op, but it stays far from the step-size factor's effect."""
    steps = 12
    plain = torch.stack(train_updates("erm", {}, steps, clip=0.8))
    on_grad = torch.stack(train_updates("grad_factor", {"factors": {"a": 0.5}}, steps, clip=0.8))
    on_lr = torch.stack(train_updates("lr_split", {"factors": {"a": 0.5}}, steps, clip=0.8))
    assert 0.9 < float((on_grad / plain).mean()) < 1.1
    assert 0.4 < float((on_lr / plain).mean()) < 0.6
