"""Fairness metrics for binary classifiers, exactly as the field reports them.

Every named metric is a thin wrapper over one disaggregation primitive, `disaggregate`, which
splits the predictions by the groups of one attribute and computes the per-group table (n,
positives, AUC, accuracy, selection rate, TPR, FPR). The cross-group formulas (ES-AUC, ES-ACC,
DPD, DEOdds, between-group disparity) live in small array functions that work on the last axis,
so the point estimate and the vectorised bootstrap (`multifair.metrics.bootstrap`) share one
definition of each formula.

Definitions (`../shared/spec/metrics.md`; references in brackets):
- AUC: binary ROC-AUC [sklearn.metrics.roc_auc_score]; group AUC: AUC within each group.
- ES-AUC = AUC / (1 + alpha * sum_g |AUC_g - AUC|), alpha = 1 [FairVision `equity_scaled_AUC`].
- ES-ACC = Acc / (1 + alpha * sum_g |Acc_g - Acc|) at the threshold [FairVision].
- DPD = max_g - min_g of the selection rate [fairlearn demographic_parity_difference].
- DEOdds = max(TPR spread, FPR spread) over groups [fairlearn equalized_odds_difference].
- between-group disparity = std(AUC_g) / AUC and (max - min)(AUC_g) / AUC [FairVision].
A prediction is positive when `y_score >= threshold` (FairVision's convention).

Edge-case policies (explicit arguments; every summary records which were used):
- ``unknown``: attribute code -1 means "unknown". ``"drop"`` (default, FairVision) leaves those
  samples out of that attribute's evaluation and counts them; ``"keep"`` (MultiFair's released
  code) treats -1 as one more group. With ``"drop"`` the AUC and accuracy that ES-AUC, ES-ACC and
  the disparity ratios compare against are those of the evaluated samples.
- ``single_class``: a group whose labels are all one class has no AUC (NaN, with a recorded
  reason). ``"skip"`` (default, MultiFair) leaves it out of ES-AUC and the disparity ratios;
  ``"propagate"`` (Harvard FairVision) lets the NaN through, so those metrics become NaN.
- a group with no positives has TPR 0 and a group with no negatives has FPR 0 (fairlearn and the
  MultiFair code agree); this is fixed, not an option, and such a group is flagged by its note.
- single-class AUC is decided here (NaN), never left to the installed scikit-learn version
  (older versions raise, newer ones warn and return NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from multifair.errors import UserError

UNKNOWN = -1
UNKNOWN_POLICIES = ("drop", "keep")
SINGLE_CLASS_POLICIES = ("skip", "propagate")

__all__ = [
    "PROB_SUM_TOL",
    "SINGLE_CLASS_POLICIES",
    "UNKNOWN",
    "UNKNOWN_POLICIES",
    "GroupTable",
    "MultiClassTable",
    "accuracy",
    "auc_note",
    "between_group_disparity",
    "check_inputs",
    "check_multiclass_inputs",
    "class_auc_note",
    "demographic_parity_difference",
    "disaggregate",
    "disaggregate_multiclass",
    "disparity_ratios",
    "equalized_odds_difference",
    "equity_scaled",
    "es_acc",
    "es_auc",
    "false_positive_rate_by_group",
    "group_auc",
    "is_multiclass",
    "multiclass_deodds",
    "multiclass_dpd",
    "roc_auc",
    "selection_rate_by_group",
    "spread",
    "true_positive_rate_by_group",
]


# ----------------------------------------------------------------------------------- validation
def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not one of {list(allowed)}")


def check_inputs(
    y_true: object,
    y_score: object,
    groups: object | None = None,
    *,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate and convert inputs: labels in {0, 1}, finite scores in [0, 1], integer group
    codes >= -1, equal lengths, a threshold in [0, 1]. Returns (y_true int64, y_score float64,
    groups int64 or None); a mistake raises `UserError` naming the argument, index and value."""
    y_true_arr = np.asarray(y_true)
    y_score_arr = np.asarray(y_score, dtype=np.float64)
    if y_true_arr.ndim == 1 and y_score_arr.ndim == 2:
        raise UserError(
            f"y_score has shape {y_score_arr.shape}: one column per class is a multi-class "
            "prediction; this function takes binary scores (n,) (the named metrics and "
            "`summarize` accept (n, K) class probabilities)"
        )
    if y_true_arr.ndim != 1 or y_score_arr.ndim != 1:
        raise UserError(
            f"y_true and y_score must be 1-D, got shapes {y_true_arr.shape} and {y_score_arr.shape}"
        )
    if len(y_true_arr) != len(y_score_arr):
        raise UserError(
            f"y_true has {len(y_true_arr)} entries but y_score has {len(y_score_arr)}: "
            "they must have one entry per prediction"
        )
    if len(y_true_arr) == 0:
        raise UserError("no predictions: y_true and y_score are empty")
    bad = ~np.isin(y_true_arr, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"y_true[{i}] = {y_true_arr[i].item()!r}: labels must be 0 or 1")
    bad = ~np.isfinite(y_score_arr) | (y_score_arr < 0) | (y_score_arr > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"y_score[{i}] = {float(y_score_arr[i])}: scores must be probabilities in [0, 1] (not NaN)"
        )
    if not (0.0 <= float(threshold) <= 1.0):
        raise UserError(f"threshold={threshold!r} must be in [0, 1]")
    groups_arr = None if groups is None else _check_groups(groups, y_true_arr.shape)
    return y_true_arr.astype(np.int64), y_score_arr, groups_arr


