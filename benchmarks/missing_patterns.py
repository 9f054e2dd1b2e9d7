"""A benchmark on data with missing modalities, read per missingness pattern: for every
method, the test AUC, ES-AUC and group AUCs of each pattern ("all present", "B missing", ...)
as the mean over seeds, and the paired difference to the reference method with a 95%
t-interval over seeds; then the missingness rates by group.

    python benchmarks/missing_patterns.py runs/benchmarks/synth_table_missing [--reference erm]
        [--attribute race] [--presence-from OTHER_ROOT [--presence-dataset LABEL]]

Reads each run's predictions_test.csv. A run without presence columns (`data.missing_modalities:
impute` feeds the placeholders as data, so every modality counts as present) takes the
patterns of another run on the same dataset, matched by sample_id: the rows are the same
patients, and the pattern is a property of the patient's files.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multifair.csvcheck import PRESENT_PREFIX
from multifair.evaluation.benchmark_tables import paired_difference
from multifair.metrics import summarize_missingness


def read_runs(root: Path, attribute: str) -> dict[str, dict[str, dict[int, pd.DataFrame]]]:
    """dataset -> method label -> seed -> predictions frame."""
    out: dict[str, dict[str, dict[int, pd.DataFrame]]] = {}
    for csv in sorted(root.glob(f"runs/*/{attribute}/*/seed*/predictions_test.csv")):
        seed_dir = csv.parent
        method, dataset = seed_dir.parent.name, seed_dir.parent.parent.parent.name
        seed = int(seed_dir.name.removeprefix("seed"))
        out.setdefault(dataset, {}).setdefault(method, {})[seed] = pd.read_csv(csv)
    return out


def presence(frames: dict[str, dict[int, pd.DataFrame]]) -> pd.DataFrame:
    """sample_id -> present_<modality> columns, from any run that wrote them."""
    for by_seed in frames.values():
        for frame in by_seed.values():
            cols = [c for c in frame.columns if c.startswith(PRESENT_PREFIX)]
            if cols:
                return frame[["sample_id", *cols]]
    raise SystemExit("no run of this dataset has presence columns: no missing modalities?")


def per_pattern(frame: pd.DataFrame, present: pd.DataFrame, attribute: str) -> dict:
    if not any(c.startswith(PRESENT_PREFIX) for c in frame.columns):
        frame = frame.merge(present, on="sample_id", how="left", validate="one_to_one")
    have = {
        c[len(PRESENT_PREFIX) :]: frame[c].to_numpy().astype(bool)
        for c in frame.columns
        if c.startswith(PRESENT_PREFIX)
    }
    names = dict(zip(frame[attribute], frame[f"{attribute}_name"]))
    return summarize_missingness(
        frame["label"].to_numpy(),
        frame["score"].to_numpy(),
        have,
        sensitive_features={attribute: frame[attribute].to_numpy()},
        group_names={attribute: {int(k): str(v) for k, v in names.items()}},
    )


def metric(result: dict, key: str, *, pattern: str, attribute: str) -> float | None:
    """One number of one run's per-pattern summary: "auc", "es_auc" or a group's AUC."""
    entry = next(p for p in result["patterns"] if p["pattern"] == pattern)
    if key == "auc":
        return entry["auc"]
    a = entry["attributes"][attribute]
    if key == "es_auc":
        return a["es_auc"]
    return next((g["auc"] for g in a["groups"] if g["name"] == key), None)


def mean(values: list[float | None]) -> float:
    """The mean of the finite values (NaN when there is none)."""
    x = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(x)) if x else math.nan


def by_seed_values(by_seed: dict[int, dict], value: Any, key: str) -> dict[int, float]:
    """seed -> the metric (NaN where the pattern has none, e.g. a group without both classes)."""
    out = {s: value(result, key) for s, result in by_seed.items()}
    return {s: math.nan if v is None else v for s, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--reference", default="erm")
    parser.add_argument("--attribute", default="race")
    parser.add_argument(
        "--presence-from",
        type=Path,
        help="take the patterns from this benchmark's runs (by sample_id): a control on the "
        "same patients with nothing missing, read per the other benchmark's patterns",
    )
    parser.add_argument(
        "--presence-dataset", help="with --presence-from: that benchmark's dataset label"
    )
    args = parser.parse_args(argv)
    attribute = args.attribute
    source = None
    if args.presence_from is not None:
        datasets = read_runs(args.presence_from, attribute)
        label = args.presence_dataset or next(iter(datasets))
        if label not in datasets:
            raise SystemExit(f"--presence-dataset {label!r}: not in {sorted(datasets)}")
        source = presence(datasets[label])
    for dataset, methods in read_runs(args.root, attribute).items():
        present = presence(methods) if source is None else source
        if source is not None:  # the control's own (all-present) columns make way
            methods = {
                m: {
                    s: f.drop(columns=[c for c in f.columns if c.startswith(PRESENT_PREFIX)])
                    for s, f in by_seed.items()
                }
                for m, by_seed in methods.items()
            }
        results = {
            m: {seed: per_pattern(f, present, attribute) for seed, f in by_seed.items()}
            for m, by_seed in methods.items()
        }
        any_result = next(iter(next(iter(results.values())).values()))
        groups = [r["name"] for r in any_result["rates"][attribute]]
        patterns = [p["pattern"] for p in any_result["patterns"]]
        print(f"## {dataset}: test split, mean over seeds; Δ = paired difference to {args.reference} (95% t-interval over seeds)\n")  # fmt: skip
        rates = any_result["rates"][attribute]
        print(
            "missing by "
            + attribute
            + ": "
            + "; ".join(
                f"{r['name']} (n={r['n']}) "
                + ", ".join(f"{m} {100 * v:.0f}%" for m, v in r["missing"].items())
                for r in rates
            )
            + "\n"
        )
        reference = results.get(args.reference)
        for pattern in patterns:
            counts = next(p for p in any_result["patterns"] if p["pattern"] == pattern)
            by_group = {
                g["name"]: g["n"] for g in counts["attributes"][attribute]["groups"]
            }  # group sizes in this pattern
            size = ", ".join(f"{k} {v}" for k, v in by_group.items())
            print(f"### {pattern} (n={counts['n']}: {size})\n")
            header = ["method", "seeds", "AUC", "ES-AUC", *groups, "ΔAUC", "ΔES-AUC"]
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for method, by_seed in results.items():
                value = partial(metric, pattern=pattern, attribute=attribute)
                seeds = sorted(by_seed)
                cells = [method, str(len(seeds))]
                for key in ["auc", "es_auc", *groups]:
                    avg = mean([value(by_seed[s], key) for s in seeds])
                    cells.append(f"{avg:.3f}" if math.isfinite(avg) else "-")
                for key in ["auc", "es_auc"]:
                    if reference is None or method == args.reference:
                        cells.append("")
                        continue
                    d = paired_difference(
                        by_seed_values(by_seed, value, key), by_seed_values(reference, value, key)
                    )
                    cells.append(
                        f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]" if math.isfinite(d.lo) else "-"
                    )
                print("| " + " | ".join(cells) + " |")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
