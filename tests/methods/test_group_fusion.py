"""`multifair_adam group_fusion: stacking` (methods/group_fusion.py): per-group weights on
the fused and modality margins, fitted on validation after selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model

from multifair.methods.base import build_method
from multifair.methods.group_fusion import (
    GroupStacking,
    fit_group_stacking,
    fit_group_stacking_pooled,
    stacked_margins,
)

MODALITIES = ["a", "b"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _method(fusion: str, n_groups: int = 3, **params):
    method = build_method(
        "multifair_adam", {"group_fusion": fusion, **params}, MODALITIES, n_groups
    )
    model = tiny_model(MODALITIES)
    method.setup(model)
    return method, model


def test_the_run_is_marked_as_using_the_attribute_at_test():
    method, _ = _method("stacking")
    assert method.uses_attribute_at_test and method.fits_after_selection
    plain = build_method("multifair_adam", {}, MODALITIES, 3)
    assert not plain.uses_attribute_at_test and not plain.fits_after_selection


def test_forward_before_setup_is_a_clear_error():
    method = build_method("multifair_adam", {"group_fusion": "stacking"}, MODALITIES, 3)
    method.eval()
    with pytest.raises(RuntimeError, match="setup"):
        method(tiny_model(MODALITIES), tiny_batch(MODALITIES))


def test_the_fit_changes_only_the_predictions_of_known_groups():
    method, model = _method("stacking")
    method.eval()
    model.eval()
    groups = torch.tensor([-1, 0, 1, 2] * 8)
    batch = tiny_batch(MODALITIES, size=32, groups=groups)
    method.group_stack.weight.copy_(torch.randn_like(method.group_stack.weight))
    with torch.no_grad():
        plain = torch.softmax(model(batch).logits, 1)[:, 1]
        stacked = torch.softmax(method(model, batch).logits, 1)[:, 1]
    unknown = groups == -1
    assert torch.allclose(stacked[unknown], plain[unknown], atol=1e-6)
    assert (stacked[~unknown] - plain[~unknown]).abs().min() > 1e-4


# ---- stacking: fitted on validation after selection ------------------------------------------


def test_stacking_fit_recovers_each_groups_weights_and_a_strong_prior_keeps_the_shared_one():
    rng = np.random.default_rng(0)
    n = 6000
    groups = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 3))
    true = np.array([[1.0, 0.0, 0.0, 0.0], [0.2, -0.5, 1.5, 0.4]])  # (G, K + 1)
    margin = np.einsum("nk,nk->n", np.c_[x, np.ones(n)], true[groups])
    y = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(int)
    weight, bias, fitted = fit_group_stacking(x, y, groups, 3, prior=1e-3)
    assert fitted.tolist() == [True, True, False]  # group 2 has no sample: shared model kept
    assert np.allclose(np.c_[weight, bias][:2], true, atol=0.12)
    assert np.allclose(weight[2], [1, 0, 0]) and bias[2] == 0
    strong, strong_bias, _ = fit_group_stacking(x, y, groups, 3, prior=1e6)
    assert np.allclose(strong, [[1, 0, 0]] * 3, atol=1e-2) and np.allclose(
        strong_bias, 0, atol=1e-2
    )


def test_stacking_fit_skips_a_group_with_too_few_of_a_class():
    x = np.random.default_rng(1).normal(size=(40, 2))
    y = np.r_[np.ones(3), np.zeros(37)].astype(int)  # 3 positives < min_per_class
    weight, bias, fitted = fit_group_stacking(x, y, np.zeros(40, int), 1, prior=1.0)
    assert not fitted[0] and np.allclose(weight[0], [1, 0]) and bias[0] == 0


def test_stacking_module_matches_a_hand_computation_and_leaves_unknown_groups():
    stack = GroupStacking(2, MODALITIES)
    stack.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]]))
    stack.bias.copy_(torch.tensor([0.3, -0.2]))
    z = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.5, 4.0]])  # fused margins 2, -1, 3.5
    u = {"a": torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 9.0]]), "b": torch.ones(3, 2)}
    out = stack(z, u, torch.tensor([0, 1, -1]))
    margin = out[:, 1] - out[:, 0]
    assert torch.allclose(margin, torch.tensor([0.5 * 2 - 1.0 * 1 + 0.3, -1 - 0.2, 3.5]))


def test_stacking_is_the_identity_in_training_and_before_the_fit():
    method, model = _method("stacking")
    batch = tiny_batch(MODALITIES, size=32)
    method.group_stack.weight.copy_(torch.randn_like(method.group_stack.weight))
    method.train()
    model.eval()  # no dropout: compare the predictions alone
    with torch.no_grad():
        assert torch.equal(method(model, batch).logits, model(batch).logits)
    fresh, model2 = _method("stacking")
    fresh.eval()
    model2.eval()
    with torch.no_grad():
        got = torch.softmax(fresh(model2, batch).logits, 1)
        want = torch.softmax(model2(batch).logits, 1)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    "method, data",
    [
        ("multifair_adam", "validation"),
        ("fin", "validation"),
        ("multifair_adam", "train+validation"),
    ],
)
def test_training_with_stacking_fits_after_selection_and_the_checkpoint_carries_the_fit(
    tmp_path, method, data
):
    import json

    from multifair.cli import main

    run = tmp_path / "run"
    args = [
        "train", str(CONFIGS / "diabetes.yaml"), "train.epochs=3", "train.batch_size=64",
        "train.progress=false", "train.warmup_steps=0", "model.dim=16", "output.n_boot=0",
        f"method.name={method}", "method.group_fusion=stacking", f"method.stacking_data={data}",
        "--out", str(run),
    ]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["uses_attribute_at_test"] is True
    assert metrics["posthoc"]["stacking_data"] == data
    fits = [v for k, v in metrics["posthoc"].items() if k.startswith("stacking/")]
    assert len(fits) == 2 and all(f is not None for f in fits)
    assert any(abs(f["fused"] - 1) > 1e-3 or abs(f["bias"]) > 1e-3 for f in fits)
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert not torch.allclose(state["method"]["group_stack.bias"], torch.zeros(2))
    out = tmp_path / "eval.json"
    args = ["evaluate", str(run), "--split", "test", "--n-boot", "0", "--json", str(out)]
    assert main(args) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["overall"]["auc"] == pytest.approx(metrics["test"]["overall"]["auc"], abs=1e-9)


def test_stacking_without_groups_or_with_more_classes_is_a_user_error():
    from multifair.errors import UserError

    method = build_method("multifair_adam", {"group_fusion": "stacking"}, MODALITIES, 0)
    with pytest.raises(UserError, match="sensitive attribute"):
        method.setup(tiny_model(MODALITIES))
    method = build_method("multifair_adam", {"group_fusion": "stacking"}, MODALITIES, 2)
    model = tiny_model(MODALITIES)
    model.n_classes = 3
    with pytest.raises(UserError, match="binary"):
        method.setup(model)


class _Preds:
    def __init__(self, label, score, aux):
        self.label, self.score, self.aux_scores = label, score, aux


def _val_preds(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    groups = rng.integers(0, 2, n)
    a = rng.normal(size=n) + (2 * y - 1) * np.where(groups == 0, 1.0, 0.1)
    b = rng.normal(size=n) + (2 * y - 1) * 0.8
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    return _Preds(y, sig(a + b), {"a": sig(a), "b": sig(b)}), groups


def test_on_selected_fits_once_and_the_fit_round_trips_through_the_state():
    method, _ = _method("stacking", n_groups=2)
    preds, groups = _val_preds()
    first = method.on_selected(preds, groups)
    assert all(first[f"stacking/{g}"] is not None for g in range(2))
    assert first["stacking/1"]["a"] < first["stacking/0"]["a"]  # a is weak for group 1
    # a second call (a resumed run: preds already stacked) keeps the fit
    other, _ = _val_preds(seed=1)
    assert method.on_selected(other, groups) == first
    fresh, _ = _method("stacking", n_groups=2)
    fresh.load_state_dict(method.state_dict())
    assert fresh.group_stack.fitted.tolist() == [True, True]
    assert fresh.on_selected(other, groups) == first


def test_stacking_fit_converges_where_plain_newton_steps_diverge():
    """A minority of 56 held-out samples whose fused and A margins are nearly collinear and
    bounded, with a weak label link (the hard scenario's failure: undamped Newton steps went to
    weights of 30-90 and wrecked the prediction). The damped fit must reach the penalised
    optimum: gradient ~ 0, objective below the shared model's, weights of sane size."""
    rng = np.random.default_rng(0)
    n = 56
    y = rng.integers(0, 2, n)
    a = np.clip(rng.normal(0, 3, n) + 0.3 * (2 * y - 1), -3.8, 3.8)
    fused = np.clip(a + rng.normal(0, 0.3, n), -3.8, 3.8)
    b = rng.normal(0, 1, n) + 0.5 * (2 * y - 1)
    x = np.c_[fused, a, b]
    weight, bias, fitted = fit_group_stacking(x, y, np.zeros(n, int), 1, prior=1.0)
    theta = np.r_[weight[0], bias[0]]
    theta0 = np.array([1.0, 0, 0, 0])
    design = np.c_[x, np.ones(n)]
    p = 1 / (1 + np.exp(-design @ theta))
    grad = design.T @ (p - y) + 2 * 1.0 * (theta - theta0)
    assert fitted[0] and np.abs(grad).max() < 1e-6
    assert np.abs(theta).max() < 5

    def objective(t):
        z = design @ t
        return np.sum(np.logaddexp(0, z) - y * z) + np.sum((t - theta0) ** 2)

    assert objective(theta) < objective(theta0)


