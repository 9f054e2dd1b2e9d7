"""Multi-class scores (n, K): the macro one-vs-rest AUC and its group / ES versions against
scikit-learn, argmax accuracy, the per-class DPD / DEOdds, degenerate groups, the bootstrap
against a naive loop, and input checks (docs/metrics.md, "Multi-class labels")."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from multifair.errors import UserError
from multifair.metrics import (
    accuracy,
    bootstrap_indices,
    bootstrap_metrics,
    demographic_parity_difference,
    disaggregate_multiclass,
    equalized_odds_difference,
    es_acc,
    es_auc,
    format_table,
    group_auc,
    roc_auc,
    summarize,
)


def make(n: int = 300, k: int = 4, g: int = 3, seed: int = 0, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    groups = rng.integers(0, g, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal * (1 + groups)  # the groups differ in how well they do
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True), groups


def sk_macro(y, p):
    return roc_auc_score(y, p, multi_class="ovr", average="macro")


@pytest.mark.parametrize("k", [3, 4])
def test_macro_ovr_auc_and_group_auc_equal_sklearn(k):
    y, p, g = make(k=k)
    assert roc_auc(y, p) == pytest.approx(sk_macro(y, p), abs=1e-12)
    per_group = group_auc(y, p, groups=g)
    assert per_group == pytest.approx({c: sk_macro(y[g == c], p[g == c]) for c in range(3)})
    # the groups were built to differ, so the group AUCs must too (a check that can fail)
    assert max(per_group.values()) - min(per_group.values()) > 0.05


def test_es_auc_and_es_acc_from_the_group_values():
    y, p, g = make()
    overall = sk_macro(y, p)
    groups = [sk_macro(y[g == c], p[g == c]) for c in range(3)]
    expected = overall / (1 + sum(abs(a - overall) for a in groups))
    assert es_auc(y, p, groups=g) == pytest.approx(expected, abs=1e-12)
    pred = p.argmax(axis=1)
    acc = np.mean(pred == y)
    accs = [np.mean(pred[g == c] == y[g == c]) for c in range(3)]
    assert accuracy(y, p) == pytest.approx(acc)
    assert es_acc(y, p, groups=g) == pytest.approx(acc / (1 + sum(abs(a - acc) for a in accs)))


def test_dpd_and_deodds_are_the_worst_class_of_one_vs_rest():
    y, p, g = make(k=3)
    pred = p.argmax(axis=1)
    dpd, deo = 0.0, 0.0
    for k in range(3):
        sel = [np.mean(pred[g == c] == k) for c in range(3)]
        tpr = [np.mean(pred[(g == c) & (y == k)] == k) for c in range(3)]
        fpr = [np.mean(pred[(g == c) & (y != k)] == k) for c in range(3)]
        dpd = max(dpd, max(sel) - min(sel))
        deo = max(deo, max(tpr) - min(tpr), max(fpr) - min(fpr))
    assert demographic_parity_difference(y, p, groups=g) == pytest.approx(dpd)
    assert equalized_odds_difference(y, p, groups=g) == pytest.approx(deo)


def test_two_columns_reduce_to_the_binary_metrics():
    """K = 2 given as a (n, 2) matrix: the same numbers as the binary score p[:, 1] at 0.5."""
    y, p, g = make(k=2, seed=3)
    s = p[:, 1]
    assert roc_auc(y, p) == pytest.approx(roc_auc(y, s))
    assert es_auc(y, p, groups=g) == pytest.approx(es_auc(y, s, groups=g))
    assert es_acc(y, p, groups=g) == pytest.approx(es_acc(y, s, groups=g))
    assert demographic_parity_difference(y, p, groups=g) == pytest.approx(
        demographic_parity_difference(y, s, groups=g)
    )
    assert equalized_odds_difference(y, p, groups=g) == pytest.approx(
        equalized_odds_difference(y, s, groups=g)
    )


def test_a_group_missing_a_class_has_no_auc_and_is_skipped_not_a_crash():
    y, p, g = make(k=3)
    y = y.copy()
    y[(g == 0) & (y == 2)] = 1  # group 0 has no class 2 any more
    table = disaggregate_multiclass(y, p, groups=g)
    assert math.isnan(table.auc[0]) and not np.isnan(table.auc[1:]).any()
    assert np.isnan(table.tpr[0, 2]) and not np.isnan(table.tpr[1:]).any()
    summary = summarize(
        y, p, sensitive_features={"race": g}, class_names=["a", "b", "c"], n_boot=50
    )
    entry = summary["attributes"]["race"]
    assert entry["groups"][0]["auc"] is None
    assert "no samples of class c" in entry["groups"][0]["auc_note"]
    assert entry["skipped_groups"] == ["0"]
    groups_auc = [sk_macro(y[g == c], p[g == c]) for c in (1, 2)]
    overall = sk_macro(y, p)
    assert entry["es_auc"] == pytest.approx(
        overall / (1 + sum(abs(a - overall) for a in groups_auc))
    )
    assert entry["ci"]["group_auc"]["0"] == [None, None]
    assert "missing class" in format_table(summary)
    propagated = summarize(y, p, sensitive_features={"race": g}, single_class="propagate")
    assert propagated["attributes"]["race"]["es_auc"] is None


def test_summary_schema_and_table():
    y, p, g = make(k=4)
    names = ["normal", "early", "intermediate", "late"]
    s = summarize(y, p, sensitive_features={"race": g}, class_names=names, n_boot=100)
    assert s["classes"] == names
    assert s["class_counts"] == {c: int((y == k).sum()) for k, c in enumerate(names)}
    assert s["overall"]["auc"] == pytest.approx(sk_macro(y, p))
    group = s["attributes"]["race"]["groups"][1]
    assert set(group["tpr"]) == set(names) and group["class_counts"]["late"] == int(
        ((g == 1) & (y == 3)).sum()
    )
    lo, hi = s["attributes"]["race"]["ci"]["es_auc"]
    assert lo < s["attributes"]["race"]["es_auc"] < hi
    text = format_table(s)
    assert "macro one-vs-rest AUC" in text and "late" in text


def test_bootstrap_equals_a_naive_loop_over_the_same_resamples():
    y, p, g = make(n=120, k=3, seed=5)
    idx = bootstrap_indices(len(y), 12, seed=1)
    boot = bootstrap_metrics(y, p, sensitive_features={"race": g}, indices=idx)
    reps = boot["attributes"]["race"]
    for r, i in enumerate(idx):
        yi, pi, gi = y[i], p[i], g[i]
        assert boot["overall"]["auc"][r] == pytest.approx(roc_auc(yi, pi), nan_ok=True)
        assert reps["es_auc"][r] == pytest.approx(es_auc(yi, pi, groups=gi), nan_ok=True)
        assert reps["es_acc"][r] == pytest.approx(es_acc(yi, pi, groups=gi))
        assert reps["dpd"][r] == pytest.approx(demographic_parity_difference(yi, pi, groups=gi))
        assert reps["deodds"][r] == pytest.approx(equalized_odds_difference(yi, pi, groups=gi))
        expected = group_auc(yi, pi, groups=gi)
        assert reps["group_auc"][r] == pytest.approx([expected[c] for c in range(3)], nan_ok=True)


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 3], [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], "class indices 0..2"),
        ([0, 1], [[0.5, 0.4, 0.0], [0.2, 0.3, 0.5]], "sums to 0.9"),
        ([0, 1], [[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]], "probabilities in [0, 1]"),
        ([0, 1, 2], [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], "one entry per prediction"),
    ],
)
def test_bad_multiclass_inputs_are_one_line_errors(y, p, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        roc_auc(y, p)