def _check_groups(groups: object, shape: tuple[int, ...]) -> np.ndarray:
    """Integer group codes >= -1, one per prediction (`shape` is that of y_true)."""
    raw = np.asarray(groups)
    if raw.shape != shape:
        raise UserError(
            f"groups has {raw.shape[0] if raw.ndim else 0} entries but y_true has "
            f"{shape[0]}: they must have one entry per prediction"
        )
    if not np.issubdtype(raw.dtype, np.integer):
        as_float = np.asarray(raw, dtype=np.float64) if raw.dtype.kind in "biuf" else None
        if as_float is None or not np.all(as_float == np.round(as_float)):
            raise UserError(
                "groups must be integer codes (-1 = unknown); encode strings first, e.g. "
                "with multifair.metrics.encode_groups"
            )
        raw = as_float
    groups_arr = raw.astype(np.int64)
    bad = groups_arr < UNKNOWN
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"groups[{i}] = {groups_arr[i]}: codes must be >= 0, or -1 for unknown")
    return groups_arr


# ---------------------------------------------------------------------------- single metrics
def roc_auc(y_true: object, y_score: object) -> float:
    """Binary ROC-AUC (scikit-learn), NaN when the labels hold a single class.

    The single-class case is decided here rather than by scikit-learn, whose behaviour changed
    across versions (raise vs warn-and-NaN). Multi-class scores (n, K): the macro one-vs-rest
    AUC (sklearn's multi_class="ovr", average="macro"), NaN when a class is absent."""
    if is_multiclass(y_score):
        y, p, _ = check_multiclass_inputs(y_true, y_score)
        return _macro_auc(y, p)
    y, s, _ = check_inputs(y_true, y_score)
    return _auc(y, s)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        return float("nan")
    return float(roc_auc_score(y, s))


def accuracy(y_true: object, y_score: object, *, threshold: float = 0.5) -> float:
    """Fraction of predictions `(y_score >= threshold)` equal to the label (multi-class: the
    argmax class; the threshold is not used)."""
    if is_multiclass(y_score):
        y, p, _ = check_multiclass_inputs(y_true, y_score)
        return float(np.mean(p.argmax(axis=1) == y))
    y, s, _ = check_inputs(y_true, y_score, threshold=threshold)
    return float(np.mean((s >= threshold) == y))


def auc_note(n: int, positives: int) -> str | None:
    """Why a group has no AUC (None when it has one)."""
    if positives == 0:
        return "single class (no positives): AUC undefined"
    if positives == n:
        return "single class (no negatives): AUC undefined"
    return None


