"""Behaviour of `multifair` and `multifair_released` (spec method.md sections 3-4).

The model is the project's real MultimodalClassifier with tiny MLP encoders (conftest.py), so
the tests exercise the real parameter ownership (`modality_parameters`) and layers
(`aux_last_layer`, `head_input`). References are computed independently in float64
(sklearn AUC, pair loops).
"""

from __future__ import annotations

import copy
import io
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_ctx, tiny_batch, tiny_model
from sklearn.metrics import roc_auc_score
from torch import nn

from multifair.errors import UserError
from multifair.methods import METHODS, build_method
from multifair.methods.base import LossOutput, Method
from multifair.methods.multifair import MultiFair

MODS = ["a", "b"]
G = 3


def run_loss(method: Method, model: nn.Module, batch: dict[str, Any], n_groups: int = G):
    out = method(model, batch)
    return out, method.loss(out, batch, make_ctx(model, n_groups))


def as_float(signals: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in signals.items()}


# ---- float64 reference of steps 3 and 5 ----------------------------------------------------
class Reference:
    """The spec's state machine for B_i and f_i, written from the equations in float64."""

    def __init__(self, m: int, g: int, *, released: bool, form: str, temperature: float = 1.0):
        self.prev = np.full(m, 0.5)
        self.ema = np.full((m, g), 0.5)
        self.released, self.form, self.temperature = released, form, temperature

    def surrogate(self, logits: np.ndarray, y: np.ndarray, member: np.ndarray) -> float | None:
        if self.form == "logistic":
            z = np.exp(logits - logits.max(1, keepdims=True))
            s = z[:, 1] / z.sum(1)
        else:
            s = logits[:, 1] - logits[:, 0]
        pos = [s[k] for k in range(len(y)) if member[k] and y[k] == 1]
        neg = [s[k] for k in range(len(y)) if member[k] and y[k] == 0]
        if not pos or not neg:
            return None
        if self.form == "logistic":
            return 1 - np.mean(
                [math.log1p(math.exp(-(p - n))) for p, n in itertools.product(pos, neg)]
            )
        t = self.temperature
        return np.mean([1 / (1 + math.exp(-(p - n) / t)) for p, n in itertools.product(pos, neg)])

    def step(self, aux_logits: list[np.ndarray], y: np.ndarray, groups: np.ndarray, p: Any):
        # Step 3: A_i by sklearn on softmax(u_i)[:, 1], previous value on a one-class batch.
        auc = self.prev.copy()
        if len(set(y)) == 2:
            for i, u in enumerate(aux_logits):
                z = np.exp(u - u.max(1, keepdims=True))
                auc[i] = roc_auc_score(y, z[:, 1] / z.sum(1))
        change = np.abs(auc - self.prev)
        balance = (change.sum() + 1e-8 - change) / (change.sum() + 1e-8)
        self.prev = auc
        # Step 5: EMA per (i, g), F_i^g, f_i.
        for i, u in enumerate(aux_logits):
            for g in range(self.ema.shape[1]):
                s = self.surrogate(u, y, groups == g)
                if s is None and self.released:
                    s = 0.5
                if s is not None:
                    self.ema[i, g] = p.ema * self.ema[i, g] + (1 - p.ema) * s
        mean = self.ema.mean(1, keepdims=True)
        gain = 1 + p.delta * (mean - self.ema) / max(p.tau, 1e-4)
        counts = np.array([(groups == g).sum() for g in range(self.ema.shape[1])], float)
        f = gain @ (counts / counts.sum())
        if not self.released:
            f = np.clip(f, *p.clamp)
        lf = np.abs(self.ema - mean).mean()
        return balance, f, lf


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("multifair", {}),
        ("multifair", {"surrogate": "logistic"}),
        ("multifair", {"surrogate_temperature": 0.5, "delta": 0.1}),
        ("multifair_released", {}),
    ],
)
def test_balance_and_group_factor_match_hand_computation(name: str, params: dict) -> None:
    model = tiny_model(MODS)
    method = build_method(name, params, MODS, G)
    ref = Reference(
        len(MODS),
        G,
        released=method.released,
        form=method.surrogate,
        temperature=method.temperature,
    )
    # Three steps: state carries over; the third batch has no group 2 and a one-class group 0.
    groups3 = torch.tensor([0, 0, 0, 1, 1, 1, 1, -1, 1, 0, 1, 1])
    labels3 = torch.tensor([1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0])
    batches = [
        tiny_batch(MODS, seed=10),
        tiny_batch(MODS, seed=11, size=16),
        tiny_batch(MODS, seed=12, size=12, labels=labels3, groups=groups3),
    ]
    for batch in batches:
        out, loss = run_loss(method, model, batch)
        aux = [out.aux_logits[m].detach().double().numpy() for m in MODS]
        balance, f, lf = ref.step(
            aux, batch["label"].numpy(), batch["group"].numpy(), method.params
        )
        sig = as_float(loss.signals)
        for i, m in enumerate(MODS):
            assert sig[f"B/{m}"] == pytest.approx(balance[i], abs=1e-5)
            assert sig[f"f/{m}"] == pytest.approx(f[i], abs=1e-5)
            mode = f[i] if sig["fair_mode"] else 1.0
            assert sig[f"factor/{m}"] == pytest.approx(1.2 * balance[i] * mode, abs=1e-5)
        assert float(loss.parts["fair"]) == pytest.approx(lf, abs=1e-6)
        np.testing.assert_allclose(method.group_ema.double().numpy(), ref.ema, atol=1e-6)
        np.testing.assert_allclose(method.prev_auc.double().numpy(), ref.prev, atol=1e-6)


