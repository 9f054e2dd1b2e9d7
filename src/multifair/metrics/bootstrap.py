"""Vectorised percentile bootstrap for every metric in `multifair.metrics.fairness`.

A resample is a multiset of the n predictions, so it is fully described by how many times each
prediction was drawn: a counts matrix W of shape (R, n) built from one index matrix (R, n). Every
metric is then a weighted statistic of W, computed for all R resamples at once:

- AUC (Mann-Whitney with tie-averaged ranks): the scores are sorted ONCE; within each distinct
  score level we sum the positive and negative weights (np.add.reduceat), and
  AUC_r = sum_levels P_r(level) * (N_r(below) + 0.5 * N_r(level)) / (P_r * N_r).
  Per group the same runs on the group's columns only, so all groups together cost one pass.
- counts per group (n, positives, selected, TP, FP, correct) are one matmul W @ F with a
  (n, 6G) indicator matrix F, giving accuracy, selection rate, TPR and FPR per group.
- the cross-group formulas (ES-AUC, ES-ACC, DPD, DEOdds, disparity ratios) are the same array
  functions the point estimates use, applied along the group axis.

Indexing by `bootstrap_indices(n, n_boot, seed)` and recomputing each metric per resample gives
the same numbers (tests/metrics/test_metrics_bootstrap.py checks this against sklearn/fairlearn loops).
A statistic that is undefined in a resample (e.g. a group drawn with a single class) is NaN
there and left out of its percentile interval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from multifair.errors import UserError
from multifair.metrics.fairness import (
    SINGLE_CLASS_POLICIES,
    UNKNOWN,
    UNKNOWN_POLICIES,
    check_inputs,
    check_multiclass_inputs,
    disparity_ratios,
    equity_scaled,
    is_multiclass,
    multiclass_deodds,
    multiclass_dpd,
    spread,
)

__all__ = [
    "bootstrap_indices",
    "bootstrap_metrics",
    "percentile_interval",
    "resample_counts",
    "weighted_auc",
]

# Rows of the counts matrix processed together: bounds memory at ~32 MB per (rows, n) array.
_CHUNK_ELEMENTS = 1 << 22


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The (n_boot, n) matrix of resampled positions (uniform with replacement), seeded.

    `bootstrap_metrics` draws exactly these indices, so a naive per-resample loop over them reproduces
    its replicates."""
    if n_boot < 0:
        raise UserError(f"n_boot={n_boot} must be >= 0")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile interval along axis 0, ignoring NaN replicates: shape (2, ...) = (lo, hi).

    All-NaN columns give NaN."""
    if not (0.0 < level < 1.0):
        raise UserError(f"ci={level!r} must be strictly between 0 and 1 (e.g. 0.95)")
    tail = 100.0 * (1.0 - level) / 2.0
    replicates = np.asarray(replicates, dtype=np.float64)
    out = np.full((2, *replicates.shape[1:]), np.nan)
    valid = ~np.isnan(replicates).all(axis=0)
    if valid.any():
        out[:, valid] = np.nanpercentile(replicates[:, valid], [tail, 100.0 - tail], axis=0)
    return out


class _SortedSubset:
    """A subset of the predictions in score order, with the start of each distinct score level."""

    def __init__(
        self, order: np.ndarray, y_score: np.ndarray, y_true: np.ndarray, mask: np.ndarray
    ):
        self.cols = order[mask[order]]  # (m,) positions, ascending score
        self.is_pos = y_true[self.cols].astype(bool)  # (m,)
        s = y_score[self.cols]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # (U,)

    def auc(self, counts: np.ndarray) -> np.ndarray:
        """Weighted Mann-Whitney AUC per resample; counts (r, n) -> (r,), NaN if single class."""
        w = counts[:, self.cols]  # (r, m)
        pos = np.where(self.is_pos, w, 0.0)
        neg = w - pos
        pos_level = np.add.reduceat(pos, self.starts, axis=1)  # (r, U)
        neg_level = np.add.reduceat(neg, self.starts, axis=1)  # (r, U)
        neg_below = np.cumsum(neg_level, axis=1) - neg_level  # strictly lower scores
        wins = np.einsum("ru,ru->r", pos_level, neg_below + 0.5 * neg_level)
        pairs = pos_level.sum(axis=1) * neg_level.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / pairs, np.nan)


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(r, n) index matrix -> (r, n) float64 multiplicity of each prediction in each resample."""
    r = indices.shape[0]
    flat = (indices + np.arange(r)[:, None] * n).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def weighted_auc(y_true: object, y_score: object, weights: np.ndarray) -> np.ndarray:
    """The AUC of `y_score` under each row of `weights` (r, n): sample i counted weights[r, i]
    times (ties count one half). Rows of `resample_counts` give bootstrap replicates; 0/1 rows
    give the AUC of a subset, e.g. a group under a permutation of the group labels. NaN where a
    row weights a single class. Pairing: the same `weights` on two score vectors of the same
    samples resample the same patients for both.

    Multi-class scores (n, K) of class probabilities (labels 0..K-1) give the macro
    one-vs-rest AUC under each row, as `bootstrap_metrics` computes it: the mean over classes k
    of the weighted AUC of `y == k` scored by column k; NaN where a row weights no patient of
    some class (or no patient outside it)."""
    if is_multiclass(y_score):
        y, p, _ = check_multiclass_inputs(y_true, y_score)
        everyone = np.ones(len(y), dtype=bool)
        subsets = [
            _SortedSubset(np.argsort(p[:, c], kind="stable"), p[:, c], y == c, everyone)
            for c in range(p.shape[1])
        ]
        score = lambda counts: _macro(subsets, counts)  # noqa: E731
    else:
        y, s, _ = check_inputs(y_true, y_score)
        whole = _SortedSubset(np.argsort(s, kind="stable"), s, y, np.ones(len(y), dtype=bool))
        score = whole.auc
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(y):
        raise UserError(f"weights: expected shape (r, {len(y)}), got {weights.shape}")
    chunk = max(1, _CHUNK_ELEMENTS // len(y))
    parts = [score(weights[i : i + chunk]) for i in range(0, len(weights), chunk)]
    return np.concatenate(parts) if parts else np.empty(0)


class _AttributePlan:
    """What one attribute needs per chunk: its subsets in score order and its indicator matrix."""

    def __init__(self, y, s, y_pred, g, order, unknown: str, overall: _SortedSubset):
        evaluated = np.ones(len(y), bool) if unknown == "keep" else g != UNKNOWN
        self.codes = np.unique(g[evaluated])  # (G,)
        if len(self.codes) == 0:
            raise UserError("every sample has an unknown (-1) group: nothing to evaluate")
        self.drops_nothing = bool(evaluated.all())
        # The AUC that ES-AUC compares against: that of the evaluated samples.
        self.overall = overall if self.drops_nothing else _SortedSubset(order, s, y, evaluated)
        in_group = (g[:, None] == self.codes[None, :]) & evaluated[:, None]  # (n, G)
        self.groups = [_SortedSubset(order, s, y, in_group[:, k]) for k in range(len(self.codes))]
        yf, pf = y.astype(np.float64)[:, None], y_pred.astype(np.float64)[:, None]
        ind = in_group.astype(np.float64)
        # Columns: n, positives, selected, TP, FP, correct for each group -> (n, 6G).
        self.features = np.concatenate(
            [ind, ind * yf, ind * pf, ind * yf * pf, ind * (1 - yf) * pf, ind * (yf == pf)],
            axis=1,
        )

    def replicates(
        self, counts: np.ndarray, everyone_auc: np.ndarray, single_class: str, alpha: float
    ) -> dict[str, np.ndarray]:
        """Every metric of this attribute for each resample; `everyone_auc` (r,) is the AUC of
        all samples, reused when this attribute drops nothing."""
        big_g = len(self.codes)
        sums = counts @ self.features  # (r, 6G)
        n, pos, sel, tp, fp, correct = (sums[:, k * big_g : (k + 1) * big_g] for k in range(6))
        present = n > 0  # a group can be missing from a resample
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(present, correct / n, np.nan)
            selection_rate = np.where(present, sel / n, np.nan)
            tpr = np.where(pos > 0, tp / pos, np.where(present, 0.0, np.nan))
            fpr = np.where(n > pos, fp / (n - pos), np.where(present, 0.0, np.nan))
            overall_acc = correct.sum(axis=1) / n.sum(axis=1)
        overall_auc = everyone_auc if self.drops_nothing else self.overall.auc(counts)  # (r,)
        group_auc = np.stack([sub.auc(counts) for sub in self.groups], axis=1)  # (r, G)
        std_ratio, range_ratio = disparity_ratios(
            overall_auc, group_auc, present, single_class=single_class
        )
        return {
            "n": n,
            "positives": pos,
            "group_auc": group_auc,
            "acc": acc,
            "selection_rate": selection_rate,
            "tpr": tpr,
            "fpr": fpr,
            "overall_auc": overall_auc,
            "overall_acc": overall_acc,
            "es_auc": equity_scaled(
                overall_auc, group_auc, present, alpha=alpha, single_class=single_class
            ),
            "es_acc": equity_scaled(overall_acc, acc, present, alpha=alpha),
            "dpd": spread(selection_rate, present),
            "deodds": np.maximum(spread(tpr, present), spread(fpr, present)),
            "auc_std_ratio": std_ratio,
            "auc_range_ratio": range_ratio,
        }


def bootstrap_metrics(
    y_true: object,
    y_score: object,
    *,
    sensitive_features: Mapping[str, object],
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    unknown: str = "drop",
    single_class: str = "skip",
    alpha: float = 1.0,
    indices: np.ndarray | None = None,
) -> dict[str, dict]:
    """Bootstrap replicates of every metric, for all resamples at once.

    All attributes share the same resamples of the n predictions (so their intervals are
    comparable); with unknown="drop" each attribute evaluates the known samples of each resample.
    Returns ``{"overall": {"auc": (R,), "acc": (R,)}, "attributes": {name: {"codes": (G,),
    "group_auc" | "acc" | "selection_rate" | "tpr" | "fpr" | "n" | "positives": (R, G),
    "overall_auc" | "overall_acc" | "es_auc" | "es_acc" | "dpd" | "deodds" | "auc_std_ratio" |
    "auc_range_ratio": (R,)}}}``. `indices` (R, n) overrides the seeded draw. Multi-class
    scores (n, K) give the same keys except "positives", "selection_rate", "tpr", "fpr"
    (per-class there), with the macro one-vs-rest AUCs and the multi-class DPD/DEOdds."""
    if unknown not in UNKNOWN_POLICIES:
        raise UserError(f"unknown={unknown!r} is not one of {list(UNKNOWN_POLICIES)}")
    if single_class not in SINGLE_CLASS_POLICIES:
        raise UserError(
            f"single_class={single_class!r} is not one of {list(SINGLE_CLASS_POLICIES)}"
        )
    if is_multiclass(y_score):
        return _bootstrap_multiclass(
            y_true, y_score, sensitive_features, n_boot, seed, unknown, single_class, alpha, indices
        )
    y, s, _ = check_inputs(y_true, y_score, threshold=threshold)
    n = len(y)
    indices = _resamples(indices, n, n_boot, seed)
    y_pred = (s >= threshold).astype(np.int64)
    order = np.argsort(s, kind="stable")  # the one sort every AUC shares
    everyone = _SortedSubset(order, s, y, np.ones(n, dtype=bool))
    plans = {}
    for name, groups in sensitive_features.items():
        _, _, g = check_inputs(y, s, groups, threshold=threshold)
        plans[name] = _AttributePlan(y, s, y_pred, g, order, unknown, everyone)
    return _drive(indices, y_pred == y, everyone.auc, plans, single_class, alpha)


def _resamples(indices: np.ndarray | None, n: int, n_boot: int, seed: int) -> np.ndarray:
    """The (R, n) resample indices: the given ones, else the seeded draw."""
    indices = bootstrap_indices(n, n_boot, seed) if indices is None else np.asarray(indices)
    assert indices.ndim == 2 and indices.shape[1] == n, "indices must be (R, n)"
    return indices


def _drive(
    indices: np.ndarray,
    correct: np.ndarray,
    everyone_auc: Callable[[np.ndarray], np.ndarray],
    plans: Mapping[str, Any],
    single_class: str,
    alpha: float,
) -> dict[str, dict]:
    """The resampling loop shared by binary and multi-class scores: resample counts in chunks
    (bounded memory), the overall AUC (`everyone_auc(counts)`) and accuracy of each resample,
    and each attribute plan's replicates; then the chunks stacked into `bootstrap_metrics`'
    return value."""
    n = len(correct)
    correct = np.asarray(correct, dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    parts_overall: list[dict[str, np.ndarray]] = []
    parts: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in plans}
    for start in range(0, indices.shape[0], chunk):
        counts = resample_counts(indices[start : start + chunk], n)  # (r, n)
        auc = everyone_auc(counts)  # (r,)
        parts_overall.append({"auc": auc, "acc": counts @ correct / n})
        for name, plan in plans.items():
            parts[name].append(plan.replicates(counts, auc, single_class, alpha))

    def stack(chunks: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
        if not chunks:  # n_boot == 0
            return np.empty((0,))
        return np.concatenate([c[key] for c in chunks], axis=0)

    out: dict[str, dict] = {
        "overall": {k: stack(parts_overall, k) for k in ("auc", "acc")},
        "attributes": {},
    }
    for name, plan in plans.items():
        keys = parts[name][0].keys() if parts[name] else ()
        out["attributes"][name] = {"codes": plan.codes, **{k: stack(parts[name], k) for k in keys}}
    return out


class _MultiClassPlan:
    """`_AttributePlan` for multi-class scores: one sorted subset per (group, class)."""

    def __init__(self, y, p, pred, g, orders, unknown: str, overall: list[_SortedSubset]):
        k = p.shape[1]
        evaluated = np.ones(len(y), bool) if unknown == "keep" else g != UNKNOWN
        self.codes = np.unique(g[evaluated])
        if len(self.codes) == 0:
            raise UserError("every sample has an unknown (-1) group: nothing to evaluate")
        self.k = k
        self.drops_nothing = bool(evaluated.all())
        onehot = y[:, None] == np.arange(k)[None, :]  # (n, K)
        self.overall = (
            overall
            if self.drops_nothing
            else [_SortedSubset(orders[c], p[:, c], onehot[:, c], evaluated) for c in range(k)]
        )
        in_group = (g[:, None] == self.codes[None, :]) & evaluated[:, None]  # (n, G)
        self.groups = [
            [_SortedSubset(orders[c], p[:, c], onehot[:, c], in_group[:, j]) for c in range(k)]
            for j in range(len(self.codes))
        ]
        ind = in_group.astype(np.float64)  # (n, G)
        yk = onehot.astype(np.float64)  # (n, K)
        pk = (pred[:, None] == np.arange(k)[None, :]).astype(np.float64)  # (n, K)
        outer = lambda a: (ind[:, :, None] * a[:, None, :]).reshape(len(y), -1)  # noqa: E731
        # Columns: n, correct (G each), then class counts, selected, TP, FP (G*K each, g-major).
        self.features = np.concatenate(
            [
                ind,
                ind * (pred == y)[:, None],
                outer(yk),
                outer(pk),
                outer(yk * pk),
                outer((1 - yk) * pk),
            ],
            axis=1,
        )

    def replicates(
        self, counts: np.ndarray, everyone_auc: np.ndarray, single_class: str, alpha: float
    ) -> dict[str, np.ndarray]:
        big_g, k = len(self.codes), self.k
        sums = counts @ self.features
        n, correct = sums[:, :big_g], sums[:, big_g : 2 * big_g]
        rest = sums[:, 2 * big_g :].reshape(len(counts), 4, big_g, k)
        cnt, sel, tp, fp = rest[:, 0], rest[:, 1], rest[:, 2], rest[:, 3]  # (r, G, K)
        present = n > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(present, correct / n, np.nan)
            selection_rate = np.where(present[..., None], sel / n[..., None], np.nan)
            tpr = np.where(cnt > 0, tp / cnt, np.nan)
            fpr = np.where(n[..., None] > cnt, fp / (n[..., None] - cnt), np.nan)
            overall_acc = correct.sum(axis=1) / n.sum(axis=1)
        overall_auc = everyone_auc if self.drops_nothing else _macro(self.overall, counts)
        group_auc = np.stack([_macro(subs, counts) for subs in self.groups], axis=1)  # (r, G)
        std_ratio, range_ratio = disparity_ratios(
            overall_auc, group_auc, present, single_class=single_class
        )
        return {
            "n": n,
            "group_auc": group_auc,
            "acc": acc,
            "overall_auc": overall_auc,
            "overall_acc": overall_acc,
            "es_auc": equity_scaled(
                overall_auc, group_auc, present, alpha=alpha, single_class=single_class
            ),
            "es_acc": equity_scaled(overall_acc, acc, present, alpha=alpha),
            "dpd": multiclass_dpd(selection_rate, present),
            "deodds": multiclass_deodds(tpr, fpr, present),
            "auc_std_ratio": std_ratio,
            "auc_range_ratio": range_ratio,
        }


def _macro(subsets: list[_SortedSubset], counts: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC per resample: mean over classes, NaN when a class is missing."""
    return np.stack([sub.auc(counts) for sub in subsets], axis=1).mean(axis=1)


def _bootstrap_multiclass(
    y_true: object,
    y_score: object,
    sensitive_features: Mapping[str, object],
    n_boot: int,
    seed: int,
    unknown: str,
    single_class: str,
    alpha: float,
    indices: np.ndarray | None,
) -> dict[str, dict]:
    """`bootstrap_metrics` for (n, K) class probabilities (same resamples for a given seed)."""
    y, p, _ = check_multiclass_inputs(y_true, y_score)
    n, k = p.shape
    indices = _resamples(indices, n, n_boot, seed)
    pred = p.argmax(axis=1)
    orders = [np.argsort(p[:, c], kind="stable") for c in range(k)]
    everyone = [_SortedSubset(orders[c], p[:, c], y == c, np.ones(n, dtype=bool)) for c in range(k)]
    plans = {}
    for name, groups in sensitive_features.items():
        _, _, g = check_multiclass_inputs(y, p, groups)
        plans[name] = _MultiClassPlan(y, p, pred, g, orders, unknown, everyone)
    return _drive(
        indices, pred == y, lambda counts: _macro(everyone, counts), plans, single_class, alpha
    )