# ------------------------------------------------------------------- the disaggregation primitive
@dataclass(frozen=True)
class GroupTable:
    """One attribute's predictions split by group: one entry per group, groups sorted by code.

    `auc` is NaN for a single-class group (`auc_notes` says why). `overall_auc` / `overall_acc`
    are over the evaluated samples (all of them unless unknowns were dropped)."""

    codes: np.ndarray  # (G,) int64, sorted
    n: np.ndarray  # (G,) int64
    positives: np.ndarray  # (G,) int64
    auc: np.ndarray  # (G,) float64, NaN where undefined
    auc_notes: tuple[str | None, ...]  # (G,)
    acc: np.ndarray  # (G,)
    selection_rate: np.ndarray  # (G,)
    tpr: np.ndarray  # (G,) 0 where a group has no positives
    fpr: np.ndarray  # (G,) 0 where a group has no negatives
    overall_auc: float
    overall_acc: float
    n_evaluated: int
    dropped_unknown: int
    threshold: float
    unknown: str


def disaggregate(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    threshold: float = 0.5,
    unknown: str = "drop",
) -> GroupTable:
    """Split predictions by the groups of one attribute and compute the per-group table.

    `groups` holds integer codes, -1 = unknown (see the module docstring for `unknown`)."""
    _check_choice("unknown", unknown, UNKNOWN_POLICIES)
    y, s, g = check_inputs(y_true, y_score, groups, threshold=threshold)
    assert g is not None
    keep = np.ones(len(y), dtype=bool) if unknown == "keep" else g != UNKNOWN
    dropped = int((~keep).sum())
    y, s, g = y[keep], s[keep], g[keep]
    if len(y) == 0:
        raise UserError("every sample has an unknown (-1) group: nothing to evaluate")
    y_pred = (s >= threshold).astype(np.int64)
    codes = np.unique(g)  # sorted, so -1 ("unknown") comes first under unknown="keep"
    rows: dict[str, list] = {k: [] for k in ("n", "pos", "auc", "note", "acc", "sel", "tpr", "fpr")}
    for code in codes:
        m = g == code
        yg, sg, pg = y[m], s[m], y_pred[m]
        n, pos = int(m.sum()), int(yg.sum())
        rows["n"].append(n)
        rows["pos"].append(pos)
        rows["auc"].append(_auc(yg, sg))
        rows["note"].append(auc_note(n, pos))
        rows["acc"].append(float(np.mean(pg == yg)))
        rows["sel"].append(float(np.mean(pg)))
        # No positives -> TPR 0, no negatives -> FPR 0 (fairlearn's convention).
        rows["tpr"].append(float(pg[yg == 1].sum() / pos) if pos else 0.0)
        rows["fpr"].append(float(pg[yg == 0].sum() / (n - pos)) if n > pos else 0.0)
    return GroupTable(
        codes=codes,
        n=np.array(rows["n"], dtype=np.int64),
        positives=np.array(rows["pos"], dtype=np.int64),
        auc=np.array(rows["auc"], dtype=np.float64),
        auc_notes=tuple(rows["note"]),
        acc=np.array(rows["acc"]),
        selection_rate=np.array(rows["sel"]),
        tpr=np.array(rows["tpr"]),
        fpr=np.array(rows["fpr"]),
        overall_auc=_auc(y, s),
        overall_acc=float(np.mean(y_pred == y)),
        n_evaluated=len(y),
        dropped_unknown=dropped,
        threshold=float(threshold),
        unknown=unknown,
    )


# ------------------------------------------------------- cross-group formulas (last axis = groups)
def equity_scaled(
    overall: np.ndarray | float,
    per_group: np.ndarray,
    present: np.ndarray,
    *,
    alpha: float = 1.0,
    single_class: str = "skip",
) -> np.ndarray:
    """overall / (1 + alpha * sum_g |per_group_g - overall|) over the groups present.

    A NaN in `per_group` (a single-class group's AUC) is left out with ``single_class="skip"``
    and makes the result NaN with ``"propagate"``; with no group left it is NaN too (not the
    plain overall value). Shapes: overall (...), per_group (..., G)."""
    overall = np.asarray(overall, dtype=np.float64)
    deviation = np.abs(per_group - overall[..., None])  # (..., G)
    valid = present & ~np.isnan(per_group)
    if single_class == "skip":
        total = np.where(valid, deviation, 0.0).sum(axis=-1)
    else:
        total = np.where(present, deviation, 0.0).sum(axis=-1)  # NaN survives the sum
    return np.where(valid.any(axis=-1), overall / (1.0 + alpha * total), np.nan)


