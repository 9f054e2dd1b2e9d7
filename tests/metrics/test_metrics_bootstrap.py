"""The vectorised bootstrap against a naive per-resample loop over the SAME indices (sklearn,
fairlearn and the formula oracles), and its percentile intervals against numpy's."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from metric_oracles import all_metrics
from sklearn.metrics import roc_auc_score

from multifair.errors import UserError
from multifair.metrics import (
    bootstrap_indices,
    bootstrap_metrics,
    disaggregate,
    percentile_interval,
    resample_counts,
    summarize,
    weighted_auc,
)

SCALARS = (
    "overall_auc",
    "overall_acc",
    "es_auc",
    "es_acc",
    "dpd",
    "deodds",
    "auc_std_ratio",
    "auc_range_ratio",
)


def small_case(seed: int = 0, n: int = 150):
    """3 groups with ties and ~6% unknown codes; group 2 has 6 samples and 1 positive, so many
    resamples see it with a single class (or not at all)."""
    rng = np.random.default_rng(seed)
    g = rng.choice(2, size=n, p=[0.6, 0.4])
    g[:6] = 2
    y = (rng.random(n) < 0.45).astype(int)
    y[:6] = [1, 0, 0, 0, 0, 0]
    s = np.round(np.clip(0.3 * y + 0.05 * g + rng.random(n) * 0.65, 0, 1), 2)  # ties
    g = np.where((rng.random(n) < 0.06) & (g != 2), -1, g)  # some unknowns
    return y, s, g


def naive_replicates(y, s, g, indices, **policy):
    """Recompute every metric resample by resample with the oracles (sklearn for AUC; DPD and
    DEOdds from the loop rates, whose agreement with fairlearn the test below checks)."""
    rows = []
    for idx in indices:
        yr, sr, gr = y[idx], s[idx], g[idx]
        want = all_metrics(yr, sr, gr, fairlearn=False, **policy)
        want["auc_all"] = roc_auc_score(yr, sr) if 0 < yr.sum() < len(yr) else math.nan
        want["group_auc"] = {c: v["auc"] for c, v in want["groups"].items()}
        want["tpr"] = {c: v["tpr"] for c, v in want["groups"].items()}
        rows.append(want)
    return rows


@pytest.mark.parametrize(
    "policy",
    [
        {"unknown": "drop", "single_class": "skip"},
        {"unknown": "keep", "single_class": "propagate"},
        {"unknown": "drop", "single_class": "propagate", "threshold": 0.4},
    ],
)
def test_replicates_equal_a_naive_loop_over_the_same_indices(policy):
    y, s, g = small_case()
    indices = bootstrap_indices(len(y), 25, seed=7)
    got = bootstrap_metrics(y, s, sensitive_features={"race": g}, indices=indices, **policy)
    naive = naive_replicates(y, s, g, indices, **policy)
    rep = got["attributes"]["race"]
    codes = list(rep["codes"])
    np.testing.assert_allclose(got["overall"]["auc"], [r["auc_all"] for r in naive], atol=1e-12)
    for key in SCALARS:
        np.testing.assert_allclose(rep[key], [r[key] for r in naive], atol=1e-12, err_msg=key)
    for k, code in enumerate(codes):
        np.testing.assert_allclose(
            rep["group_auc"][:, k], [r["group_auc"].get(code, math.nan) for r in naive], atol=1e-12
        )
        np.testing.assert_allclose(
            rep["tpr"][:, k], [r["tpr"].get(code, math.nan) for r in naive], atol=1e-12
        )
    # The case is built so that the edge cases actually occur in these resamples.
    tiny = codes.index(2)
    assert np.isnan(rep["group_auc"][:, tiny]).any()
    if policy["single_class"] == "propagate":
        assert np.isnan(rep["es_auc"]).any()
    else:
        assert not np.isnan(rep["es_auc"]).any()


def test_loop_oracle_dpd_deodds_agree_with_fairlearn():
    for seed in range(4):
        y, s, g = small_case(seed)
        fast = all_metrics(y, s, g, fairlearn=False)
        slow = all_metrics(y, s, g, fairlearn=True)
        assert fast["dpd"] == pytest.approx(slow["dpd"])
        assert fast["deodds"] == pytest.approx(slow["deodds"])


def test_identity_resample_reproduces_the_point_estimates():
    y, s, g = small_case(3, n=300)
    rep = bootstrap_metrics(y, s, sensitive_features={"a": g}, indices=np.arange(len(y))[None, :])[
        "attributes"
    ]["a"]
    table = disaggregate(y, s, groups=g)
    np.testing.assert_allclose(rep["group_auc"][0], table.auc, atol=1e-12)
    for key in ("acc", "selection_rate", "tpr", "fpr"):
        np.testing.assert_allclose(rep[key][0], getattr(table, key), atol=1e-12)
    np.testing.assert_array_equal(rep["n"][0], table.n)
    assert rep["overall_auc"][0] == pytest.approx(table.overall_auc, abs=1e-12)


def test_summary_intervals_are_percentiles_of_the_naive_replicates():
    y, s, g = small_case(5, n=200)
    n_boot = 40
    summary = summarize(y, s, sensitive_features={"race": g}, n_boot=n_boot, seed=11, ci=0.9)
    naive = naive_replicates(y, s, g, bootstrap_indices(len(y), n_boot, seed=11))
    ci = summary["attributes"]["race"]["ci"]
    assert (ci["level"], ci["n_boot"], ci["seed"]) == (0.9, n_boot, 11)
    for key, naive_key in [
        ("es_auc", "es_auc"),
        ("es_acc", "es_acc"),
        ("dpd", "dpd"),
        ("deodds", "deodds"),
        ("auc", "auc_all"),
    ]:
        values = np.array([r[naive_key] for r in naive], dtype=float)
        values = values[~np.isnan(values)]
        assert ci[key] == pytest.approx(list(np.percentile(values, [5, 95])), abs=1e-12), key
    for group in summary["attributes"]["race"]["groups"]:
        values = np.array([r["group_auc"].get(group["code"], math.nan) for r in naive])
        values = values[~np.isnan(values)]
        assert ci["group_auc"][group["name"]] == pytest.approx(
            list(np.percentile(values, [5, 95])), abs=1e-12
        )


def test_seeded_and_independent_of_chunking(monkeypatch):
    y, s, g = small_case(1, n=120)
    a = bootstrap_metrics(y, s, sensitive_features={"a": g}, n_boot=30, seed=4)
    b = bootstrap_metrics(y, s, sensitive_features={"a": g}, n_boot=30, seed=4)
    c = bootstrap_metrics(y, s, sensitive_features={"a": g}, n_boot=30, seed=5)
    np.testing.assert_array_equal(a["attributes"]["a"]["es_auc"], b["attributes"]["a"]["es_auc"])
    assert not np.array_equal(a["attributes"]["a"]["es_auc"], c["attributes"]["a"]["es_auc"])
    import multifair.metrics.bootstrap as bmod

    monkeypatch.setattr(bmod, "_CHUNK_ELEMENTS", 7 * len(y))  # 7 resamples per chunk
    d = bootstrap_metrics(y, s, sensitive_features={"a": g}, n_boot=30, seed=4)
    for key in ("es_auc", "group_auc", "dpd", "tpr"):
        np.testing.assert_array_equal(a["attributes"]["a"][key], d["attributes"]["a"][key])


def test_percentile_interval_ignores_nan_and_checks_level():
    reps = np.array([[1.0, np.nan], [2.0, np.nan], [np.nan, np.nan], [4.0, np.nan]])
    lo, hi = percentile_interval(reps, 0.5)
    assert lo[0] == pytest.approx(np.percentile([1, 2, 4], 25))
    assert hi[0] == pytest.approx(np.percentile([1, 2, 4], 75))
    assert math.isnan(lo[1]) and math.isnan(hi[1])
    with pytest.raises(UserError, match=r"ci=1\.0 must be strictly between 0 and 1"):
        percentile_interval(reps, 1.0)


def test_thousand_resamples_of_three_thousand_take_seconds_not_minutes():
    # The target: 1,000 resamples x 3,000 predictions x 3 groups, all metrics, in a
    # second or two on one core. The bound is loose (shared 2-core machine); a per-resample
    # Python loop would take ~1 minute.
    rng = np.random.default_rng(0)
    n = 3000
    g = rng.integers(0, 3, n)
    y = rng.integers(0, 2, n)
    s = rng.random(n)
    start = time.perf_counter()
    out = bootstrap_metrics(y, s, sensitive_features={"race": g}, n_boot=1000, seed=0)
    assert time.perf_counter() - start < 10.0
    assert out["attributes"]["race"]["es_auc"].shape == (1000,)


def test_weighted_auc_is_sklearns_weighted_auc_per_row():
    """Bootstrap counts (with ties in the scores) and 0/1 subsets, against sklearn's
    sample_weight; a row that weights one class only is NaN."""
    rng = np.random.default_rng(3)
    n = 120
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n), 1)  # ties
    counts = resample_counts(bootstrap_indices(n, 20, seed=1), n)
    subsets = (rng.random((5, n)) < 0.3).astype(float)
    weights = np.concatenate([counts, subsets, (y == 1)[None, :].astype(float)])
    got = weighted_auc(y, s, weights)
    assert got.shape == (26,) and np.isnan(got[-1])
    for row, value in zip(weights[:-1], got[:-1]):
        assert value == pytest.approx(roc_auc_score(y, s, sample_weight=row), abs=1e-12)
    # the same replicates as bootstrap_metrics' overall AUC (same indices)
    reps = bootstrap_metrics(y, s, sensitive_features={}, n_boot=20, seed=1)["overall"]["auc"]
    np.testing.assert_allclose(got[:20], reps, atol=1e-12)
    with pytest.raises(UserError, match="weights: expected shape"):
        weighted_auc(y, s, np.ones(n))


def test_weighted_auc_of_class_probabilities_is_sklearns_macro_one_vs_rest_per_row():
    """(n, K) scores: the macro one-vs-rest AUC under integer bootstrap counts, against
    sklearn on the resampled rows themselves and with sample_weight; the mean over classes of
    the binary weighted AUC of each class against the rest; the replicates of
    bootstrap_metrics' multi-class overall AUC; NaN when a row weights no patient of a class."""
    rng = np.random.default_rng(5)
    n, k = 150, 3
    y = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)) + 1.5 * np.eye(k)[y]
    p = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 2)  # ties
    p /= p.sum(axis=1, keepdims=True)
    indices = bootstrap_indices(n, 20, seed=2)
    counts = resample_counts(indices, n)
    missing_class = (y != 2)[None, :].astype(float)
    got = weighted_auc(y, p, np.concatenate([counts, missing_class]))
    assert got.shape == (21,) and np.isnan(got[-1])
    for idx, row, value in zip(indices, counts, got[:-1]):
        resampled = roc_auc_score(y[idx], p[idx], multi_class="ovr", average="macro")
        assert value == pytest.approx(resampled, abs=1e-12)
        weighted = roc_auc_score(y, p, multi_class="ovr", average="macro", sample_weight=row)
        assert value == pytest.approx(weighted, abs=1e-12)
    per_class = np.mean([weighted_auc(y == c, p[:, c], counts) for c in range(k)], axis=0)
    np.testing.assert_allclose(got[:-1], per_class, atol=1e-12)
    reps = bootstrap_metrics(y, p, sensitive_features={}, n_boot=20, seed=2)["overall"]["auc"]
    np.testing.assert_allclose(got[:-1], reps, atol=1e-12)
    everyone = weighted_auc(y, p, np.ones((1, n)))[0]
    assert everyone == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
