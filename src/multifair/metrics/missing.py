"""Metrics by missingness pattern, and missingness rates by group.

With missing modalities a single test AUC hides who is served by what: a patient without a
fundus photo is predicted from the other modality alone, and when one group misses a modality
more often (the realistic unfair case) the group gap partly IS the pattern gap. So the summary
of a split with missing modalities also carries, per pattern ("all present", "fundus missing",
...), the sample count, AUC, ES-AUC and group AUCs, and per attribute group the share of
samples lacking each modality.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from multifair.errors import UserError
from multifair.metrics.fairness import UNKNOWN, accuracy, es_auc, group_auc, roc_auc
from multifair.metrics.groups import group_name

ALL_PRESENT = "all present"


def pattern_names(present: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N,) object: each sample's pattern, "all present" or "<m> missing" / "<m>+<n> missing"
    (modalities in the given order)."""
    modalities = list(present)
    n = len(next(iter(present.values()))) if present else 0
    names = np.empty(n, dtype=object)
    for i in range(n):
        absent = [m for m in modalities if not present[m][i]]
        names[i] = ALL_PRESENT if not absent else "+".join(absent) + " missing"
    return names


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def summarize_missingness(
    y_true: Any,
    y_score: Any,
    present: Mapping[str, Any],
    *,
    sensitive_features: Mapping[str, Any],
    group_names: Mapping[str, Mapping[int, str]] | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """JSON-able: `{"modalities", "patterns": [{"pattern", "n", "positives", "auc", "acc",
    "attributes": {a: {"es_auc", "groups": [{"name", "n", "auc"}]}}}], "rates": {a: [{"name",
    "n", "missing": {m: share}}]}}`. AUCs are None where a subset has one class; patterns are
    ordered "all present" first, then by size."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    have = {m: np.asarray(p, dtype=bool) for m, p in present.items()}
    columns = {"y_score": len(s), **{f"present[{m!r}]": len(p) for m, p in have.items()}}
    columns |= {f"groups {a!r}": len(np.asarray(c)) for a, c in sensitive_features.items()}
    wrong = {name: n for name, n in columns.items() if n != len(y)}
    if wrong:
        raise UserError(f"y_true has {len(y)} entries but {wrong}: one entry per prediction")
    names = pattern_names(have)
    binary = s.ndim == 1  # multi-class: (N, K) probabilities, no "positives" to count
    names_by = group_names or {}
    order = sorted(set(names.tolist()), key=lambda p: (p != ALL_PRESENT, -(names == p).sum(), p))
    patterns = []
    for pattern in order:
        rows = names == pattern
        entry: dict[str, Any] = {
            "pattern": pattern,
            "n": int(rows.sum()),
            "positives": int(y[rows].sum()) if binary else None,
            "auc": _finite(roc_auc(y[rows], s[rows])),
            "acc": accuracy(y[rows], s[rows], threshold=threshold),
            "attributes": {},
        }
        for attribute, codes in sensitive_features.items():
            g = np.asarray(codes, dtype=np.int64)[rows]
            known = g != UNKNOWN
            if not known.any():  # every sample of this pattern has an unknown group
                entry["attributes"][attribute] = {"es_auc": None, "groups": []}
                continue
            aucs = group_auc(y[rows], s[rows], groups=g)
            groups = []
            for code in sorted(set(g[known].tolist())):
                member = g == code
                groups.append(
                    {
                        "code": int(code),
                        "name": group_name(int(code), names_by.get(attribute)),
                        "n": int(member.sum()),
                        "positives": int(y[rows][member].sum()) if binary else None,
                        "auc": _finite(aucs.get(int(code), float("nan"))),
                    }
                )
            # ES-AUC compares groups: it needs two with an AUC in this pattern
            enough = sum(gr["auc"] is not None for gr in groups) >= 2 and entry["auc"] is not None
            entry["attributes"][attribute] = {
                "es_auc": _finite(es_auc(y[rows], s[rows], groups=g)) if enough else None,
                "groups": groups,
            }
        patterns.append(entry)
    rates: dict[str, list[dict[str, Any]]] = {}
    for attribute, codes in sensitive_features.items():
        g = np.asarray(codes, dtype=np.int64)
        rates[attribute] = [
            {
                "code": int(code),
                "name": group_name(int(code), names_by.get(attribute)),
                "n": int((g == code).sum()),
                "missing": {m: float(np.mean(~p[g == code])) for m, p in have.items()},
            }
            for code in sorted(set(g[g != UNKNOWN].tolist()))
        ]
    return {"modalities": list(have), "patterns": patterns, "rates": rates}


def format_missingness(summary: Mapping[str, Any], attribute: str | None = None) -> str:
    """The per-pattern table and the rates by group, for the terminal."""
    attributes = list(summary["rates"]) if attribute is None else [attribute]
    lines = []
    for a in attributes:
        rates = summary["rates"].get(a, [])
        cells = ", ".join(
            f"{r['name']} " + " ".join(f"{m} {100 * v:.0f}%" for m, v in r["missing"].items())
            for r in rates
        )
        lines.append(f"missing modalities by {a}: {cells}")
        group_order = [r["name"] for r in rates]
        header = f"{'pattern':<24} {'n':>6} {'AUC':>6} {'ES-AUC':>7} " + " ".join(
            f"{name[:10]:>10}" for name in group_order
        )
        lines += [header, "-" * len(header)]
        for p in summary["patterns"]:
            entry = p["attributes"].get(a, {"es_auc": None, "groups": []})
            by_name = {gr["name"]: gr for gr in entry["groups"]}

            def fmt(x: float | None, width: int) -> str:
                return f"{x:>{width}.3f}" if x is not None else f"{'-':>{width}}"

            groups = " ".join(
                fmt(by_name[name]["auc"], 10) if name in by_name else f"{'-':>10}"
                for name in group_order
            )
            lines.append(
                f"{p['pattern'][:24]:<24} {p['n']:>6} {fmt(p['auc'], 6)} "
                f"{fmt(entry['es_auc'], 7)} {groups}"
            )
    return "\n".join(lines)
