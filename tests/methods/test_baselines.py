"""Behaviour of the baseline methods (spec baselines.md): each test checks a method's defining
rule on a fixed batch against an independent computation (autograd on a separate graph, numpy,
or the paper's formula written out).

The model is the project's real MultimodalClassifier with tiny MLP encoders (conftest.py),
dropout 0, so two forward passes of the same batch agree exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_ctx, tiny_batch, tiny_model
from torch import Tensor, nn

from multifair.errors import UserError
from multifair.methods import METHODS, build_method
from multifair.methods.base import Method, StepContext
from multifair.methods.estimators import ratio_to_others, unimodal_logits
from multifair.methods.mmpareto import pareto_direction

MODS = ["a", "b"]
G = 3


# ---- helpers ---------------------------------------------------------------------------------
def setup(name: str, params: dict[str, Any] | None = None, *, seed: int = 0, n_groups: int = G):
    model = tiny_model(MODS, seed=seed)
    method = build_method(name, params or {}, MODS, n_groups)
    method.setup(model)
    return model, method


def forward_loss(method: Method, model: nn.Module, batch: dict, ctx: StepContext):
    out = method(model, batch)
    return out, method.loss(out, batch, ctx)


def step_grads(method: Method, model: nn.Module, batch: dict, ctx: StepContext):
    """forward, loss, backward: returns (out, loss) with gradients in .grad (not yet edited)."""
    model.zero_grad(set_to_none=True)
    method.zero_grad(set_to_none=True)
    out, loss = forward_loss(method, model, batch, ctx)
    method.backward(loss, out, batch, ctx)
    return out, loss


def encoder_grads(model: nn.Module) -> dict[str, list[Tensor]]:
    return {m: [p.grad.clone() for p in ps] for m, ps in model.modality_parameters().items()}


def params_of(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def autograd_of(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def ce(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    return nn.functional.cross_entropy(logits.float(), y, reduction=reduction)


def strong_a_batch(size: int = 32, seed: int = 0) -> dict[str, Any]:
    """A batch where modality a carries the label much more strongly than modality b."""
    batch = tiny_batch(MODS, size=size, n_groups=G, seed=seed)
    y = batch["label"].float()[:, None]
    g = torch.Generator().manual_seed(seed + 100)
    batch["a"] = torch.randn(size, 5, generator=g) * 0.3 + 3.0 * (2 * y - 1)
    batch["b"] = torch.randn(size, 5, generator=g)
    return batch


def train_erm(model: nn.Module, batch: dict, steps: int = 30) -> None:
    """A few plain steps so the per-modality predictions differ clearly."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        out = model(batch)
        (ce(out.logits, batch["label"]) + sum(ce(u, batch["label"]) for u in out.aux_logits.values())).backward()  # fmt: skip
        opt.step()


# ---- estimators ------------------------------------------------------------------------------
def test_zero_others_estimator_is_fusion_and_head_with_one_modality() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=3)
    out = model(batch)
    est = unimodal_logits(model, out, "zero_others", grad=False)
    for m in MODS:
        feats = {j: (h if j == m else torch.zeros_like(h)) for j, h in model.encode(batch).items()}
        _, expected = model.fuse(feats)
        torch.testing.assert_close(est[m], expected)
        assert not est[m].requires_grad
    aux = unimodal_logits(model, out, "aux", grad=True)
    assert aux["a"].requires_grad
    torch.testing.assert_close(aux["a"], out.aux_logits["a"])


def test_ratio_to_others() -> None:
    s = torch.tensor([4.0, 2.0, 1.0])
    torch.testing.assert_close(ratio_to_others(s, "min"), torch.tensor([4.0, 2.0, 0.5]))
    torch.testing.assert_close(ratio_to_others(s, "max"), torch.tensor([2.0, 0.5, 0.25]))
    torch.testing.assert_close(ratio_to_others(torch.tensor([3.0]), "min"), torch.tensor([1.0]))


