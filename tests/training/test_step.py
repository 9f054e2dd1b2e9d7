"""The optimisation step: hook order, clipping after edits, lr factors after the schedule,
gradient accumulation, optimizer groups; the schedule; the window meter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import multifair.methods  # noqa: F401  (registers the methods)
from multifair.data.bundle import ModalitySpec
from multifair.methods.base import METHODS, Method, StepContext, build_method
from multifair.models import build_model
from multifair.training.config import TrainConfig
from multifair.training.distributed import DistEnv
from multifair.training.logging import WindowMeter
from multifair.training.trainer import Schedule, build_optimizer, train_step

SPECS = {
    "labs": ModalitySpec("labs", "tabular", (6,), 6, (6,), "float32"),
    "vitals": ModalitySpec("vitals", "tabular", (4,), 4, (4,), "float32"),
}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"preset": "small", "dim": 8, "heads": 2, "layers": 1}, SPECS)


def tiny_batch(n: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "labs": torch.randn(n, 6, generator=g),
        "vitals": torch.randn(n, 4, generator=g),
        "label": torch.arange(n) % 2,
        "group": torch.arange(n) % 3,
        "attributes": {"race": torch.arange(n) % 3},
        "sample_id": [f"s{i}" for i in range(n)],
        "index": torch.arange(n),
    }


def ctx_for(model: nn.Module, accumulate: int = 1) -> StepContext:
    return StepContext(
        step=0,
        epoch=0,
        total_steps=10,
        n_groups=3,
        gather=lambda t: t,
        scale=(lambda t: t / accumulate),
        model=model,
    )


class Recorder(Method):
    """ERM that records the hook order, blows gradients up in modulate_gradients (so clipping
    must come after it to bound them) and asks for lr factors."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def forward(self, model, batch):
        self.calls.append("forward")
        return super().forward(model, batch)

    def loss(self, out, batch, ctx):
        self.calls.append("loss")
        return super().loss(out, batch, ctx)

    def backward(self, loss, out, batch, ctx):
        self.calls.append("backward")
        super().backward(loss, out, batch, ctx)

    def modulate_gradients(self, model, loss, ctx):
        self.calls.append("modulate_gradients")
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(1e4)
        return {"edited": torch.tensor(1.0)}

    def lr_factors(self, loss, ctx):
        self.calls.append("lr_factors")
        return {"labs": torch.tensor(0.5), "vitals": 2.0}