def spread(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """max - min over the groups present (last axis); NaN when no group is present."""
    hi = np.where(present, values, -np.inf).max(axis=-1)
    lo = np.where(present, values, np.inf).min(axis=-1)
    out = hi - lo
    return np.where(present.any(axis=-1), out, np.nan)


def disparity_ratios(
    overall_auc: np.ndarray | float,
    group_auc: np.ndarray,
    present: np.ndarray,
    *,
    single_class: str = "skip",
) -> tuple[np.ndarray, np.ndarray]:
    """FairVision's between-group disparity: (std(AUC_g) / AUC, (max - min)(AUC_g) / AUC).

    std is the population std (numpy's default, as FairVision). Single-class groups are left
    out with "skip"; with "propagate" any NaN group AUC makes both NaN."""
    overall_auc = np.asarray(overall_auc, dtype=np.float64)
    valid = present & ~np.isnan(group_auc)
    if single_class == "propagate":
        poisoned = (present & np.isnan(group_auc)).any(axis=-1)
    else:
        poisoned = np.zeros(valid.shape[:-1], dtype=bool)
    count = valid.sum(axis=-1)
    safe = np.where(valid, group_auc, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = safe.sum(axis=-1) / count
        var = np.where(valid, (safe - mean[..., None]) ** 2, 0.0).sum(axis=-1) / count
        std_ratio = np.sqrt(var) / overall_auc
        range_ratio = spread(group_auc, valid) / overall_auc
    bad = poisoned | (count == 0)
    return np.where(bad, np.nan, std_ratio), np.where(bad, np.nan, range_ratio)


# ------------------------------------------------------------------- named metrics (thin wrappers)
def _table(
    y_true: object, y_score: object, groups: object, threshold: float, unknown: str
) -> GroupTable | MultiClassTable:
    if is_multiclass(y_score):
        return disaggregate_multiclass(y_true, y_score, groups=groups, unknown=unknown)
    return disaggregate(y_true, y_score, groups=groups, threshold=threshold, unknown=unknown)


def _binary_only(table: GroupTable | MultiClassTable, what: str) -> GroupTable:
    if isinstance(table, MultiClassTable):
        raise UserError(
            f"{what} is a binary rate; for multi-class scores read the per-class (G, K) "
            "columns of multifair.metrics.disaggregate_multiclass"
        )
    return table


def _present(table: GroupTable | MultiClassTable) -> np.ndarray:
    return np.ones(len(table.codes), dtype=bool)


def _by_group(table: GroupTable | MultiClassTable, values: np.ndarray) -> dict[int, float]:
    return {int(c): float(v) for c, v in zip(table.codes, values)}


def group_auc(
    y_true: object, y_score: object, *, groups: object, unknown: str = "drop"
) -> dict[int, float]:
    """AUC within each group, keyed by group code; NaN for a single-class group (multi-class:
    the macro one-vs-rest AUC, NaN for a group missing a class)."""
    table = _table(y_true, y_score, groups, 0.5, unknown)
    return _by_group(table, table.auc)


def es_auc(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    alpha: float = 1.0,
    unknown: str = "drop",
    single_class: str = "skip",
) -> float:
    """Equity-scaled AUC: AUC / (1 + alpha * sum_g |AUC_g - AUC|) (FairVision)."""
    _check_choice("single_class", single_class, SINGLE_CLASS_POLICIES)
    t = _table(y_true, y_score, groups, 0.5, unknown)
    return float(
        equity_scaled(t.overall_auc, t.auc, _present(t), alpha=alpha, single_class=single_class)
    )


def es_acc(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    threshold: float = 0.5,
    alpha: float = 1.0,
    unknown: str = "drop",
) -> float:
    """Equity-scaled accuracy: Acc / (1 + alpha * sum_g |Acc_g - Acc|) at the threshold."""
    t = _table(y_true, y_score, groups, threshold, unknown)
    return float(equity_scaled(t.overall_acc, t.acc, _present(t), alpha=alpha))


def demographic_parity_difference(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    threshold: float = 0.5,
    unknown: str = "drop",
) -> float:
    """max - min over groups of the selection rate mean(y_score >= threshold) (multi-class: the
    largest such spread of mean(argmax == k) over classes k)."""
    t = _table(y_true, y_score, groups, threshold, unknown)
    if isinstance(t, MultiClassTable):
        return float(multiclass_dpd(t.selection_rate, _present(t)))
    return float(spread(t.selection_rate, _present(t)))


def equalized_odds_difference(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    threshold: float = 0.5,
    unknown: str = "drop",
) -> float:
    """max(TPR spread, FPR spread) over groups (fairlearn's "worst_case" aggregation);
    multi-class: the largest over classes of the one-vs-rest value (docs/metrics.md)."""
    t = _table(y_true, y_score, groups, threshold, unknown)
    present = _present(t)
    if isinstance(t, MultiClassTable):
        return float(multiclass_deodds(t.tpr, t.fpr, present))
    return float(max(spread(t.tpr, present), spread(t.fpr, present)))


def between_group_disparity(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    unknown: str = "drop",
    single_class: str = "skip",
) -> tuple[float, float]:
    """(std(AUC_g) / AUC, (max - min)(AUC_g) / AUC), FairVision's between-group disparity."""
    _check_choice("single_class", single_class, SINGLE_CLASS_POLICIES)
    t = _table(y_true, y_score, groups, 0.5, unknown)
    std_ratio, range_ratio = disparity_ratios(
        t.overall_auc, t.auc, _present(t), single_class=single_class
    )
    return float(std_ratio), float(range_ratio)


def selection_rate_by_group(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    threshold: float = 0.5,
    unknown: str = "drop",
) -> dict[int, float]:
    """mean(y_score >= threshold) within each group."""
    t = _binary_only(_table(y_true, y_score, groups, threshold, unknown), "selection_rate_by_group")
    return _by_group(t, t.selection_rate)


def true_positive_rate_by_group(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    threshold: float = 0.5,
    unknown: str = "drop",
) -> dict[int, float]:
    """TPR within each group (0 for a group with no positives)."""
    t = _binary_only(
        _table(y_true, y_score, groups, threshold, unknown), "true_positive_rate_by_group"
    )
    return _by_group(t, t.tpr)


def false_positive_rate_by_group(
    y_true: object,
    y_score: object,
    *,
    groups: object,
    threshold: float = 0.5,
    unknown: str = "drop",
) -> dict[int, float]:
    """FPR within each group (0 for a group with no negatives)."""
    t = _binary_only(
        _table(y_true, y_score, groups, threshold, unknown), "false_positive_rate_by_group"
    )
    return _by_group(t, t.fpr)


# ------------------------------------------------------------------------------ multi-class (K > 2)
# A multi-class prediction is a (n, K) matrix of class probabilities (rows sum to 1, e.g. a
# softmax) and labels are class indices 0..K-1. The named metrics above accept it in place of
# the (n,) binary score; docs/metrics.md "Multi-class labels" gives the definitions:
# - AUC: macro one-vs-rest, mean_k AUC(y == k, P[:, k]) [sklearn roc_auc_score(multi_class="ovr",
#   average="macro")]; undefined (NaN) when a class is absent from the samples evaluated (sklearn
#   raises there), so a group missing a class has no AUC and follows `single_class`.
# - accuracy: of the argmax prediction; no threshold.
# - DPD: max over classes k of the spread across groups of mean(argmax == k).
# - DEOdds: max over classes k of max(TPR_k spread, FPR_k spread), one-vs-rest per class;
#   a group without samples of class k is left out of the TPR_k spread (and one with only class
#   k out of the FPR_k spread) instead of counting 0, which would make DEOdds 1 whenever a group
#   misses a class. With K = 2 both reduce to the binary DPD/DEOdds at threshold 0.5.
PROB_SUM_TOL = 1e-3  # rows of a multi-class score matrix must sum to 1 within this


def is_multiclass(y_score: object) -> bool:
    """True when the scores are a (n, K) matrix of class probabilities."""
    return np.ndim(y_score) == 2


def check_multiclass_inputs(
    y_true: object, y_score: object, groups: object | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate multi-class inputs: labels are class indices 0..K-1, y_score (n, K) finite
    probabilities whose rows sum to 1 (within 1e-3), groups as for `check_inputs`."""
    y_arr = np.asarray(y_true)
    p_arr = np.asarray(y_score, dtype=np.float64)
    if y_arr.ndim != 1 or p_arr.ndim != 2:
        raise UserError(
            f"multi-class: y_true must be 1-D and y_score 2-D (n, K), got shapes "
            f"{y_arr.shape} and {p_arr.shape}"
        )
    if len(y_arr) != len(p_arr):
        raise UserError(
            f"y_true has {len(y_arr)} entries but y_score has {len(p_arr)} rows: they must "
            "have one entry per prediction"
        )
    if len(y_arr) == 0:
        raise UserError("no predictions: y_true and y_score are empty")
    k = p_arr.shape[1]
    if k < 2:
        raise UserError(f"y_score has {k} column: a multi-class prediction needs one per class")
    bad = ~np.isin(y_arr, np.arange(k))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"y_true[{i}] = {y_arr[i].item()!r}: labels must be class indices 0..{k - 1} "
            f"(y_score has {k} columns)"
        )
    bad = (~np.isfinite(p_arr) | (p_arr < 0) | (p_arr > 1)).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"y_score[{i}] = {p_arr[i].tolist()}: scores must be probabilities in [0, 1]"
        )
    off = np.abs(p_arr.sum(axis=1) - 1.0) > PROB_SUM_TOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise UserError(
            f"y_score[{i}] sums to {p_arr[i].sum():.6g}: each row must hold class "
            "probabilities summing to 1 (e.g. a softmax)"
        )
    g = None if groups is None else _check_groups(groups, y_arr.shape)
    return y_arr.astype(np.int64), p_arr, g


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Macro one-vs-rest AUC; NaN when a class is absent (every class needs both sides)."""
    k = p.shape[1]
    if (np.bincount(y, minlength=k) == 0).any():
        return float("nan")
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in range(k)]))