# ---- OGM-GE ----------------------------------------------------------------------------------
def ogm_oracle(model: nn.Module, batch: dict, alpha: float) -> dict[str, float]:
    """k_m from the paper's formula, in float64 numpy, from the zero-others predictions."""
    feats = {m: h.detach() for m, h in model.encode(batch).items()}
    y = batch["label"].numpy()
    scores = {}
    for m in MODS:
        _, logits = model.fuse(
            {j: (h if j == m else torch.zeros_like(h)) for j, h in feats.items()}
        )
        p = torch.softmax(logits.double(), -1).detach().numpy()
        scores[m] = p[np.arange(len(y)), y].sum()
    k = {}
    for m in MODS:
        (other,) = [s for j, s in scores.items() if j != m]
        r = scores[m] / other
        k[m] = 1 - math.tanh(alpha * (r - 1)) if r > 1 else 1.0
    return k


def test_ogm_ge_shrinks_only_the_dominant_encoder_by_its_coefficient() -> None:
    model, method = setup("ogm_ge", {"alpha": 0.5, "noise": False})
    batch = strong_a_batch()
    train_erm(model, batch)
    ctx = make_ctx(model, G)
    _, loss = step_grads(method, model, batch, ctx)
    before = encoder_grads(model)
    method.modulate_gradients(model, loss, ctx)
    after = encoder_grads(model)

    k = ogm_oracle(model, batch, alpha=0.5)
    assert k["a"] < 0.99 and k["b"] == 1.0  # a is the dominant modality
    for m in MODS:
        assert float(loss.signals[f"k/{m}"]) == pytest.approx(k[m], rel=1e-5)
        for g0, g1 in zip(before[m], after[m]):
            torch.testing.assert_close(g1, k[m] * g0)
    assert method.lr_factors(loss, ctx) is None


def test_ogm_ge_noise_has_the_gradient_std_and_the_window_is_respected() -> None:
    model, method = setup("ogm_ge", {"alpha": 0.5, "modulation_ends": 2})
    batch = strong_a_batch()
    train_erm(model, batch)
    ctx = make_ctx(model, G)
    _, loss = step_grads(method, model, batch, ctx)
    before = encoder_grads(model)
    torch.manual_seed(7)
    method.modulate_gradients(model, loss, ctx)
    after = encoder_grads(model)
    # the same draws, in the same order, recomputed here: k * g + N(0, std(g)^2)
    torch.manual_seed(7)
    noise = {m: [torch.randn_like(g) * (g.std() + 1e-8) for g in gs] for m, gs in before.items()}
    for m in MODS:
        k = loss.signals[f"k/{m}"]
        for g0, g1, n in zip(before[m], after[m], noise[m]):
            torch.testing.assert_close(g1, k * g0 + n)

    # after the window (epoch 3 > modulation_ends 2): the gradients are left alone
    late = make_ctx(model, G)
    late.epoch = 3
    _, loss = step_grads(method, model, batch, late)
    before = encoder_grads(model)
    method.modulate_gradients(model, loss, late)
    for m in MODS:
        for g0, g1 in zip(before[m], encoder_grads(model)[m]):
            assert torch.equal(g0, g1)


@pytest.mark.parametrize("name", ["ogm_ge", "cggm"])
def test_step_size_switch_moves_the_factor_from_gradient_to_learning_rate(name: str) -> None:
    """step_size mode: gradients untouched, lr_factors = the factors gradient mode applies."""
    # cggm's step size needs bounds; (0, 10) never binds here (rho * k <= 1.3 on a first step)
    extra = {"noise": False} if name == "ogm_ge" else {"clamp": (0.0, 10.0)}
    batch = strong_a_batch()
    applied = {}
    for mode in ("gradient", "step_size"):
        model, method = setup(name, {"factor_on": mode, **extra})
        train_erm(model, batch)
        ctx = make_ctx(model, G)
        _, loss = step_grads(method, model, batch, ctx)
        before = encoder_grads(model)
        method.modulate_gradients(model, loss, ctx)
        after = encoder_grads(model)
        factors = method.lr_factors(loss, ctx)
        if mode == "gradient":
            assert factors is None
            for m in MODS:  # the factor each encoder's gradient was multiplied by
                ratio = flat(after[m]).dot(flat(before[m])) / flat(before[m]).dot(flat(before[m]))
                applied[m] = float(ratio)
        else:
            for m in MODS:
                for g0, g1 in zip(before[m], after[m]):
                    assert torch.equal(g0, g1)
            assert set(factors) == set(MODS)
            for m in MODS:
                assert float(factors[m]) == pytest.approx(applied[m], rel=1e-5)
    assert applied["a"] != pytest.approx(1.0)  # the test compares a real modulation