def test_absent_group_keeps_its_ema_in_multifair_and_gets_half_in_released() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=3, groups=torch.tensor([0, 1] * 12))  # group 2 absent
    for name, expected in [("multifair", 0.7), ("multifair_released", 0.9 * 0.7 + 0.1 * 0.5)]:
        method = build_method(name, {}, MODS, G)
        method.group_ema.fill_(0.7)
        run_loss(method, model, batch)
        torch.testing.assert_close(method.group_ema[:, 2], torch.full((2,), expected))


def test_one_class_batch_reuses_previous_auc_and_gives_plain_balance() -> None:
    model = tiny_model(MODS)
    method = build_method("multifair", {"group_level": False}, MODS, G)
    run_loss(method, model, tiny_batch(MODS, seed=1))  # sets A_i(t-1)
    before = method.prev_auc.clone()
    _, loss = run_loss(method, model, tiny_batch(MODS, seed=2, labels=torch.zeros(24).long()))
    assert torch.equal(method.prev_auc, before)
    for i, m in enumerate(MODS):
        assert float(loss.signals[f"aux_auc/{m}"]) == float(before[i])
        assert float(loss.signals[f"B/{m}"]) == pytest.approx(1.0)
    assert torch.isfinite(loss.total)


def extra_gradient(name: str, params: dict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Gradient of the method's total minus that of plain training (task + aux CE), per
    parameter group, on the same forward pass. Fresh method and model each call."""
    model = tiny_model(MODS)
    method = build_method(name, params, MODS, G)
    out, loss = run_loss(method, model, batch)
    y = batch["label"]
    base = nn.functional.cross_entropy(out.logits, y) + sum(
        nn.functional.cross_entropy(u, y) for u in out.aux_logits.values()
    )
    groups = {
        "encoders": [p for ps in model.modality_parameters().values() for p in ps],
        "aux": model.aux_parameters(),
        "other": model.other_parameters(),
    }
    diff = {}
    for key, ps in groups.items():
        g_total = torch.autograd.grad(loss.total, ps, retain_graph=True, allow_unused=True)
        g_base = torch.autograd.grad(base, ps, retain_graph=True, allow_unused=True)
        flat = [
            (t if t is not None else torch.zeros_like(p)) - (b if b is not None else 0)
            for t, b, p in zip(g_total, g_base, ps)
        ]
        diff[key] = torch.cat([d.flatten() for d in flat])
    diff["fair_mode"] = loss.signals["fair_mode"]
    return diff


def test_alignment_loss_carries_gradient_only_in_multifair() -> None:
    batch = tiny_batch(MODS, seed=5)
    off = {"lambda_f": 0.0}
    one = extra_gradient("multifair", {**off, "lambda_gm": 0.15}, batch)
    two = extra_gradient("multifair", {**off, "lambda_gm": 0.30}, batch)
    zero = extra_gradient("multifair", {**off, "lambda_gm": 0.0}, batch)
    assert one["encoders"].abs().max() > 1e-6 and one["other"].abs().max() > 1e-6
    torch.testing.assert_close(two["encoders"], 2 * one["encoders"])  # exactly lambda_gm * grad
    assert zero["encoders"].abs().max() == 0
    assert one["aux"].abs().max() == 0  # g_i is detached: the aux heads see only their CE
    released = extra_gradient("multifair_released", {**off, "lambda_gm": 5.0}, batch)
    for key in ("encoders", "aux", "other"):
        assert released[key].abs().max() == 0


def test_fairness_loss_carries_gradient_to_encoders_only_in_multifair() -> None:
    batch = tiny_batch(MODS, seed=6)
    on = {"lambda_gm": 0.0, "tau": 0.0}  # fairness mode whenever the gap is positive
    one = extra_gradient("multifair", {**on, "lambda_f": 0.5}, batch)
    two = extra_gradient("multifair", {**on, "lambda_f": 1.0}, batch)
    assert float(one["fair_mode"]) == 1.0
    assert one["encoders"].abs().max() > 1e-7
    torch.testing.assert_close(two["encoders"], 2 * one["encoders"])
    # The auxiliary heads are probes: L_f goes through them to h_i but not into their weights.
    assert one["aux"].abs().max() == 0
    released = extra_gradient("multifair_released", {**on, "lambda_f": 5.0}, batch)
    assert float(released["fair_mode"]) == 1.0
    for key in ("encoders", "aux", "other"):
        assert released[key].abs().max() == 0


def test_released_reports_its_losses_as_detached_values() -> None:
    model = tiny_model(MODS)
    method = build_method("multifair_released", {"tau": 0.0}, MODS, G)
    _, loss = run_loss(method, model, tiny_batch(MODS, seed=6))
    assert {"task", "aux", "gm", "fair"} <= set(loss.parts)
    assert all(not v.requires_grad and torch.isfinite(v) for v in loss.parts.values())
    assert float(loss.parts["gm"]) > 0
    torch.testing.assert_close(loss.total.detach(), loss.parts["task"] + loss.parts["aux"])


def test_group_factor_is_clamped_in_multifair_and_not_in_released() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=7, groups=torch.tensor([0] * 16 + [1] * 6 + [2] * 2))
    skew = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.6, 0.8]])
    seen = {}
    for name, params in [
        ("multifair", {"delta": 50.0}),
        ("multifair", {"delta": 50.0, "clamp": [0.8, 1.25]}),
        ("multifair_released", {"delta": 50.0}),
    ]:
        method = build_method(name, params, MODS, G)
        method.group_ema.copy_(skew)
        _, loss = run_loss(method, model, batch)
        seen[(name, tuple(params.get("clamp", [])))] = [float(loss.signals[f"f/{m}"]) for m in MODS]
    # skew: modality a's majority group is above its mean (f_a < 1), b's below (f_b > 1)
    assert seen[("multifair", ())] == pytest.approx([0.5, 2.0])
    assert seen[("multifair", (0.8, 1.25))] == pytest.approx([0.8, 1.25])
    released = seen[("multifair_released", ())]
    assert released[0] < 0 and released[1] > 2  # unclamped, as published


def test_fairness_mode_only_when_gap_exceeds_tau() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=8)
    _, probe = run_loss(build_method("multifair", {}, MODS, G), model, batch)
    gap = float(probe.signals["gap"])
    assert gap > 0.01
    for tau, expect_on in [(gap + 1e-4, False), (gap - 1e-4, True)]:
        method = build_method("multifair", {"tau": tau}, MODS, G)
        _, loss = run_loss(method, model, batch)
        sig, p = as_float(loss.signals), method.params
        assert sig["fair_mode"] == float(expect_on)
        for m in MODS:
            mult = sig[f"f/{m}"] if expect_on else 1.0
            assert sig[f"factor/{m}"] == pytest.approx(p.rho * sig[f"B/{m}"] * mult, rel=1e-6)
        expected_total = (
            loss.parts["task"]
            + loss.parts["aux"]
            + p.lambda_gm * loss.parts["gm"]
            + (p.lambda_f * loss.parts["fair"] if expect_on else 0)
        )
        torch.testing.assert_close(loss.total.detach(), expected_total)


def test_trigger_uses_fused_group_auc_gap() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=9)
    for name in ("multifair", "multifair_released"):
        _, loss = run_loss(build_method(name, {}, MODS, G), model, batch)
        out = model(batch)
        prob = torch.softmax(out.logits.detach().double(), -1)[:, 1].numpy()
        y, groups = batch["label"].numpy(), batch["group"].numpy()
        aucs = []
        for g in range(G):
            sel = groups == g
            if sel.sum() < 2:
                continue
            if len(set(y[sel])) == 2:
                aucs.append(roc_auc_score(y[sel], prob[sel]))
            elif name == "multifair_released":
                aucs.append(0.5)
        expected = max(aucs) - min(aucs) if len(aucs) >= 2 else 0.0
        assert float(loss.signals["gap"]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", ["multifair", "multifair_released"])
def test_only_encoder_gradients_are_modulated(name: str) -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=4)
    method = build_method(name, {"tau": 0.0}, MODS, G)
    ctx = make_ctx(model, G)
    out = method(model, batch)
    loss = method.loss(out, batch, ctx)
    method.backward(loss, out, batch, ctx)
    before = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    assert len(before) == len(list(model.parameters()))  # every parameter got a gradient
    assert method.modulate_gradients(model, loss, ctx) == {}
    assert method.lr_factors(loss, ctx) is None
    encoder = {id(p): m for m, ps in model.modality_parameters().items() for p in ps}
    for p in model.parameters():
        if id(p) in encoder:
            factor = loss.signals[f"factor/{encoder[id(p)]}"]
            assert float(factor) != pytest.approx(1.0)
            torch.testing.assert_close(p.grad, before[id(p)] * factor)
        else:
            assert torch.equal(p.grad, before[id(p)])  # projections, fusion, head, aux


def test_step_size_mode_returns_factors_and_leaves_gradients() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=4)
    method = build_method("multifair", {"factor_on": "step_size"}, MODS, G)
    ctx = make_ctx(model, G)
    out = method(model, batch)
    loss = method.loss(out, batch, ctx)
    method.backward(loss, out, batch, ctx)
    before = [p.grad.clone() for p in model.parameters()]
    method.modulate_gradients(model, loss, ctx)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    factors = method.lr_factors(loss, ctx)
    assert factors is not None and set(factors) == set(MODS)
    for m in MODS:
        assert torch.equal(factors[m], loss.signals[f"factor/{m}"])


def test_ablation_switches() -> None:
    model = tiny_model(MODS)
    batch = tiny_batch(MODS, seed=8)
    # MultiFair_G: no B_i, no rho, no L_gm; the group factor alone (in fairness mode).
    method = build_method("multifair", {"modality_level": False, "tau": 0.0}, MODS, G)
    _, loss = run_loss(method, model, batch)
    sig = as_float(loss.signals)
    assert "gm" not in loss.parts and "fair" in loss.parts and sig["fair_mode"] == 1.0
    for m in MODS:
        assert sig[f"B/{m}"] == 1.0
        assert sig[f"factor/{m}"] == pytest.approx(sig[f"f/{m}"])
    # MultiFair_M: no f_i, no L_f, no trigger; the gap is still reported.
    method = build_method("multifair", {"group_level": False, "tau": 0.0}, MODS, G)
    _, loss = run_loss(method, model, batch)
    sig = as_float(loss.signals)
    assert "fair" not in loss.parts and "gm" in loss.parts
    assert sig["fair_mode"] == 0.0 and sig["gap"] > 0
    for m in MODS:
        assert sig[f"f/{m}"] == 1.0
        assert sig[f"factor/{m}"] == pytest.approx(1.2 * sig[f"B/{m}"])
    # Both off: plain training with the auxiliary heads.
    method = build_method("multifair", {"modality_level": False, "group_level": False}, MODS, G)
    _, loss = run_loss(method, model, batch)
    assert all(float(loss.signals[f"factor/{m}"]) == 1.0 for m in MODS)
    torch.testing.assert_close(loss.total.detach(), loss.parts["task"] + loss.parts["aux"])


def test_any_number_of_modalities_and_groups() -> None:
    mods = ["a", "b", "c"]
    model = tiny_model(mods, fusion="concat")
    batch = tiny_batch(mods, seed=2, size=32, n_groups=5)
    method = build_method("multifair", {"tau": 0.0}, mods, 5)
    _, loss = run_loss(method, model, batch, n_groups=5)
    assert method.group_ema.shape == (3, 5)
    assert all(torch.isfinite(v).all() for v in loss.signals.values())
    assert sum(float(loss.signals[f"B/{m}"]) for m in mods) == pytest.approx(2.0)  # M - 1
    loss.total.backward()
    assert all(p.grad is not None for p in model.parameters())
    # No attribute at all: no group level, nothing breaks.
    method = build_method("multifair", {}, mods, 0)
    _, loss = run_loss(method, model, tiny_batch(mods, n_groups=0), n_groups=0)
    assert float(loss.signals["fair_mode"]) == 0.0 and "gap" not in loss.signals
    assert all(float(loss.signals[f"f/{m}"]) == 1.0 for m in mods)


def test_state_dict_round_trip_restores_emas_and_previous_aucs() -> None:
    model = tiny_model(MODS)
    method = build_method("multifair", {"tau": 0.0}, MODS, G)
    for seed in (1, 2):
        run_loss(method, model, tiny_batch(MODS, seed=seed))
    state = method.state_dict()
    assert set(state) == {"prev_auc", "group_ema"}
    assert not torch.equal(state["group_ema"], torch.full((2, G), 0.5))
    restored = build_method("multifair", {"tau": 0.0}, MODS, G)
    restored.load_state_dict(copy.deepcopy(state))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert set(torch.load(buffer, weights_only=True)) == set(state)  # checkpoint-loadable
    batch = tiny_batch(MODS, seed=3)
    _, a = run_loss(method, model, batch)
    _, b = run_loss(restored, model, batch)
    assert as_float(a.signals) == as_float(b.signals)
    assert torch.equal(method.group_ema, restored.group_ema)
    # Outside training (method.eval()) the signals are computed but the state does not advance.
    frozen = copy.deepcopy(method.state_dict())
    method.eval()
    run_loss(method, model, tiny_batch(MODS, seed=4))
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in frozen.items())


def test_parameter_validation_names_the_key() -> None:
    with pytest.raises(UserError, match="clamp"):
        build_method("multifair", {"clamp": [2.0, 1.0]}, MODS, G)
    with pytest.raises(UserError, match=r"surrogate.*unknown key"):
        build_method("multifair_released", {"surrogate": "sigmoid"}, MODS, G)
    with pytest.raises(UserError, match="factor_on"):
        build_method("multifair", {"factor_on": "weights"}, MODS, G)
    with pytest.raises(UserError, match="ema"):
        build_method("multifair", {"ema": 1.0}, MODS, G)
    with pytest.raises(UserError, match="two modalities"):
        build_method("multifair", {}, ["a"], G)
    assert isinstance(build_method("multifair", {"modality_level": False}, ["a"], G), MultiFair)


# ---- no host synchronisation ---------------------------------------------------------------
SYNC_FREE = [
    ("multifair", {}),
    ("multifair", {"factor_on": "step_size", "surrogate": "logistic"}),
    ("multifair", {"modality_level": False}),
    ("multifair_released", {}),
    ("erm", {}),
    ("grad_factor", {"factors": {"a": 0.5}}),
    ("unimodal", {"modality": "a"}),
]


def run_step_on_fake_tensors(name: str, params: dict) -> LossOutput:
    """One full step (forward, loss, backward, modulate, lr factors) on FakeTensors, which
    carry shapes but no data: `.item()`, `if tensor:` and boolean-mask indexing raise there
    (DataDependentOutputException / DynamicOutputShapeException). Passing means the hooks
    never need a value on the host, i.e. no host sync on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mods = METHODS.get(name).model_modalities(METHODS.get(name).Params(**params), MODS)
    model, method = tiny_model(mods), build_method(name, params, mods, G)
    batch = tiny_batch(mods, seed=1)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}
        ctx = make_ctx(model, G)
        out = method(model, fake)
        loss = method.loss(out, fake, ctx)
        method.backward(loss, out, fake, ctx)
        method.modulate_gradients(model, loss, ctx)
        method.lr_factors(loss, ctx)
    return loss


