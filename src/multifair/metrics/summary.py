"""`summarize`: the whole metrics table as a JSON-able dict (the schema in docs/architecture.md,
"The metrics summary"), read by the trainer, `audit`, the report and the benchmark."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multifair.errors import UserError
from multifair.metrics.bootstrap import bootstrap_metrics, percentile_interval
from multifair.metrics.fairness import (
    SINGLE_CLASS_POLICIES,
    UNKNOWN_POLICIES,
    check_inputs,
    check_multiclass_inputs,
    class_auc_note,
    disaggregate,
    disaggregate_multiclass,
    disparity_ratios,
    equity_scaled,
    is_multiclass,
    multiclass_deodds,
    multiclass_dpd,
    roc_auc,
    spread,
)
from multifair.metrics.groups import group_name

__all__ = ["summarize"]


def _num(x: float) -> float | None:
    """A JSON-able float: NaN (undefined) becomes None (null)."""
    x = float(x)
    return None if math.isnan(x) else x


def _attribute_ci(
    boot: Mapping[str, Any],
    attribute: str,
    codes: np.ndarray,
    names: Sequence[str],
    ci: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """An attribute's `ci` block from the bootstrap replicates (binary and multi-class)."""
    reps = boot["attributes"][attribute]
    assert np.array_equal(reps["codes"], codes), "bootstrap groups out of step"
    return {
        "level": float(ci),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "auc": _interval(boot["overall"]["auc"], ci),
        "es_auc": _interval(reps["es_auc"], ci),
        "es_acc": _interval(reps["es_acc"], ci),
        "dpd": _interval(reps["dpd"], ci),
        "deodds": _interval(reps["deodds"], ci),
        "group_auc": {nm: _interval(reps["group_auc"][:, j], ci) for j, nm in enumerate(names)},
    }


def _interval(replicates: np.ndarray, level: float) -> list[float | None]:
    lo, hi = percentile_interval(replicates, level)
    return [_num(lo), _num(hi)]