# ---- CGGM ------------------------------------------------------------------------------------
def test_cggm_coefficients_scaling_and_direction_term_match_a_hand_computation() -> None:
    model, method = setup("cggm", {"rho": 1.3, "lambda_gm": 0.1})
    batch = strong_a_batch()
    train_erm(model, batch, steps=10)
    method.prev_acc.copy_(torch.tensor([0.25, 0.5]))
    ctx = make_ctx(model, G)
    out, loss = step_grads(method, model, batch, ctx)

    y = batch["label"]
    acc = np.array([(out.aux_logits[m].argmax(-1) == y).float().mean().item() for m in MODS])
    d = acc - np.array([0.25, 0.5])
    k = (d.sum() - d) / d.sum()
    for i, m in enumerate(MODS):
        assert float(loss.signals[f"acc/{m}"]) == pytest.approx(acc[i])
        assert float(loss.signals[f"k/{m}"]) == pytest.approx(k[i], rel=1e-5)
    torch.testing.assert_close(method.prev_acc, torch.tensor(acc, dtype=torch.float32))

    # L_gm with g_F and g_m taken by autograd (the method uses g_F's closed form)
    fresh = model(batch)
    head_w = model.head_last_layer().weight
    (g_f,) = torch.autograd.grad(ce(fresh.logits, y), head_w)
    cos = []
    for m in MODS:
        (g_m,) = torch.autograd.grad(ce(fresh.aux_logits[m], y), model.aux_last_layer(m).weight)
        cos.append(nn.functional.cosine_similarity(g_m.flatten(), g_f.flatten(), dim=0).item())
    l_gm = np.mean(np.abs(k) - k * np.array(cos))
    assert float(loss.parts["gm"]) == pytest.approx(l_gm, rel=1e-4, abs=1e-6)

    before = encoder_grads(model)
    method.modulate_gradients(model, loss, ctx)
    for i, m in enumerate(MODS):
        for g0, g1 in zip(before[m], encoder_grads(model)[m]):
            torch.testing.assert_close(g1, float(1.3 * k[i]) * g0)


def test_cggm_equal_improvement_and_clamp() -> None:
    model, method = setup("cggm", {"clamp": (0.0, 1.0), "rho": 1.3})
    batch = strong_a_batch()
    out = model(batch)
    acc = torch.stack(
        [(out.aux_logits[m].argmax(-1) == batch["label"]).float().mean() for m in MODS]
    )
    method.prev_acc.copy_(acc)  # no accuracy change at all: sum d = 0
    _, loss = forward_loss(method, model, batch, make_ctx(model, G))
    for m in MODS:
        assert float(loss.signals[f"k/{m}"]) == pytest.approx(0.5)  # (M - 1) / M
        assert float(loss.signals[f"factor/{m}"]) == pytest.approx(0.65)
    method.prev_acc.copy_(acc - torch.tensor([0.5, -0.25]))  # d = (0.5, -0.25): k = (-1, 2)
    _, loss = forward_loss(method, model, batch, make_ctx(model, G))
    assert float(loss.signals["k/a"]) == pytest.approx(-1.0)
    assert float(loss.signals["k/b"]) == pytest.approx(2.0)
    assert float(loss.signals["factor/a"]) == 0.0 and float(loss.signals["factor/b"]) == 1.0


