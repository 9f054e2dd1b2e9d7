"""Independent reference implementations for the metric tests.

Written from the formulas in ../shared/spec/metrics.md, in plain float64 Python loops, sharing no
code with `multifair.metrics`; scikit-learn and fairlearn are called directly where they are the
reference."""

from __future__ import annotations

import math
import statistics

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)


def auc_pairs(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(equal), over all pairs; NaN if a
    class is missing."""
    pos = [float(v) for v, t in zip(s, y) if t == 1]
    neg = [float(v) for v, t in zip(s, y) if t == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def evaluated(y, s, g, unknown: str):
    """The samples an attribute evaluates under the unknown policy."""
    keep = np.ones(len(g), bool) if unknown == "keep" else np.asarray(g) != -1
    return np.asarray(y)[keep], np.asarray(s)[keep], np.asarray(g)[keep]


def per_group(y, s, g, threshold=0.5):
    """{code: dict(n, pos, auc, acc, sel, tpr, fpr)} with loops; TPR/FPR 0 when undefined."""
    out = {}
    for code in sorted(set(int(c) for c in g)):
        idx = [i for i in range(len(g)) if int(g[i]) == code]
        yy = [int(y[i]) for i in idx]
        pp = [1 if float(s[i]) >= threshold else 0 for i in idx]
        pos = sum(yy)
        neg = len(yy) - pos
        out[code] = {
            "n": len(idx),
            "pos": pos,
            "auc": auc_pairs(np.array(yy), np.asarray(s)[idx]),
            "acc": sum(1 for a, b in zip(yy, pp) if a == b) / len(idx),
            "sel": sum(pp) / len(idx),
            "tpr": sum(1 for a, b in zip(yy, pp) if a == 1 and b == 1) / pos if pos else 0.0,
            "fpr": sum(1 for a, b in zip(yy, pp) if a == 0 and b == 1) / neg if neg else 0.0,
        }
    return out


def es_formula(overall: float, group_values: list[float], alpha=1.0, skip_nan=True) -> float:
    """overall / (1 + alpha * sum |v_g - overall|), NaN groups skipped or propagated."""
    total = 0.0
    for v in group_values:
        if math.isnan(v):
            if skip_nan:
                continue
            return math.nan
        total += abs(v - overall)
    return overall / (1.0 + alpha * total)


def spread_formula(values: list[float]) -> float:
    return max(values) - min(values)


def disparity_formula(overall: float, aucs: list[float], skip_nan=True) -> tuple[float, float]:
    if any(math.isnan(a) for a in aucs) and not skip_nan:
        return math.nan, math.nan
    valid = [a for a in aucs if not math.isnan(a)]
    return statistics.pstdev(valid) / overall, (max(valid) - min(valid)) / overall


def all_metrics(
    y, s, g, *, threshold=0.5, unknown="drop", single_class="skip", fairlearn=True
) -> dict:
    """Every attribute-level metric by the oracles above; DPD/DEOdds from fairlearn, or (faster,
    for per-resample loops) from the per-group loop rates with fairlearn=False."""
    y, s, g = evaluated(y, s, g, unknown)
    groups = per_group(y, s, g, threshold)
    y_pred = (np.asarray(s) >= threshold).astype(int)
    overall_auc = auc_pairs(y, s)
    overall_acc = float(np.mean(y_pred == y))
    skip = single_class == "skip"
    aucs = [v["auc"] for v in groups.values()]
    std_ratio, range_ratio = disparity_formula(overall_auc, aucs, skip)
    return {
        "groups": groups,
        "overall_auc": overall_auc,
        "overall_acc": overall_acc,
        "es_auc": es_formula(overall_auc, aucs, skip_nan=skip),
        "es_acc": es_formula(overall_acc, [v["acc"] for v in groups.values()]),
        "dpd": demographic_parity_difference(y, y_pred, sensitive_features=g)
        if fairlearn
        else spread_formula([v["sel"] for v in groups.values()]),
        "deodds": equalized_odds_difference(y, y_pred, sensitive_features=g)
        if fairlearn
        else max(
            spread_formula([v["tpr"] for v in groups.values()]),
            spread_formula([v["fpr"] for v in groups.values()]),
        ),
        "auc_std_ratio": std_ratio,
        "auc_range_ratio": range_ratio,
    }


def fairlearn_rates(y, s, g, threshold=0.5) -> dict[str, dict[int, float]]:
    """selection rate, TPR, FPR by group from fairlearn's MetricFrame."""
    y_pred = (np.asarray(s) >= threshold).astype(int)
    frame = MetricFrame(
        metrics={"sel": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate},
        y_true=y,
        y_pred=y_pred,
        sensitive_features=g,
    ).by_group
    return {k: {int(c): float(v) for c, v in frame[k].items()} for k in ("sel", "tpr", "fpr")}