def test_hooks_run_in_protocol_order_and_clip_follows_the_edits():
    model = tiny_model()
    method = Recorder(METHODS.get("erm").Params(), list(SPECS), 3)
    tc = TrainConfig(lr=1e-3, aux_lr=1e-4, clip=0.8)
    optimizer, groups = build_optimizer(model, method, tc, torch.device("cpu"))
    seen = {}

    def before_step(opt, args, kwargs):  # what AdamW sees when it steps
        method.calls.append("optimizer.step")
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen["norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        seen["lr"] = {g["name"]: g["lr"] for g in opt.param_groups}

    optimizer.register_step_pre_hook(before_step)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    result = train_step(
        [tiny_batch()],
        model=model,
        method=method,
        optimizer=optimizer,
        scaler=scaler,
        groups=groups,
        ctx=ctx_for(model),
        lr_scale=0.25,
        clip=0.8,
        amp_dtype=None,
        env=DistEnv(),
    )
    assert method.calls == [
        "forward",
        "loss",
        "backward",
        "modulate_gradients",
        "lr_factors",
        "optimizer.step",
    ]
    # the edit multiplied the gradients by 1e4; clipping after it bounds the norm at 0.8
    assert seen["norm"] == pytest.approx(0.8, rel=1e-4)
    assert float(result.stats["grad_norm"]) > 100  # the pre-clip norm, edits included
    # lr = scheduled lr * factor on encoder groups only; aux keeps its own base lr
    assert seen["lr"] == pytest.approx(
        {
            "encoder/labs": 1e-3 * 0.25 * 0.5,
            "encoder/vitals": 1e-3 * 0.25 * 2.0,
            "rest": 1e-3 * 0.25,
            "aux": 1e-4 * 0.25,
        }
    )
    assert {"loss/total", "loss/task", "loss/aux", "edited", "lr_factor/labs"} <= set(result.stats)


def test_optimizer_groups_partition_the_model_and_carry_released_hyperparameters():
    model = tiny_model()
    method = build_method("erm", {}, list(SPECS), 3)
    optimizer, groups = build_optimizer(model, method, TrainConfig(), torch.device("cpu"))
    assert [g.name for g in groups] == ["encoder/labs", "encoder/vitals", "rest", "aux"]
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["aux"]["lr"] == 1e-5 and by_name["aux"]["weight_decay"] == 3e-3
    assert by_name["rest"]["lr"] == 3e-5 and by_name["rest"]["weight_decay"] == 6e-3
    enc = {id(p) for p in model.encoders["labs"].parameters()}
    assert {id(p) for p in by_name["encoder/labs"]["params"]} == enc
    counted = sum(len(g["params"]) for g in optimizer.param_groups)
    assert counted == len(list(model.parameters()))


def plain_step(micro, model, method, optimizer, groups):
    """One `train_step` over `micro` on the CPU: fp32, no clipping, scheduled lr x 1."""
    return train_step(
        micro,
        model=model,
        method=method,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        groups=groups,
        ctx=ctx_for(model, len(micro)),
        lr_scale=1.0,
        clip=None,
        amp_dtype=None,
        env=DistEnv(),
    )


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 8 with accumulate=2 reach AdamW with the gradient of one batch of 16."""
    big = tiny_batch(16)
    halves = [
        {
            k: (
                v[s]
                if torch.is_tensor(v)
                else ({a: c[s] for a, c in v.items()} if isinstance(v, dict) else v[s])
            )
            for k, v in big.items()
        }
        for s in (slice(0, 8), slice(8, 16))
    ]
    grads = []
    for micro in ([big], halves):
        model = tiny_model(seed=3)
        model.eval()  # no dropout: the two runs see the same function
        method = build_method("erm", {}, list(SPECS), 3)
        optimizer, groups = build_optimizer(
            model, method, TrainConfig(lr=1e-2), torch.device("cpu")
        )
        params = list(model.parameters())
        optimizer.register_step_pre_hook(
            lambda opt, a, k, ps=params: grads.append(torch.cat([p.grad.flatten() for p in ps]))
        )
        plain_step(micro, model, method, optimizer, groups)
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["multifair", "multifair_adam", "cggm"])
def test_method_state_advances_once_per_step_with_accumulation(name):
    """With accumulate=2 a method's step-to-step state (previous AUCs, EMAs) advances once, from
    the last micro-batch: the same state, and the same signals (factors), as a step that saw
    only that micro-batch."""
    first, last = tiny_batch(16, seed=1), tiny_batch(16, seed=2)
    states, signals = [], []
    for micro in ([first, last], [last], []):
        model = tiny_model(seed=3)
        model.eval()  # no dropout: both steps see the same function
        method = build_method(name, {}, list(SPECS), 3)
        method.setup(model)
        if micro:
            optimizer, groups = build_optimizer(
                model, method, TrainConfig(lr=1e-2), torch.device("cpu")
            )
            result = plain_step(micro, model, method, optimizer, groups)
            signals.append(result.loss.signals)
        states.append({k: v.clone() for k, v in method.state_dict().items()})
    accumulated, single, initial = states
    assert any(not torch.equal(single[k], initial[k]) for k in initial)  # the state moved
    for key in initial:
        torch.testing.assert_close(accumulated[key], single[key], msg=key)
    assert signals[0].keys() == signals[1].keys()
    for key in signals[0]:
        torch.testing.assert_close(signals[0][key], signals[1][key], msg=key)


def test_schedule_warmup_cosine_and_plateau():
    s = Schedule(TrainConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), total_steps=14)
    assert [s(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # after warm-up: 0.1 + 0.9 * (1 + cos(pi * t / 10)) / 2
    for i in (4, 9, 13, 14):
        t = (i - 4) / 10
        assert s(i) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    p = Schedule(TrainConfig(schedule="plateau", plateau_patience=1, plateau_factor=0.5), 10)
    for metric, expected in [
        (0.7, 1.0),
        (0.6, 1.0),
        (0.65, 0.5),
        (0.8, 0.5),
        (0.8, 0.5),
        (0.7, 0.25),
    ]:
        p.epoch_end(metric)
        assert p(5) == expected
    q = Schedule(TrainConfig(schedule="plateau"), 10)
    q.load_state_dict(p.state_dict())
    assert q(5) == 0.25 and q.best == 0.8


def test_window_meter_means_and_modality_names():
    meter = WindowMeter(["fundus", "oct"])
    rows = [(0.0, [0.2, 0.8], 1.0), (1.0, [0.4, 0.6], 3.0), (1.0, [0.6, 0.4], 5.0)]
    for fair, b, loss in rows:
        meter.add({"fair_mode": torch.tensor(fair), "B": torch.tensor(b), "loss/total": loss})
    out = meter.flush()
    assert out["fair_mode"] == pytest.approx(2 / 3)  # the fairness-mode rate of the window
    assert out["B/fundus"] == pytest.approx(0.4) and out["B/oct"] == pytest.approx(0.6)
    assert out["loss/total"] == pytest.approx(3.0)
    assert meter.flush() == {}


def _step_update_norms(method_name: str, params: dict) -> dict[str, float]:
    model = tiny_model()
    method = build_method(method_name, params, list(SPECS), 3)
    tc = TrainConfig(lr=1e-3, aux_lr=1e-4, clip=0.8)
    optimizer, groups = build_optimizer(model, method, tc, torch.device("cpu"))
    before = {m: [p.detach().clone() for p in ps] for m, ps in model.modality_parameters().items()}
    result = train_step(
        [tiny_batch()],
        model=model,
        method=method,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        groups=groups,
        ctx=ctx_for(model),
        lr_scale=1.0,
        clip=0.8,
        amp_dtype=None,
        env=DistEnv(),
        measure_update=True,
    )
    # the returned norm is ||theta_after - theta_before|| over the encoder's parameters
    for m, params_m in model.modality_parameters().items():
        want = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params_m, before[m])))
        assert float(result.update_norms[m]) == pytest.approx(float(want), rel=1e-5)
    return {m: float(v) for m, v in result.update_norms.items()}


def test_update_norm_measures_the_step_size_factor_not_the_gradient_factor():
    plain = _step_update_norms("erm", {})
    halved_lr = _step_update_norms("lr_split", {"factors": {"labs": 0.5}})
    halved_grad = _step_update_norms("grad_factor", {"factors": {"labs": 0.5}})
    # AdamW: x0.5 on the step size halves the update; x0.5 on the gradient does not
    assert halved_lr["labs"] / plain["labs"] == pytest.approx(0.5, rel=1e-3)
    assert halved_lr["vitals"] == pytest.approx(plain["vitals"], rel=1e-5)
    assert halved_grad["labs"] / plain["labs"] == pytest.approx(1.0, rel=1e-2)
