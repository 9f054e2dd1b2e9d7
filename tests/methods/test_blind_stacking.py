"""`group_fusion: blind_stacking` (methods/group_fusion.py): ONE recombination of the fused and
modality margins for everyone, fitted with group-balanced sample weights; the group is read by
the fit only, never at inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model

from multifair.methods.base import build_method
from multifair.methods.group_fusion import (
    SharedStacking,
    fit_blind_stacking,
    fit_group_stacking,
    group_balance_weights,
)

MODALITIES = ["a", "b"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _method(name: str = "multifair_adam", n_groups: int = 2, **params):
    method = build_method(name, {"group_fusion": "blind_stacking", **params}, MODALITIES, n_groups)
    model = tiny_model(MODALITIES)
    method.setup(model)
    return method, model


class _Preds:
    def __init__(self, label, score, aux):
        self.label, self.score, self.aux_scores = label, score, aux


def _preds(n=2000, seed=0, minority=0.2):
    """Modality a is strong for group 0 and weak for group 1 (the minority); b serves both."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    groups = (rng.random(n) < minority).astype(int)
    a = rng.normal(size=n) + (2 * y - 1) * np.where(groups == 0, 1.2, 0.1)
    b = rng.normal(size=n) + (2 * y - 1) * 0.6
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    return _Preds(y, sig(a + b), {"a": sig(a), "b": sig(b)}), groups


def test_balance_weights_give_every_group_the_same_total_and_unknown_samples_one():
    groups = np.array([0] * 6 + [1] * 2 + [-1] * 2 + [5])  # 5: outside the 3 groups
    w = group_balance_weights(groups, 3, power=1.0)
    # 8 known samples, 2 groups present: each group's total is 4
    assert np.isclose(w[groups == 0].sum(), 4) and np.isclose(w[groups == 1].sum(), 4)
    assert np.allclose(w[8:], 1.0)
    half = group_balance_weights(groups, 3, power=0.5)
    assert np.allclose(half[:8], np.sqrt(w[:8]))
    assert np.allclose(group_balance_weights(groups, 3, power=0.0), 1.0)


def _two_group_logistic(rng, n_major, n_minor):
    """Margins x (n, 3) with each group's own true direction: the majority reads column 1,
    the minority column 2."""
    groups = np.r_[np.zeros(n_major, int), np.ones(n_minor, int)]
    x = rng.normal(size=(len(groups), 3))
    true = np.array([[0.0, 2.0, 0.3, 0.0], [0.0, 0.1, 1.5, 0.0]])
    margin = np.einsum("nk,nk->n", np.c_[x, np.ones(len(groups))], true[groups])
    y = (rng.random(len(groups)) < 1 / (1 + np.exp(-margin))).astype(int)
    return x, y, groups


def test_balanced_fit_is_the_fit_on_data_where_every_group_is_equally_represented():
    """Power 1 with a 9:1 majority is exactly the unweighted fit on the data with each minority
    sample repeated 9 times (the prior rescaled by the weights' common factor): its direction
    must match, and must lean further towards the minority's modality than the plain fit's."""
    rng = np.random.default_rng(0)
    x, y, g = _two_group_logistic(rng, 4500, 500)
    prior = 1e-2
    weight, _ = fit_blind_stacking(x, y, g, x, y, 2, prior=prior, power=1.0)
    factor = 5000 / (2 * 4500)  # a majority sample's weight; a minority one's is 9 x that
    repeat = np.where(g == 1, 9, 1)
    want, _, _ = fit_group_stacking(
        np.repeat(x, repeat, axis=0),
        np.repeat(y, repeat),
        np.zeros(repeat.sum(), int),
        1,
        prior=prior / factor,
    )
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    assert np.allclose(unit(weight), unit(want[0]), atol=1e-6)
    plain, _ = fit_blind_stacking(x, y, g, x, y, 2, prior=prior, power=0.0)
    assert weight[2] / weight[1] > 2 * plain[2] / plain[1]  # tilted towards column 2


def test_blind_fit_recovers_a_shared_truth_with_its_scale_from_validation():
    """One direction for everyone, training margins 3x over-confident: the direction comes from
    the pooled fit, the scale and intercept from validation - the truth is recovered."""
    rng = np.random.default_rng(1)
    true = np.array([0.5, -1.0, 1.5, 0.4])
    x = rng.normal(size=(9000, 3))
    y = (rng.random(9000) < 1 / (1 + np.exp(-(x @ true[:3] + true[3])))).astype(int)
    g = (rng.random(9000) < 0.2).astype(int)
    x_tr, y_tr, g_tr, x_val, y_val = 3 * x[:6000], y[:6000], g[:6000], x[6000:], y[6000:]
    weight, bias = fit_blind_stacking(
        np.r_[x_tr, x_val], np.r_[y_tr, y_val], np.r_[g_tr, g[6000:]], x_val, y_val, 2, 1e-3, 1.0
    )
    assert np.allclose(np.r_[weight, bias], true, atol=0.15)