# ---- MMPareto --------------------------------------------------------------------------------
def test_pareto_direction_on_conflicting_and_agreeing_gradients() -> None:
    g_mm = torch.tensor([1.0, 0.0, 0.5])
    g_m = torch.tensor([-0.8, 1.0, 0.0])  # cos < 0: conflict
    direction, w = pareto_direction(g_mm, g_m, gamma=1.5)
    # the min-norm point of the segment: no grid point in float64 is shorter
    ws = torch.linspace(0, 1, 10001, dtype=torch.float64)[:, None]
    grid = (ws * g_mm.double() + (1 - ws) * g_m.double()).norm(dim=1).min()
    point = (w.double() * g_mm.double() + (1 - w.double()) * g_m.double()).norm()
    assert float(point) <= float(grid) + 1e-7
    assert float(direction.dot(g_mm)) >= 0 and float(direction.dot(g_m)) >= 0
    # rescaled up to the plain sum's norm, times gamma
    assert float(direction.norm()) == pytest.approx(1.5 * float((g_mm + g_m).norm()), rel=1e-5)

    agree_m = torch.tensor([0.5, 0.2, 0.1])  # cos > 0: equal weights, the plain sum
    direction, w = pareto_direction(g_mm, agree_m, gamma=1.5)
    assert float(w) == 0.5
    torch.testing.assert_close(direction, 1.5 * (g_mm + agree_m))


def test_mmpareto_encoder_gradient_never_conflicts_with_either_loss() -> None:
    model, method = setup("mmpareto", {"gamma": 1.5})
    batch = strong_a_batch()
    train_erm(model, batch, steps=5)
    ctx = make_ctx(model, G)
    _, loss = step_grads(method, model, batch, ctx)
    rest_before = [p.grad.clone() for p in model.other_parameters()]
    method.modulate_gradients(model, loss, ctx)

    # independent per-loss gradients on a fresh graph
    out = model(batch)
    y = batch["label"]
    enc = model.modality_parameters()
    for m in MODS:
        g_mm = flat(autograd_of(ce(out.logits, y), enc[m]))
        g_m = flat(autograd_of(ce(model.aux_heads[m](out.features[m]), y), enc[m]))
        final = flat([p.grad for p in enc[m]])
        expected, _ = pareto_direction(g_mm, g_m, 1.5)
        torch.testing.assert_close(final, expected, rtol=1e-4, atol=1e-7)
        assert float(final.dot(g_mm)) >= -1e-9 and float(final.dot(g_m)) >= -1e-9
    # fusion, head and projections keep the plain gradient of the summed losses
    for g0, p in zip(rest_before, model.other_parameters()):
        assert torch.equal(g0, p.grad)


def test_mmpareto_with_gradient_accumulation_uses_the_mean_gradients() -> None:
    """Two micro-batches through the trainer's step: the Pareto rule acts on the mean of the
    per-micro-batch gradients, the same units as the accumulated .grad."""
    from multifair.training.config import TrainConfig
    from multifair.training.distributed import DistEnv
    from multifair.training.trainer import build_optimizer, train_step

    model, method = setup("mmpareto")
    micro = [tiny_batch(MODS, size=16, seed=s) for s in (11, 12)]
    before = copy.deepcopy(model)
    ctx = make_ctx(model, G)
    ctx.scale = lambda t: t / 2  # what the trainer passes with train.accumulate = 2
    optimizer, groups = build_optimizer(model, method, TrainConfig(lr=1e-3), torch.device("cpu"))
    train_step(
        micro, model=model, method=method, optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False), groups=groups, ctx=ctx,
        lr_scale=1.0, clip=None, amp_dtype=None, env=DistEnv(),
    )  # fmt: skip
    enc = before.modality_parameters()
    for m in MODS:
        g_mm, g_m = 0, 0
        for b in micro:
            out = before(b)
            g_mm = g_mm + flat(autograd_of(ce(out.logits, b["label"]), enc[m])) / 2
            g_m = g_m + flat(autograd_of(ce(before.aux_heads[m](out.features[m]), b["label"]), enc[m])) / 2  # fmt: skip
        expected, _ = pareto_direction(g_mm, g_m, 1.5)
        final = flat([p.grad for p in model.modality_parameters()[m]])
        torch.testing.assert_close(final, expected, rtol=1e-4, atol=1e-7)


# ---- PMR -------------------------------------------------------------------------------------
def class_means(model: nn.Module, batches: list[dict]) -> dict[str, Tensor]:
    """Per-modality class means of h_m over the batches (eval mode), float64."""
    model.eval()
    with torch.no_grad():
        feats = [model.encode(b) for b in batches]
    model.train()
    y = torch.cat([b["label"] for b in batches])
    return {
        m: torch.stack([torch.cat([f[m] for f in feats]).double()[y == k].mean(0) for k in (0, 1)])
        for m in MODS
    }