def summarize(
    y_true: object,
    y_score: object,
    *,
    sensitive_features: Mapping[str, object],
    group_names: Mapping[str, Mapping[int, str]] | None = None,
    threshold: float = 0.5,
    n_boot: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    unknown: str = "drop",
    single_class: str = "skip",
    min_group_size: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Overall and per-group metrics for each attribute, with percentile bootstrap CIs when
    n_boot > 0.

    `sensitive_features` maps attribute -> integer codes (n,) (-1 = unknown); `group_names` maps
    attribute -> {code: name}. With unknown="drop" the ES-AUC, ES-ACC and disparity ratios of an
    attribute are relative to the AUC/accuracy of its evaluated (known) samples, as FairVision
    computes them; `overall` and `ci.auc` are over all samples. An attribute with fewer than two
    groups, or two groups with the same name, is a `UserError`. With `min_group_size`, every
    group carries `"small": n < min_group_size` (its AUC rests on few samples: read its CI).

    Multi-class: `y_score` (n, K) class probabilities, labels 0..K-1, `class_names` their
    names (default "0".."K-1"); the schema gains "classes" and "class_counts", AUCs are macro
    one-vs-rest, accuracy is of the argmax, and the per-group selection rate / TPR / FPR are
    per class (docs/metrics.md, "Multi-class labels")."""
    if unknown not in UNKNOWN_POLICIES:
        raise UserError(f"unknown={unknown!r} is not one of {list(UNKNOWN_POLICIES)}")
    if single_class not in SINGLE_CLASS_POLICIES:
        raise UserError(
            f"single_class={single_class!r} is not one of {list(SINGLE_CLASS_POLICIES)}"
        )
    if min_group_size is not None and int(min_group_size) < 0:
        raise UserError(f"min_group_size={min_group_size} must be >= 0")
    if int(n_boot) < 0:
        raise UserError(f"n_boot={n_boot} must be >= 0")
    if not (0.0 < float(ci) < 1.0):
        raise UserError(f"ci={ci!r} must be strictly between 0 and 1 (e.g. 0.95)")
    if is_multiclass(y_score):
        return _summarize_multiclass(
            y_true,
            y_score,
            sensitive_features=sensitive_features,
            group_names=group_names or {},
            n_boot=int(n_boot),
            ci=ci,
            seed=seed,
            unknown=unknown,
            single_class=single_class,
            min_group_size=min_group_size,
            class_names=class_names,
        )
    y, s, _ = check_inputs(y_true, y_score, threshold=threshold)
    group_names = group_names or {}

    summary: dict[str, Any] = {
        "n": len(y),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "overall": {"auc": _num(roc_auc(y, s)), "acc": float(np.mean((s >= threshold) == y))},
        "policy": {
            "unknown": unknown,
            "single_class": single_class,
            **({} if min_group_size is None else {"min_group_size": int(min_group_size)}),
        },
        "attributes": {},
    }
    boot = None
    if n_boot > 0:
        boot = bootstrap_metrics(
            y,
            s,
            sensitive_features=sensitive_features,
            threshold=threshold,
            n_boot=int(n_boot),
            seed=seed,
            unknown=unknown,
            single_class=single_class,
        )
    for attribute, groups in sensitive_features.items():
        table = disaggregate(y, s, groups=groups, threshold=threshold, unknown=unknown)
        names = [group_name(c, group_names.get(attribute)) for c in table.codes]
        _check_group_names(attribute, names, table.dropped_unknown)
        present = np.ones(len(table.codes), dtype=bool)
        single = [nm for nm, note in zip(names, table.auc_notes) if note is not None]
        std_ratio, range_ratio = disparity_ratios(
            table.overall_auc, table.auc, present, single_class=single_class
        )
        entry: dict[str, Any] = {
            # reference AUC/accuracy of the samples with a known value of this attribute
            # (what ES-AUC and ES-ACC compare each group with; equals "overall" when none dropped)
            "auc": _num(table.overall_auc),
            "acc": float(table.overall_acc),
            "groups": [
                {
                    "code": int(code),
                    "name": nm,
                    "n": int(table.n[k]),
                    "positives": int(table.positives[k]),
                    "auc": _num(table.auc[k]),
                    "auc_note": table.auc_notes[k],
                    "acc": float(table.acc[k]),
                    "selection_rate": float(table.selection_rate[k]),
                    "tpr": float(table.tpr[k]),
                    "fpr": float(table.fpr[k]),
                    **(
                        {}
                        if min_group_size is None
                        else {"small": bool(table.n[k] < min_group_size)}
                    ),
                }
                for k, (code, nm) in enumerate(zip(table.codes, names))
            ],
            "es_auc": _num(
                equity_scaled(table.overall_auc, table.auc, present, single_class=single_class)
            ),
            "es_acc": float(equity_scaled(table.overall_acc, table.acc, present)),
            "dpd": float(spread(table.selection_rate, present)),
            "deodds": float(max(spread(table.tpr, present), spread(table.fpr, present))),
            "auc_std_ratio": _num(std_ratio),
            "auc_range_ratio": _num(range_ratio),
            "dropped_unknown": table.dropped_unknown,
            "skipped_groups": single if single_class == "skip" else [],
        }
        if boot is not None:
            entry["ci"] = _attribute_ci(boot, attribute, table.codes, names, ci, n_boot, seed)
        summary["attributes"][attribute] = entry
    return summary


def _check_group_names(attribute: str, names: list[str], dropped: int) -> None:
    if len(names) < 2:
        raise UserError(
            f"attribute {attribute!r} has a single group ({names[0]!r}"
            f"{', after dropping unknown -1 values' if dropped else ''}): "
            "group fairness metrics need at least two groups"
        )
    if len(set(names)) != len(names):
        dup = next(nm for nm in names if names.count(nm) > 1)
        raise UserError(f"attribute {attribute!r}: two group codes share the name {dup!r}")


def _summarize_multiclass(
    y_true: object,
    y_score: object,
    *,
    sensitive_features: Mapping[str, object],
    group_names: Mapping[str, Mapping[int, str]],
    n_boot: int,
    ci: float,
    seed: int,
    unknown: str,
    single_class: str,
    min_group_size: int | None,
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    """`summarize` for (n, K) class probabilities (the same schema plus the class names)."""
    y, p, _ = check_multiclass_inputs(y_true, y_score)
    k = p.shape[1]
    classes = [str(c) for c in (class_names if class_names is not None else range(k))]
    if len(classes) != k:
        raise UserError(f"class_names has {len(classes)} names but y_score has {k} columns")
    counts = np.bincount(y, minlength=k)
    summary: dict[str, Any] = {
        "n": len(y),
        "classes": classes,
        "class_counts": {c: int(v) for c, v in zip(classes, counts)},
        # samples outside the first (reference) class, e.g. any AMD stage
        "positives": int(len(y) - counts[0]),
        "threshold": None,  # the argmax decides
        "overall": {"auc": _num(roc_auc(y, p)), "acc": float(np.mean(p.argmax(axis=1) == y))},
        "policy": {
            "unknown": unknown,
            "single_class": single_class,
            **({} if min_group_size is None else {"min_group_size": int(min_group_size)}),
        },
        "attributes": {},
    }
    boot = None
    if n_boot > 0:
        boot = bootstrap_metrics(
            y,
            p,
            sensitive_features=sensitive_features,
            n_boot=n_boot,
            seed=seed,
            unknown=unknown,
            single_class=single_class,
        )
    for attribute, groups in sensitive_features.items():
        table = disaggregate_multiclass(y, p, groups=groups, unknown=unknown)
        names = [group_name(c, group_names.get(attribute)) for c in table.codes]
        _check_group_names(attribute, names, table.dropped_unknown)
        present = np.ones(len(table.codes), dtype=bool)
        notes = [class_auc_note(table.class_counts[j], classes) for j in range(len(names))]
        std_ratio, range_ratio = disparity_ratios(
            table.overall_auc, table.auc, present, single_class=single_class
        )
        per_class = lambda row: {c: _num(v) for c, v in zip(classes, row)}  # noqa: E731
        entry: dict[str, Any] = {
            "auc": _num(table.overall_auc),
            "acc": float(table.overall_acc),
            "groups": [
                {
                    "code": int(code),
                    "name": nm,
                    "n": int(table.n[j]),
                    "positives": int(table.n[j] - table.class_counts[j, 0]),
                    "class_counts": {c: int(v) for c, v in zip(classes, table.class_counts[j])},
                    "auc": _num(table.auc[j]),
                    "auc_note": notes[j],
                    "class_auc": per_class(table.class_auc[j]),
                    "acc": float(table.acc[j]),
                    "selection_rate": per_class(table.selection_rate[j]),
                    "tpr": per_class(table.tpr[j]),
                    "fpr": per_class(table.fpr[j]),
                    **(
                        {}
                        if min_group_size is None
                        else {"small": bool(table.n[j] < min_group_size)}
                    ),
                }
                for j, (code, nm) in enumerate(zip(table.codes, names))
            ],
            "es_auc": _num(
                equity_scaled(table.overall_auc, table.auc, present, single_class=single_class)
            ),
            "es_acc": float(equity_scaled(table.overall_acc, table.acc, present)),
            "dpd": _num(multiclass_dpd(table.selection_rate, present)),
            "deodds": _num(multiclass_deodds(table.tpr, table.fpr, present)),
            "auc_std_ratio": _num(std_ratio),
            "auc_range_ratio": _num(range_ratio),
            "dropped_unknown": table.dropped_unknown,
            "skipped_groups": (
                [nm for nm, note in zip(names, notes) if note] if single_class == "skip" else []
            ),
        }
        if boot is not None:
            entry["ci"] = _attribute_ci(boot, attribute, table.codes, names, ci, n_boot, seed)
        summary["attributes"][attribute] = entry
    return summary
