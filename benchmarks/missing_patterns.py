"""A benchmark on data with missing modalities, read per missingness pattern: for every
method, the test AUC, ES-AUC and group AUCs of each pattern ("all present", "B missing", ...)
as the mean over seeds, and the paired difference to the reference method with a 95%
t-interval over seeds; then the missingness rates by group.

    python benchmarks/missing_patterns.py runs/benchmarks/synth_table_missing [--reference erm]
        [--attribute race] [--presence-from OTHER_ROOT [--presence-dataset LABEL]]

Reads each run's predictions_test.csv. A run without presence columns (`data.missing_modalities:
impute` feeds the placeholders as data, so every modality counts as present) takes the
patterns of another run on the same dataset, matched by sample_id: the rows are the same
patients, and the pattern is a property of the patient's files. The patterns come from a run
of the SAME seed where there is one: with `synth.resample` every seed is its own data draw,
with its own patients missing a modality (and the same sample_ids). Pattern sizes and rates
are printed per seed when every seed has the same, else as the mean over seeds.
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


def presence(frames: dict[str, dict[int, pd.DataFrame]], seed: int | None = None) -> pd.DataFrame:
    """sample_id -> present_<modality> columns, from a run of `seed` that wrote them (with
    resampled data each seed is its own draw), else from any run that wrote them (one draw
    shared by every seed; a note on stderr when `seed` was asked for)."""
    found = [
        (s, frame[["sample_id", *cols]])
        for by_seed in frames.values()
        for s, frame in by_seed.items()
        if (cols := [c for c in frame.columns if c.startswith(PRESENT_PREFIX)])
    ]
    if not found:
        raise SystemExit("no run of this dataset has presence columns: no missing modalities?")
    same = [f for s, f in found if s == seed]
    if same:
        return same[0]
    if seed is not None:
        print(
            f"note: no run of seed {seed} has presence columns; using seed {found[0][0]}'s "
            "(right only if every seed reads the same data draw)",
            file=sys.stderr,
        )
    return found[0][1]


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
    """One number of one run's per-pattern summary: "auc", "es_auc" or a group's AUC (None
    where the run's draw has no such pattern)."""
    entry = next((p for p in result["patterns"] if p["pattern"] == pattern), None)
    if entry is None:
        return None
    if key == "auc":
        return entry["auc"]
    a = entry["attributes"][attribute]
    if key == "es_auc":
        return a["es_auc"]
    return next((g["auc"] for g in a["groups"] if g["name"] == key), None)


def _number(values: list[float]) -> str:
    """One number if every seed has it, else the mean over seeds (one decimal)."""
    if len(set(values)) == 1:
        return f"{values[0]:g}"
    return f"{np.mean(values):.1f}"


def _varies(per_seed: dict[int, dict], attribute: str) -> bool:
    sizes = {
        tuple((p["pattern"], p["n"]) for p in r["patterns"])
        + tuple((g["name"], g["n"]) for g in r["rates"][attribute])
        for r in per_seed.values()
    }
    return len(sizes) > 1


def sizes_note(per_seed: dict[int, dict]) -> str:
    first = next(iter(per_seed.values()))
    if _varies(per_seed, next(iter(first["rates"]))):
        return "sizes and rates: mean per seed (each seed reads its own data draw)"
    return "sizes and rates: the same for every seed"


def rates_line(per_seed: dict[int, dict], attribute: str) -> str:
    first = next(iter(per_seed.values()))["rates"][attribute]
    parts = []
    for j, group in enumerate(first):
        rows = [r["rates"][attribute][j] for r in per_seed.values()]
        n = _number([row["n"] for row in rows])
        shares = ", ".join(
            f"{m} {100 * np.mean([row['missing'][m] for row in rows]):.0f}%"
            for m in group["missing"]
        )
        parts.append(f"{group['name']} (n={n}) {shares}")
    return "; ".join(parts)


def pattern_size(per_seed: dict[int, dict], pattern: str, attribute: str) -> str:
    """n=...: group sizes of one pattern (a seed without the pattern counts 0)."""
    entries = [next((p for p in r["patterns"] if p["pattern"] == pattern), None) for r in per_seed.values()]  # fmt: skip
    n = _number([e["n"] if e else 0 for e in entries])
    names = [g["name"] for g in next(iter(per_seed.values()))["rates"][attribute]]
    by_group = []
    for name in names:
        counts = [
            next((g["n"] for g in e["attributes"][attribute]["groups"] if g["name"] == name), 0)
            if e
            else 0
            for e in entries
        ]
        by_group.append(f"{name} {_number(counts)}")
    return f"n={n}: " + ", ".join(by_group)


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
        source = datasets[label]
    for dataset, methods in read_runs(args.root, attribute).items():
        frames = methods if source is None else source
        if source is not None:  # the control's own (all-present) columns make way
            methods = {
                m: {
                    s: f.drop(columns=[c for c in f.columns if c.startswith(PRESENT_PREFIX)])
                    for s, f in by_seed.items()
                }
                for m, by_seed in methods.items()
            }
        results = {
            m: {
                seed: per_pattern(f, presence(frames, seed), attribute)
                for seed, f in by_seed.items()
            }
            for m, by_seed in methods.items()
        }
        # one result per seed (every method of a seed reads the same patients)
        per_seed = {s: r for by_seed in results.values() for s, r in by_seed.items()}
        any_result = next(iter(per_seed.values()))
        groups = [r["name"] for r in any_result["rates"][attribute]]
        patterns = list(
            dict.fromkeys(p["pattern"] for r in per_seed.values() for p in r["patterns"])
        )
        print(f"## {dataset}: test split, mean over seeds; Δ = paired difference to {args.reference} (95% t-interval over seeds)\n")  # fmt: skip
        print(f"{len(per_seed)} seeds; {sizes_note(per_seed)}\n")
        print("missing by " + attribute + ": " + rates_line(per_seed, attribute) + "\n")
        reference = results.get(args.reference)
        for pattern in patterns:
            print(f"### {pattern} ({pattern_size(per_seed, pattern, attribute)})\n")
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