def test_pmr_prototypes_are_class_means_with_momentum() -> None:
    model, method = setup("pmr", {"momentum": 0.2, "proto_batches": 2})
    batches = [tiny_batch(MODS, seed=s) for s in (1, 2, 3)]  # the third is beyond proto_batches
    ctx = make_ctx(model, G)
    ctx.extras["train_batches"] = batches
    method.on_epoch_start(ctx)
    first = class_means(model, batches[:2])
    for i, m in enumerate(MODS):
        torch.testing.assert_close(method.prototypes[i].double(), first[m], rtol=1e-5, atol=1e-6)

    train_erm(model, batches[0], steps=3)  # the features move; the next epoch blends
    method.on_epoch_start(ctx)
    second = class_means(model, batches[:2])
    for i, m in enumerate(MODS):
        expected = 0.2 * first[m] + 0.8 * second[m]
        torch.testing.assert_close(method.prototypes[i].double(), expected, rtol=1e-5, atol=1e-6)


def test_pmr_prototype_loss_goes_to_the_weaker_modality_only() -> None:
    model, method = setup("pmr", {"alpha": 1.5, "proto_batches": 0})
    batch = strong_a_batch()
    train_erm(model, batch)
    ctx = make_ctx(model, G)
    ctx.extras["train_batches"] = [batch]
    method.on_epoch_start(ctx)

    # oracle prototype scores: softmax(-distance)[y] summed, float64
    y = batch["label"]
    feats = {m: h.detach().double() for m, h in model.encode(batch).items()}
    score = {}
    for i, m in enumerate(MODS):
        dist = torch.cdist(feats[m], method.prototypes[i].double())
        score[m] = torch.softmax(-dist, -1)[torch.arange(len(y)), y].sum().item()
    assert score["b"] < score["a"]  # b is behind
    _, loss = step_grads(method, model, batch, ctx)
    assert float(loss.signals["proto_weight/a"]) == 0.0
    assert float(loss.signals["proto_weight/b"]) == 1.5
    for m in MODS:
        assert float(loss.signals[f"proto_score/{m}"]) == pytest.approx(score[m], rel=1e-5)

    # encoder a's gradient is ERM's; encoder b's has the prototype CE added
    pmr_grads = encoder_grads(model)
    erm = build_method("erm", {}, MODS, G)
    step_grads(erm, model, batch, ctx)
    erm_grads = encoder_grads(model)
    for g0, g1 in zip(pmr_grads["a"], erm_grads["a"]):
        torch.testing.assert_close(g0, g1)
    assert not torch.allclose(flat(pmr_grads["b"]), flat(erm_grads["b"]))
    out = model(batch)
    proto_ce = ce(-torch.cdist(out.features["b"].float(), method.prototypes[1]), y)
    expected_b = [
        g + 1.5 * d for g, d in zip(erm_grads["b"], autograd_of(proto_ce, model.modality_parameters()["b"]))
    ]  # fmt: skip
    for g0, g1 in zip(pmr_grads["b"], expected_b):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-7)