def test_stacking_sees_margins_in_the_range_the_fit_saw():
    """Validation margins come from float32 probabilities (saturating at ~16.1); the module
    clamps the margins it recombines to the same range, so fit and prediction agree."""
    from multifair.methods.group_fusion import MARGIN_LIMIT, logit

    stack = GroupStacking(1, MODALITIES)
    stack.weight.copy_(torch.tensor([[0.5, 0.0, 0.0]]))
    z = torch.tensor([[0.0, 100.0], [0.0, -3.0]])
    u = {m: torch.zeros(2, 2) for m in MODALITIES}
    margin = stack(z, u, torch.tensor([0, 0]))[:, 1]
    assert torch.allclose(margin, torch.tensor([0.5 * MARGIN_LIMIT, -1.5]))
    saturated = torch.softmax(torch.tensor([[0.0, 100.0]]), 1)[0, 1].double().numpy()
    assert logit(np.array([saturated]))[0] == pytest.approx(MARGIN_LIMIT)


# ---- stacking_data: train+validation ----------------------------------------------------------


def _logistic_data(rng, n, weights, groups_p=(0.5, 0.5)):
    """Margins x (n, 3) and labels drawn from each group's true (w | b): (G, 4)."""
    groups = rng.choice(len(groups_p), n, p=groups_p)
    x = rng.normal(size=(n, 3))
    margin = np.einsum("nk,nk->n", np.c_[x, np.ones(n)], weights[groups])
    y = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(int)
    return x, y, groups


