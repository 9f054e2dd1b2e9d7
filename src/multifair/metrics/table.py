"""`format_table`: a metrics summary as plain text for a terminal or a log file.

Plain text (not a rich renderable) so that it reads the same in a terminal, a CI log, a pipe
and the HTML report's <pre> block. Undefined numbers print as "undefined", never as a blank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_table", "policy_lines"]

_UNKNOWN_TEXT = {
    "drop": "unknown=drop (samples whose code is -1 are left out of that attribute)",
    "keep": "unknown=keep (code -1 is evaluated as its own group, 'unknown')",
}
_SINGLE_CLASS_TEXT = {
    "skip": "single_class=skip (a group with one class has no AUC and is left out of ES-AUC "
    "and the AUC disparity ratios)",
    "propagate": "single_class=propagate (a group with one class has no AUC, which makes ES-AUC "
    "and the AUC disparity ratios undefined)",
}


def _f(x: float | None, digits: int = 3) -> str:
    return "undefined" if x is None else f"{x:.{digits}f}"


def _with_ci(value: float | None, ci: Sequence[float | None] | None) -> str:
    if ci is None:
        return _f(value)
    return f"{_f(value)} [{_f(ci[0])}, {_f(ci[1])}]"


def policy_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line per edge-case policy used, in words."""
    policy = summary["policy"]
    return [
        "policy: " + _UNKNOWN_TEXT.get(policy["unknown"], f"unknown={policy['unknown']}"),
        "policy: "
        + _SINGLE_CLASS_TEXT.get(policy["single_class"], f"single_class={policy['single_class']}"),
        (
            "policy: DPD and DEOdds are the largest over classes of the one-vs-rest value; a "
            "group without a class is left out of that class's TPR spread"
            if "classes" in summary
            else "policy: a group with no positives has TPR 0; one with no negatives has FPR 0 "
            "(fairlearn)"
        ),
        *(
            [
                f"policy: a group with n < {policy['min_group_size']} in this split is flagged "
                "small: its AUC rests on few samples, read its interval"
            ]
            if "min_group_size" in policy
            else []
        ),
    ]


def _grid(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[c]) if c in right else cell.ljust(widths[c])
            for c, cell in enumerate(row)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_table(summary: Mapping[str, Any]) -> str:
    """Render a `summarize` result: the overall line, then per attribute a group table
    (n, positives, AUC with CI, accuracy, selection rate, TPR, FPR) and the fairness metrics with
    their CIs, and every edge case met (unknowns dropped, groups without an AUC)."""
    attrs = summary["attributes"]
    first_ci = next((a["ci"] for a in attrs.values() if "ci" in a), None)
    multiclass = "classes" in summary
    if multiclass:  # counts per class; the argmax decides (docs/metrics.md, multi-class)
        counts = ", ".join(f"{c} {v}" for c, v in summary["class_counts"].items())
        head = f"{summary['n']} predictions ({counts}), argmax decision, macro one-vs-rest AUC"
    else:
        head = (
            f"{summary['n']} predictions, {summary['positives']} positives, "
            f"decision threshold {summary['threshold']:g}"
        )
    if first_ci is not None:
        head += (
            f"; {100 * first_ci['level']:g}% percentile bootstrap CIs "
            f"({first_ci['n_boot']} resamples, seed {first_ci['seed']})"
        )
    out = [head, *policy_lines(summary), ""]
    overall = summary["overall"]
    out.append(
        f"overall  AUC {_with_ci(overall['auc'], first_ci['auc'] if first_ci else None)}"
        f"   ACC {_f(overall['acc'])}"
    )
    for attribute, entry in attrs.items():
        ci = entry.get("ci")
        groups = entry["groups"]
        evaluated = sum(g["n"] for g in groups)
        out += [
            "",
            f"{attribute}: {len(groups)} groups, {evaluated} predictions evaluated"
            + (
                f", {entry['dropped_unknown']} with unknown {attribute} dropped"
                if entry["dropped_unknown"]
                else ""
            ),
        ]
        auc_head = f"AUC [{100 * ci['level']:g}% CI]" if ci else "AUC"
        flag = any("small" in g for g in groups)  # a column only when sizes were judged
        rows = [["group", "n", "positives", auc_head, "ACC", "sel.rate", "TPR", "FPR"]]
        if multiclass:  # per-class rates stay in the JSON (selection_rate/tpr/fpr per class)
            rows = [["group", "n", "per class", auc_head, "ACC"]]
        rows[0] += ["size"] if flag else []
        for g in groups:
            auc = _with_ci(g["auc"], ci["group_auc"].get(g["name"]) if ci else None)
            if g["auc"] is None:
                auc = "undefined (missing class)" if multiclass else "undefined (single class)"
            if multiclass:
                rows.append(
                    [
                        g["name"],
                        str(g["n"]),
                        "/".join(str(v) for v in g["class_counts"].values()),
                        auc,
                        _f(g["acc"]),
                        *((["small"] if g.get("small") else [""]) if flag else []),
                    ]
                )
                continue
            rows.append(
                [
                    g["name"],
                    str(g["n"]),
                    str(g["positives"]),
                    auc,
                    _f(g["acc"]),
                    _f(g["selection_rate"]),
                    _f(g["tpr"]),
                    _f(g["fpr"]),
                    *((["small"] if g.get("small") else [""]) if flag else []),
                ]
            )
        out += _grid(rows, right={1, 2})
        metric = {
            k: _with_ci(entry[k], ci[k] if ci else None)
            for k in ("es_auc", "es_acc", "dpd", "deodds")
        }
        out += [
            f"  ES-AUC {metric['es_auc']}   ES-ACC {metric['es_acc']}",
            f"  DPD    {metric['dpd']}   DEOdds {metric['deodds']}",
            f"  between-group AUC disparity: std/AUC {_f(entry['auc_std_ratio'])}, "
            f"(max-min)/AUC {_f(entry['auc_range_ratio'])}",
        ]
        for g in groups:
            if g["auc_note"] is None:
                continue
            effect = (
                "left out of ES-AUC and the disparity ratios (single_class=skip)"
                if g["name"] in entry["skipped_groups"]
                else "so ES-AUC and the disparity ratios are undefined (single_class=propagate)"
            )
            out.append(f"  note: {g['name']}: {g['auc_note']}; {effect}")
            if multiclass:
                continue
            if g["positives"] == 0:
                out.append(f"  note: {g['name']}: no positives, so its TPR is 0 in DEOdds")
            elif g["positives"] == g["n"]:
                out.append(f"  note: {g['name']}: no negatives, so its FPR is 0 in DEOdds")
    return "\n".join(out)