def test_pmr_zero_distance_gives_a_finite_gradient() -> None:
    model, method = setup("pmr")
    batch = tiny_batch(MODS, seed=4)
    ctx = make_ctx(model, G)
    ctx.extras["train_batches"] = [batch]
    method.on_epoch_start(ctx)
    model.eval()
    with torch.no_grad():
        h = model.encode(batch)
    method.prototypes[0, 0] = h["a"][0]  # sample 0 sits exactly on a prototype
    method.prototypes[1, 0] = h["b"][0]
    _, loss = step_grads(method, model, batch, ctx)
    assert torch.isfinite(loss.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pmr_says_what_it_needs_at_epoch_start() -> None:
    model, method = setup("pmr")
    with pytest.raises(RuntimeError, match="train_batches"):
        method.on_epoch_start(make_ctx(model, G))


# ---- DGL -------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["zero_others", "aux"])
def test_dgl_fused_loss_reaches_only_fusion_and_head_unimodal_only_encoders(estimator: str) -> None:
    model, method = setup("dgl", {"alpha": 4.0, "estimator": estimator})
    batch = tiny_batch(MODS, seed=5)
    step_grads(method, model, batch, make_ctx(model, G))

    y = batch["label"]
    feats = model.encode(batch)
    _, fused_logits = model.fuse({m: h.detach() for m, h in feats.items()})
    fused = ce(fused_logits, y)
    if estimator == "zero_others":
        uni = sum(
            ce(model.fuse({j: (h if j == m else torch.zeros_like(h)) for j, h in feats.items()})[1], y)
            for m in MODS
        )  # fmt: skip
    else:
        uni = sum(ce(model.aux_heads[m](feats[m]), y) for m in MODS)
    aux = sum(ce(model.aux_heads[m](feats[m].detach()), y) for m in MODS)

    head_side = params_of(model.fusion) + params_of(model.head)
    encoder_side = [p for m in MODS for p in model.modality_parameters()[m]]
    encoder_side += params_of(model.projections)  # upstream of h_m: the unimodal path
    for p, g in zip(head_side, autograd_of(fused, head_side)):
        torch.testing.assert_close(p.grad, g)  # no unimodal gradient in fusion or head
    for p, g in zip(encoder_side, autograd_of(4.0 * uni, encoder_side)):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)  # no fused gradient here
    aux_params = model.aux_parameters()
    for p, g in zip(aux_params, autograd_of(aux, aux_params)):
        torch.testing.assert_close(p.grad, g)


# ---- GroupDRO --------------------------------------------------------------------------------
def test_groupdro_weights_follow_the_exponentiated_group_losses() -> None:
    model, method = setup("groupdro", {"eta": 0.5})
    batch = tiny_batch(MODS, size=40, seed=6)
    q0 = method.q.clone()
    _, loss = forward_loss(method, model, batch, make_ctx(model, G))

    per = ce(model(batch).logits, batch["label"], reduction="none").detach().double().numpy()
    groups = batch["group"].numpy()
    group_loss = np.array([per[groups == g].mean() for g in range(G)])
    q = q0.double().numpy() * np.exp(0.5 * group_loss)
    q /= q.sum()
    np.testing.assert_allclose(method.q.double().numpy(), q, rtol=1e-5)
    worst, best = group_loss.argmax(), group_loss.argmin()
    assert method.q[worst] > q0[worst] and method.q[best] < q0[best]
    aux = sum(ce(u, batch["label"]) for u in model(batch).aux_logits.values()).item()
    assert float(loss.total.detach()) == pytest.approx(
        float((q * group_loss).sum()) + aux, rel=1e-5
    )

    # repeated steps on the same batch: all weight moves to the worst group
    for _ in range(200):
        forward_loss(method, model, batch, make_ctx(model, G))
    assert int(method.q.argmax()) == worst and float(method.q[worst]) > 0.9


def test_groupdro_attribute_label_groups() -> None:
    _, method = setup("groupdro", {"groups": "attribute_label"})
    assert method.q.shape == (2 * G,)
    batch = tiny_batch(MODS, seed=7)
    codes = method.group_codes(batch)
    expected = torch.where(batch["group"] >= 0, 2 * batch["group"] + batch["label"], -1)
    assert torch.equal(codes, expected)


# ---- FIN -------------------------------------------------------------------------------------
def test_fin_normalises_with_each_samples_group_statistics() -> None:
    model, method = setup("fin", {"beta": 0.3})
    assert method.uses_attribute_at_test
    batch = tiny_batch(MODS, seed=8)
    out = method(model, batch)
    plain = model(batch)
    mu, sigma = method.normalizer.mu.detach(), method.normalizer.sigma.detach()
    z = plain.head_input.detach()
    for i, g in enumerate(batch["group"].tolist()):
        if g < 0:
            expected = z[i]  # unknown group: unchanged
        else:
            normed = (z[i] - mu[g]) / (nn.functional.softplus(sigma[g]) + 1e-6)
            expected = 0.7 * normed + 0.3 * z[i]
        torch.testing.assert_close(out.head_input[i], expected)
    torch.testing.assert_close(out.logits, model.head_last_layer()(out.head_input))

    # the prediction depends on the group the sample is said to belong to
    moved = dict(batch, group=(batch["group"].clamp_min(0) + 1) % G)
    assert not torch.allclose(method(model, moved).logits, out.logits)
    # and the statistics are learnt: they get gradients from the task loss
    loss = method.loss(out, batch, make_ctx(model, G))
    loss.total.backward()
    assert method.normalizer.mu.grad.abs().sum() > 0