def class_auc_note(
    class_counts: np.ndarray, class_names: Sequence[str] | None = None
) -> str | None:
    """Why a group has no macro OvR AUC (None when it has one)."""
    missing = [c for c, count in enumerate(class_counts) if count == 0]
    if not missing:
        return None
    names = [class_names[c] if class_names else str(c) for c in missing]
    return f"no samples of class {', '.join(names)}: macro one-vs-rest AUC undefined"


@dataclass(frozen=True)
class MultiClassTable:
    """`GroupTable` for multi-class predictions; per-class columns have a last axis K.

    `tpr[g, k]` is NaN when group g has no sample of class k, `fpr[g, k]` NaN when it has only
    class k; `auc` is NaN for a group missing a class."""

    codes: np.ndarray  # (G,)
    n: np.ndarray  # (G,)
    class_counts: np.ndarray  # (G, K)
    auc: np.ndarray  # (G,) macro OvR
    class_auc: np.ndarray  # (G, K) one-vs-rest AUC of each class, NaN where undefined
    acc: np.ndarray  # (G,)
    selection_rate: np.ndarray  # (G, K) mean(argmax == k)
    tpr: np.ndarray  # (G, K)
    fpr: np.ndarray  # (G, K)
    overall_auc: float
    overall_acc: float
    n_evaluated: int
    dropped_unknown: int
    unknown: str

    @property
    def n_classes(self) -> int:
        return self.class_counts.shape[1]