def test_pooled_stacking_takes_the_direction_from_both_splits_and_the_scale_from_validation():
    """Training margins are over-confident: here 3x what the same labels give on validation.
    Pooling them in one fit shrinks the weights; the two-stage fit recovers the validation
    truth (direction from both splits, each group's scale and intercept from validation)."""
    rng = np.random.default_rng(0)
    true = np.array([[1.0, 0.0, 0.0, 0.3], [0.3, -0.6, 1.2, -0.4]])
    x_val, y_val, g_val = _logistic_data(rng, 3000, true)
    x_tr, y_tr, g_tr = _logistic_data(rng, 12000, true)
    x_tr = 3 * x_tr  # the same labels, margins 3x as large
    weight, bias, fitted = fit_group_stacking_pooled(
        x_tr, y_tr, g_tr, x_val, y_val, g_val, 2, prior=1e-3
    )
    assert fitted.tolist() == [True, True]
    assert np.allclose(np.c_[weight, bias], true, atol=0.15)
    naive, _, _ = fit_group_stacking(
        np.r_[x_tr, x_val], np.r_[y_tr, y_val], np.r_[g_tr, g_val], 2, prior=1e-3
    )
    assert np.linalg.norm(naive[1]) < 0.6 * np.linalg.norm(true[1, :3])  # shrunk: wrong scale