def test_fin_needs_setup() -> None:
    method = build_method("fin", {}, MODS, G)
    with pytest.raises(RuntimeError, match="setup"):
        method(tiny_model(MODS), tiny_batch(MODS))


# ---- reweight --------------------------------------------------------------------------------
@pytest.mark.parametrize("power", [0.5, 1.0])
def test_reweight_weights_are_normalised_inverse_frequency(power: float) -> None:
    model, method = setup("reweight", {"power": power})
    counts = np.array([60.0, 30.0, 10.0])
    ctx = make_ctx(model, G)
    ctx.extras["group_counts"] = counts.tolist()
    method.on_epoch_start(ctx)
    batch = tiny_batch(MODS, size=40, seed=9)
    _, loss = forward_loss(method, model, batch, ctx)

    p = counts / counts.sum()
    w = p**-power / (p * p**-power).sum()
    for g in range(G):
        assert float(loss.signals[f"weight/{g}"]) == pytest.approx(w[g], rel=1e-5)
    assert (p * w).sum() == pytest.approx(1.0)
    out = model(batch)
    per = ce(out.logits, batch["label"], reduction="none").detach().double().numpy()
    groups = batch["group"].numpy()
    per_w = np.where(groups >= 0, w[np.clip(groups, 0, None)], 1.0)
    aux = sum(ce(u, batch["label"]) for u in out.aux_logits.values()).item()
    assert float(loss.total.detach()) == pytest.approx((per_w * per).mean() + aux, rel=1e-5)
    # the training counts stay fixed: batches do not move them
    torch.testing.assert_close(method.counts, torch.tensor(counts, dtype=torch.float32))


def test_reweight_counts_batches_without_training_counts_and_power_zero_is_erm() -> None:
    model, method = setup("reweight", {"power": 0.0})
    batch = tiny_batch(MODS, size=40, seed=10)
    ctx = make_ctx(model, G)
    method.on_epoch_start(ctx)  # no group_counts offered: running counts
    _, loss = forward_loss(method, model, batch, ctx)
    expected = torch.tensor([float((batch["group"] == g).sum()) for g in range(G)])
    torch.testing.assert_close(method.counts, expected)
    erm = build_method("erm", {}, MODS, G)
    _, erm_loss = forward_loss(erm, model, batch, ctx)
    torch.testing.assert_close(loss.total, erm_loss.total)
    forward_loss(method, model, batch, ctx)
    torch.testing.assert_close(method.counts, 2 * expected)


# ---- registry and validation -----------------------------------------------------------------
def test_baselines_are_registered_and_validate_their_parameters() -> None:
    for name in ["ogm_ge", "cggm", "mmpareto", "pmr", "dgl", "groupdro", "fin", "reweight"]:
        assert name in METHODS
    with pytest.raises(UserError, match="factor_on"):
        build_method("ogm_ge", {"factor_on": "both"}, MODS, G)
    with pytest.raises(UserError, match="needs clamp"):
        build_method("cggm", {"factor_on": "step_size"}, MODS, G)
    with pytest.raises(UserError, match="power"):
        build_method("reweight", {"power": -1}, MODS, G)
    assert METHODS.get("fin").uses_attribute_at_test
    assert not METHODS.get("groupdro").uses_attribute_at_test