def _ovr_rates(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Per class: (count, selection rate, TPR (NaN: none of it), FPR (NaN: nothing else),
    one-vs-rest AUC is computed by the caller)."""
    n = len(y)
    count = np.array([(y == c).sum() for c in range(k)], dtype=np.int64)
    sel = np.array([(pred == c).mean() for c in range(k)])
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.array([((pred == c) & (y == c)).sum() / count[c] for c in range(k)])
        fpr = np.array([((pred == c) & (y != c)).sum() / (n - count[c]) for c in range(k)])
    tpr = np.where(count > 0, tpr, np.nan)
    fpr = np.where(count < n, fpr, np.nan)
    return count, sel, tpr, fpr


def disaggregate_multiclass(
    y_true: object, y_score: object, *, groups: object, unknown: str = "drop"
) -> MultiClassTable:
    """Split multi-class predictions by the groups of one attribute (codes, -1 = unknown)."""
    _check_choice("unknown", unknown, UNKNOWN_POLICIES)
    y, p, g = check_multiclass_inputs(y_true, y_score, groups)
    assert g is not None
    keep = np.ones(len(y), dtype=bool) if unknown == "keep" else g != UNKNOWN
    dropped = int((~keep).sum())
    y, p, g = y[keep], p[keep], g[keep]
    if len(y) == 0:
        raise UserError("every sample has an unknown (-1) group: nothing to evaluate")
    k = p.shape[1]
    pred = p.argmax(axis=1)
    codes = np.unique(g)
    rows: dict[str, list] = {
        key: [] for key in ("n", "cnt", "auc", "cauc", "acc", "sel", "tpr", "fpr")
    }
    for code in codes:
        m = g == code
        count, sel, tpr, fpr = _ovr_rates(y[m], pred[m], k)
        rows["n"].append(int(m.sum()))
        rows["cnt"].append(count)
        class_auc = [_auc((y[m] == c).astype(np.int64), p[m, c]) for c in range(k)]
        # the macro AUC from the same per-class AUCs; NaN when a class is absent (_macro_auc)
        rows["auc"].append(float(np.mean(class_auc)) if (count > 0).all() else float("nan"))
        rows["cauc"].append(class_auc)
        rows["acc"].append(float(np.mean(pred[m] == y[m])))
        rows["sel"].append(sel)
        rows["tpr"].append(tpr)
        rows["fpr"].append(fpr)
    return MultiClassTable(
        codes=codes,
        n=np.array(rows["n"], dtype=np.int64),
        class_counts=np.array(rows["cnt"], dtype=np.int64),
        auc=np.array(rows["auc"], dtype=np.float64),
        class_auc=np.array(rows["cauc"], dtype=np.float64),
        acc=np.array(rows["acc"]),
        selection_rate=np.array(rows["sel"]),
        tpr=np.array(rows["tpr"]),
        fpr=np.array(rows["fpr"]),
        overall_auc=_macro_auc(y, p),
        overall_acc=float(np.mean(pred == y)),
        n_evaluated=len(y),
        dropped_unknown=dropped,
        unknown=unknown,
    )


def _max_over_classes(per_class: np.ndarray) -> np.ndarray:
    """nanmax over the class axis (last); NaN where every class is NaN."""
    valid = ~np.isnan(per_class)
    out = np.where(valid, per_class, -np.inf).max(axis=-1)
    return np.where(valid.any(axis=-1), out, np.nan)


def multiclass_dpd(selection_rate: np.ndarray, present: np.ndarray) -> np.ndarray:
    """max_k spread over groups of the class-k selection rate. selection_rate (..., G, K),
    present (..., G) -> (...)."""
    per_class = spread(np.swapaxes(selection_rate, -1, -2), present[..., None, :])  # (..., K)
    return _max_over_classes(per_class)


def multiclass_deodds(tpr: np.ndarray, fpr: np.ndarray, present: np.ndarray) -> np.ndarray:
    """max_k max(TPR_k spread, FPR_k spread) over the groups where each is defined.
    tpr, fpr (..., G, K) with NaN where undefined, present (..., G) -> (...)."""
    t, f = np.swapaxes(tpr, -1, -2), np.swapaxes(fpr, -1, -2)  # (..., K, G)
    ok_t = present[..., None, :] & ~np.isnan(t)
    ok_f = present[..., None, :] & ~np.isnan(f)
    per_class = np.fmax(spread(t, ok_t), spread(f, ok_f))  # (..., K), NaN only if both are
    return _max_over_classes(per_class)