def test_pooled_stacking_keeps_the_pooled_fit_of_a_group_too_small_on_validation():
    rng = np.random.default_rng(1)
    true = np.array([[0.2, 1.0, -0.5, 0.0]])
    x_tr, y_tr, g_tr = _logistic_data(rng, 2000, true, groups_p=(1.0,))
    x_val = rng.normal(size=(30, 3))
    y_val = np.r_[np.ones(3), np.zeros(27)].astype(int)  # 3 positives: no scale/intercept fit
    weight, bias, fitted = fit_group_stacking_pooled(
        x_tr, y_tr, g_tr, x_val, y_val, np.zeros(30, int), 1, prior=1.0
    )
    pooled, pooled_bias, _ = fit_group_stacking(
        np.r_[x_tr, x_val], np.r_[y_tr, y_val], np.zeros(2030, int), 1, prior=1.0
    )
    assert fitted[0] and np.allclose(weight, pooled) and np.allclose(bias, pooled_bias)


def test_stacked_margins_match_the_module_and_leave_unknown_groups():
    weight = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    bias = np.array([0.3, -0.2])
    x = np.array([[2.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [3.5, 9.0, 0.0]])
    got = stacked_margins(x, np.array([0, 1, -1]), weight, bias)
    assert np.allclose(got, [0.5 * 2 - 1.0 * 1 + 0.3, -1 - 0.2, 3.5])


def test_on_selected_with_training_predictions_uses_them_only_when_asked():
    preds, groups = _val_preds(n=200, seed=0)
    train, train_groups = _val_preds(n=2000, seed=3)
    val_only, _ = _method("stacking", n_groups=2)
    pooled, _ = _method("stacking", n_groups=2, stacking_data="train+validation")
    assert pooled.fits_on_train and not val_only.fits_on_train
    # the validation-only fit ignores training predictions it is handed
    assert val_only.on_selected(preds, groups, train, train_groups) == (
        _method("stacking", n_groups=2)[0].on_selected(preds, groups)
    )
    fit = pooled.on_selected(preds, groups, train, train_groups)
    assert fit != val_only.on_selected(preds, groups)
    assert fit["stacking/1"]["a"] < fit["stacking/0"]["a"]  # a is weak for group 1
    with pytest.raises(ValueError, match="groups"):
        _method("stacking", n_groups=2, stacking_data="train+validation")[0].on_selected(
            preds, groups, train, None
        )
    # a resumed run's best.pt holds the fit: no training pass is asked for, and none is needed
    resumed, _ = _method("stacking", n_groups=2, stacking_data="train+validation")
    resumed.load_state_dict(pooled.state_dict())
    assert not resumed.fits_on_train
    assert resumed.on_selected(preds, groups) == fit


@pytest.mark.parametrize("name", ["multifair_adam", "fin"])
def test_stacking_data_without_stacking_is_a_user_error(name):
    from multifair.errors import UserError

    with pytest.raises(UserError, match="needs group_fusion: stacking"):
        build_method(name, {"stacking_data": "train+validation"}, MODALITIES, 3)