# ---- FIS -------------------------------------------------------------------------------------
def exact_w2(x: np.ndarray, y: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between two 1-D empirical distributions (quantiles)."""
    x, y = np.sort(x), np.sort(y)
    t = np.union1d(np.arange(len(x) + 1) / len(x), np.arange(len(y) + 1) / len(y))
    mid = (t[:-1] + t[1:]) / 2
    qx = x[np.minimum((mid * len(x)).astype(int), len(x) - 1)]
    qy = y[np.minimum((mid * len(y)).astype(int), len(y) - 1)]
    return float(((qx - qy) ** 2 * np.diff(t)).sum())


def test_fis_sinkhorn_cost_approaches_the_exact_transport_cost() -> None:
    from multifair.methods.fis import sinkhorn_costs

    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(6, generator=g), torch.rand(10, generator=g) + 1.0]).double()
    groups = torch.tensor([0] * 6 + [1] * 10)
    masks = group_masks_for(groups, 3)
    costs = sinkhorn_costs(values, masks, masks.any(1), eps=1e-4, iterations=1000)
    v = values.numpy()
    for k, members in enumerate([v[:6], v[6:]]):
        assert float(costs[k]) == pytest.approx(exact_w2(members, v), rel=2e-2, abs=1e-3)
    assert float(costs[2]) == 0.0  # no sample in group 2
    assert float(costs[0]) > float(costs[1])  # the smaller, more shifted group is further away


def group_masks_for(groups: Tensor, n: int) -> Tensor:
    return groups[:, None] == torch.arange(n)[None, :]


def test_fis_weights_mix_individual_and_group_parts() -> None:
    model, method = setup("fis", {"mix": 0.5, "temperature": 1.0})
    batch = tiny_batch(MODS, size=30, seed=12)
    _, loss = forward_loss(method, model, batch, make_ctx(model, G))

    out = model(batch)
    per = ce(out.logits, batch["label"], reduction="none").detach().double().numpy()
    groups = batch["group"].numpy()
    w_ind = len(per) * np.exp(per) / np.exp(per).sum()
    dist = np.array([float(loss.signals[f"sinkhorn/{k}"]) for k in range(G)])
    count = np.array([(groups == k).sum() for k in range(G)])
    share = np.where(count > 0, np.exp(dist), 0.0)
    share /= share.sum()
    known = groups >= 0
    w_grp = np.where(known, known.sum() * share[np.clip(groups, 0, None)] / np.maximum(count[np.clip(groups, 0, None)], 1), 1.0)  # fmt: skip
    expected = ((0.5 * w_ind + 0.5 * w_grp) * per).mean()
    aux = sum(ce(u, batch["label"]) for u in out.aux_logits.values()).item()
    assert float(loss.total.detach()) == pytest.approx(expected + aux, rel=1e-5)
    assert w_grp[known].sum() == pytest.approx(known.sum())  # group weights keep the mass
    for k in range(G):  # each group's distance is the OT cost of its losses to the pool
        assert dist[k] == pytest.approx(exact_w2(per[groups == k], per[known]), abs=0.005)


# ---- adversarial -----------------------------------------------------------------------------
def test_adversarial_reverses_the_adversarys_gradient_into_the_model() -> None:
    model, method = setup("adversarial", {"weight": 0.7, "warmup": 0.0})
    batch = tiny_batch(MODS, size=24, seed=13)
    ctx = make_ctx(model, G)
    _, loss = step_grads(method, model, batch, ctx)
    assert float(loss.signals["adversary_strength"]) == pytest.approx(0.7)

    # oracle: the same adversary without reversal on a fresh graph
    y, groups = batch["label"], batch["group"]
    fresh = model(batch)
    z = torch.cat([fresh.logits, nn.functional.one_hot(y, 2).float()], dim=1)
    known = (groups >= 0).float()
    per = ce(method.adversary(z), groups.clamp_min(0), reduction="none")
    adv = (per * known).sum() / known.sum()
    task = ce(fresh.logits, y) + sum(ce(u, y) for u in fresh.aux_logits.values())
    head = params_of(model.head)
    for p, g_task, g_adv in zip(head, autograd_of(task, head), autograd_of(adv, head)):
        torch.testing.assert_close(p.grad, g_task - 0.7 * g_adv, rtol=1e-4, atol=1e-7)
    adversary = params_of(method.adversary)
    for p, g in zip(adversary, autograd_of(adv, adversary)):
        torch.testing.assert_close(p.grad, g)  # the adversary itself descends its loss


def test_adversarial_warmup_ramps_the_strength() -> None:
    model, method = setup("adversarial", {"weight": 2.0, "warmup": 0.5})
    ctx = make_ctx(model, G)  # total_steps 100: the ramp ends at step 50
    strengths = []
    for step in (0, 25, 50, 90):
        ctx.step = step
        strengths.append(method.strength(ctx))
    assert strengths == pytest.approx([0.0, 1.0, 2.0, 2.0])