@pytest.mark.parametrize(("name", "params"), SYNC_FREE)
def test_step_needs_no_host_sync(name: str, params: dict) -> None:
    loss = run_step_on_fake_tensors(name, params)
    assert loss.total.shape == ()


def test_fake_tensor_harness_catches_syncs() -> None:
    """The harness above can fail: each forbidden pattern raises under it."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensorMode,
    )

    sync = (DataDependentOutputException, DynamicOutputShapeException)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(6))
        for forbidden in (lambda: x.sum().item(), lambda: x[x > 0], lambda: bool(x.sum() > 0)):
            with pytest.raises(sync):
                forbidden()


# ---- through the real trainer ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("multifair", {"tau": 0.0}),
        ("multifair", {"factor_on": "step_size"}),
        ("multifair_released", {}),
    ],
)
def test_trains_end_to_end_and_logs_its_signals(tmp_path, name: str, params: dict) -> None:
    """A short `train` run on a two-modality table: finite metrics, the signals in log.jsonl,
    the method state in the checkpoint, and (step_size) the factors on the encoder lrs."""
    import json

    import pandas as pd

    from multifair.training.checkpoint import load
    from multifair.training.config import resolve_run_config
    from multifair.training.trainer import train

    gen = torch.Generator().manual_seed(0)
    n = 240
    y = (torch.rand(n, generator=gen) < 0.5).long()
    strong = torch.randn(n, 3, generator=gen) + 1.0 * y[:, None]
    weak = torch.randn(n, 3, generator=gen) + 0.3 * y[:, None]
    race = torch.randint(0, 3, (n,), generator=gen)
    table = {f"s{i}": strong[:, i].tolist() for i in range(3)}
    table |= {f"w{i}": weak[:, i].tolist() for i in range(3)}
    table |= {"race": [["a", "b", "c"][int(r)] for r in race], "label": y.tolist()}
    pd.DataFrame(table).to_csv(tmp_path / "toy.csv", index=False)
    cfg = resolve_run_config(
        base={
            "data": {
                "kind": "table",
                "path": str(tmp_path / "toy.csv"),
                "label": "label",
                "attribute_columns": {"race": "race"},
                "columns": {
                    "strong": {"columns": ["s0", "s1", "s2"]},
                    "weak": {"columns": ["w0", "w1", "w2"]},
                },
                "num_workers": 0,
            },
            "model": {"preset": "small", "dim": 16, "layers": 1},
            "method": {"name": name, **params},
            "train": {
                "epochs": 2,
                "batch_size": 32,
                "device": "cpu",
                "amp": "off",
                "progress": False,
                "tensorboard": False,
                "log_every": 1,
                "seed": 0,
            },
            "output": {"dir": str(tmp_path / "runs"), "predictions": []},
        }
    )
    result = train(cfg)
    assert math.isfinite(result.metrics["test"]["overall"]["auc"])
    steps = [
        row
        for row in map(json.loads, (result.run_dir / "log.jsonl").open())
        if row["kind"] == "step"
    ]
    assert steps
    for key in ("B/strong", "f/weak", "factor/strong", "gap", "fair_mode", "loss/gm"):
        assert all(math.isfinite(row[key]) for row in steps), key
    if params.get("factor_on") == "step_size":
        assert all(row["lr_factor/weak"] == pytest.approx(row["factor/weak"]) for row in steps)
    state = load(result.run_dir / "checkpoints" / "last.pt")["method"]
    assert set(state) == {"prev_auc", "group_ema"}
    assert not torch.equal(state["group_ema"], torch.full_like(state["group_ema"], 0.5))