def test_blind_stacking_never_reads_the_attribute_at_inference():
    method, model = _method()
    assert not method.uses_attribute_at_test and method.fits_after_selection
    assert isinstance(method.group_stack, SharedStacking)
    preds, groups = _preds()
    fit = method.on_selected(preds, groups)
    shared = fit["stacking/shared"]
    assert shared["b"] > 0.05 and abs(shared["fused"] - 1) > 1e-3  # a real fit, not identity
    method.eval()
    model.eval()
    batch = tiny_batch(MODALITIES, size=32, groups=torch.tensor([-1, 0, 1, 1] * 8))
    with torch.no_grad():
        got = method(model, batch).logits
        plain = model(batch).logits
        permuted = method(model, {**batch, "group": batch["group"].flip(0)}).logits
        without = method(model, {k: v for k, v in batch.items() if k != "group"}).logits
    assert torch.equal(got, permuted) and torch.equal(got, without)
    assert (got - plain).abs().max() > 1e-3
    # the module alone: the shared affine map of the margins
    m = [plain[:, 1] - plain[:, 0]]
    with torch.no_grad():
        aux = model(batch).aux_logits
    m += [aux[k][:, 1] - aux[k][:, 0] for k in MODALITIES]
    want = torch.stack(m, 1) @ method.group_stack.weight + method.group_stack.bias
    assert torch.allclose(got[:, 1] - got[:, 0], want, atol=1e-5)


def test_blind_fit_leans_on_the_minoritys_modality_more_as_the_power_grows():
    preds, groups = _preds(n=4000, seed=2)
    ratio = []
    for power in (0.0, 0.5, 1.0):
        method, _ = _method(blind_power=power)
        fit = method.on_selected(preds, groups)["stacking/shared"]
        ratio.append(fit["b"] / (fit["fused"] + fit["a"]))
    assert ratio[0] < ratio[1] < ratio[2]


def test_blind_stacking_fits_once_and_round_trips_with_training_predictions():
    preds, groups = _preds(n=400, seed=0)
    train, train_groups = _preds(n=2000, seed=3)
    pooled, _ = _method(stacking_data="train+validation")
    assert pooled.fits_on_train
    fit = pooled.on_selected(preds, groups, train, train_groups)
    assert fit != _method()[0].on_selected(preds, groups)
    with pytest.raises(ValueError, match="groups"):
        _method(stacking_data="train+validation")[0].on_selected(preds, groups, train, None)
    resumed, _ = _method(stacking_data="train+validation")
    resumed.load_state_dict(pooled.state_dict())
    assert not resumed.fits_on_train and bool(resumed.group_stack.fitted)
    assert resumed.on_selected(preds, groups) == fit


def test_blind_power_without_blind_stacking_and_blind_stacking_without_groups_are_user_errors():
    from multifair.errors import UserError

    with pytest.raises(UserError, match="blind_power needs group_fusion: blind_stacking"):
        build_method("multifair_adam", {"blind_power": 0.5}, MODALITIES, 3)
    method = build_method("multifair_adam", {"group_fusion": "blind_stacking"}, MODALITIES, 0)
    with pytest.raises(UserError, match="sensitive attribute"):
        method.setup(tiny_model(MODALITIES))
    fin, _ = _method("fin")  # offered wherever stacking is (FIN itself reads the group)
    assert isinstance(fin.group_stack, SharedStacking) and fin.uses_attribute_at_test


def test_training_with_blind_stacking_fits_after_selection_and_evaluates_alike(tmp_path):
    from multifair.cli import main

    run = tmp_path / "run"
    args = [
        "train", str(CONFIGS / "diabetes.yaml"), "train.epochs=3", "train.batch_size=64",
        "train.progress=false", "train.warmup_steps=0", "model.dim=16", "output.n_boot=0",
        "method.name=multifair_adam", "method.group_fusion=blind_stacking",
        "method.stacking_data=train+validation", "--out", str(run),
    ]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["uses_attribute_at_test"] is False
    shared = metrics["posthoc"]["stacking/shared"]
    assert abs(shared["fused"] - 1) > 1e-3 or abs(shared["bias"]) > 1e-3
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert bool(state["method"]["group_stack.fitted"])
    out = tmp_path / "eval.json"
    args = ["evaluate", str(run), "--split", "test", "--n-boot", "0", "--json", str(out)]
    assert main(args) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["overall"]["auc"] == pytest.approx(metrics["test"]["overall"]["auc"], abs=1e-9)
