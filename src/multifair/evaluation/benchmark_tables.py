"""The tables of a benchmark: one per dataset x attribute, from its finished runs.

Rows = method entries (at each sweep value); columns = AUC, ES-AUC, ES-ACC, each group's AUC,
DPD, DEOdds as mean ± std over seeds, plus percentile bootstrap CIs of the seeds' pooled test
predictions (`multifair.metrics.summarize`), time per step and peak memory; and the PAIRED
difference of each row to the reference row (default `erm`) by seed, with a 95% t-interval, for
AUC, ES-AUC and the worst group's AUC. Rendered for the terminal (rich), Markdown, CSV and JSON
by `benchmark_report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multifair.errors import UserError
from multifair.evaluation.benchmark_collect import Collection, RunRecord

METRIC_NAMES = {
    "auc": "AUC",
    "es_auc": "ES-AUC",
    "es_acc": "ES-ACC",
    "dpd": "DPD",
    "deodds": "DEOdds",
    "worst_auc": "worst-group AUC",
}
# The metrics compared to the reference, paired by seed.
PAIRED_METRICS = ("auc", "es_auc", "worst_auc")
ATTRIBUTE_MARK = "†"  # methods that read the sensitive attribute at test time


@dataclass
class Paired:
    """Paired difference (row - reference) over the seeds both have."""

    mean: float
    lo: float
    hi: float
    n: int
    diffs: list[float]


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> Paired:
    """Mean of per-seed differences with a 95% t-interval (NaN bounds for fewer than 2 seeds).

    Seeds present in only one of the two, or with a NaN metric, are left out.
    """
    from scipy import stats

    seeds = sorted(
        s
        for s in set(values) & set(reference)
        if math.isfinite(values[s]) and math.isfinite(reference[s])
    )
    diffs = np.asarray([values[s] - reference[s] for s in seeds], dtype=float)
    n = diffs.size
    if n == 0:
        return Paired(math.nan, math.nan, math.nan, 0, [])
    mean = float(diffs.mean())
    if n < 2:
        return Paired(mean, math.nan, math.nan, 1, diffs.tolist())
    half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return Paired(mean, mean - half, mean + half, n, diffs.tolist())


def run_values(metrics: Mapping[str, Any], attribute: str) -> dict[str, float]:
    """The table's numbers for one run, from its metrics.json test summary."""
    test = metrics["test"]
    block = (test.get("attributes") or {}).get(attribute)
    if block is None:
        raise UserError(
            f"metrics.json has no attribute {attribute!r} in its test summary "
            f"(has {sorted(test.get('attributes') or {})})"
        )
    values = {
        "auc": _num(test["overall"].get("auc")),
        "es_auc": _num(block.get("es_auc")),
        "es_acc": _num(block.get("es_acc")),
        "dpd": _num(block.get("dpd")),
        "deodds": _num(block.get("deodds")),
        "time_per_step_s": _num(metrics.get("time_per_step_s")),
        "peak_memory_mb": _num(metrics.get("peak_memory_bytes")) / 2**20,
    }
    group_aucs = []
    for group in block.get("groups") or []:
        auc = _num(group.get("auc"))
        values[f"auc/{group['name']}"] = auc
        if math.isfinite(auc):
            group_aucs.append(auc)
    values["worst_auc"] = min(group_aucs) if group_aucs else math.nan
    # each auxiliary (single-modality) head's test AUC: how much each modality was learned
    for modality, auc in ((metrics.get("aux_auc") or {}).get("test") or {}).items():
        values[f"head_auc/{modality}"] = _num(auc)
    # group-aware stacking (`group_fusion: stacking`): each group's fitted weights, 1/0 fitted
    names = {str(g.get("code")): str(g.get("name")) for g in block.get("groups") or []}
    for key, fit in (metrics.get("posthoc") or {}).items():
        if not key.startswith("stacking/"):
            continue
        group = names.get(key.split("/", 1)[1], key.split("/", 1)[1])
        values[f"stacking/{group}/fitted"] = float(fit is not None)
        for column, weight in (fit or {}).items():
            values[f"stacking/{group}/{column}"] = _num(weight)
    return values


DYNAMICS = ("lr_factor/", "update_norm/")


def training_dynamics(log_path: Path) -> dict[str, float]:
    """Means over a run's logged steps of each modality's step-size factor (`lr_factor/<m>`,
    methods that set one) and encoder update norm (`update_norm/<m>`) from its log.jsonl."""
    sums: dict[str, list[float]] = {}
    try:
        lines = log_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        record = json.loads(line)
        if record.get("kind") != "step":
            continue
        for key, value in record.items():
            if key.startswith(DYNAMICS) and isinstance(value, (int, float)):
                acc = sums.setdefault(key, [0.0, 0])
                acc[0] += value
                acc[1] += 1
    return {key: total / n for key, (total, n) in sums.items()}


def _num(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


@dataclass
class Row:
    """One row of a table: a method entry (at one sweep value) over its seeds."""

    variant: str
    label: str
    method: str
    sweep_key: str | None
    sweep_value: Any
    seeds: list[int]
    per_seed: dict[int, dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    ci: dict[str, list[float]]  # pooled-prediction bootstrap CI per metric
    select_by: str
    uses_attribute_at_test: bool
    reference_only: bool  # single-modality rows: reference lines, not competitors
    memory_kind: str = ""  # what peak memory measures (trainer's peak_memory_kind)
    paired: dict[str, Paired] = field(default_factory=dict)


@dataclass
class Table:
    dataset: str
    attribute: str
    groups: list[str]
    rows: list[Row]
    reference: str | None  # label of the paired reference row, if present
    comparisons: int
    # generator's best achievable AUC: row name -> {"auc" | "auc/<group>": value}
    best_achievable: dict[str, dict[str, float]] | None
    ci_note: str = ""

    @property
    def columns(self) -> list[str]:
        return ["auc", "es_auc", "es_acc", *[f"auc/{g}" for g in self.groups], "dpd", "deodds"]


def column_name(column: str) -> str:
    if column.startswith("auc/"):
        return f"AUC {column[4:]}"
    return METRIC_NAMES.get(column, column)


# The generator's latent signals are drawn per group of this attribute (data/synthetic.py).
SYNTH_ATTRIBUTE = "race"


def read_synth_meta(path: Path, attribute: str) -> dict[str, dict[str, float]] | None:
    """Reference rows from a generator's synth_meta.json: the best achievable AUC (test split,
    from the latent signals) with all modalities and with each modality alone.

    Returns {row name: {"auc": overall, "auc/<group>": per group}} or None when the file does
    not exist or its groups are not those of `attribute`.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read synth_meta.json ({exc})") from None
    test = (meta.get("best_auc") or {}).get("test")
    if attribute != SYNTH_ATTRIBUTE or not isinstance(test, dict):
        return None
    groups = {name: entry for name, entry in test.items() if isinstance(entry, dict)}
    rows: dict[str, dict[str, float]] = {}
    for key in ["joint", *meta.get("modalities", [])]:
        name = "all modalities" if key == "joint" else f"{key} alone"
        row = {f"auc/{g}": _num(entry.get(key)) for g, entry in groups.items()}
        if key == "joint":
            row["auc"] = _num(test.get("overall_joint"))
        rows[f"best achievable ({name})"] = row
    return rows


def selection_label(metrics: Mapping[str, Any]) -> str:
    """The `sel.` cell: the validation metric, and the burn-in when there is one."""
    label = str(metrics.get("select_by") or "auc")
    start = int(metrics.get("select_from") or 0)
    return f"{label} from epoch {start}" if start else label


def mean_synth_meta(paths: Sequence[Path], attribute: str) -> dict[str, dict[str, float]] | None:
    """`read_synth_meta` averaged over several draws (a resampled synthetic dataset: one file
    per seed); the files not written (yet) are left out. None when none has reference rows."""
    found = [m for m in (read_synth_meta(p, attribute) for p in paths) if m is not None]
    if not found:
        return None
    return {
        name: {key: float(np.mean([m[name][key] for m in found])) for key in row}
        for name, row in found[0].items()
    }


def _pooled_ci(records: Sequence[RunRecord], attribute: str, n_boot: int) -> dict[str, list[float]]:
    """Bootstrap CIs of the seeds' test predictions pooled into one sample (metrics package)."""
    if n_boot <= 0:
        return {}
    import pandas as pd

    from multifair.metrics import summarize

    frames = []
    for record in records:
        if not record.predictions.is_file():
            return {}
        frames.append(pd.read_csv(record.predictions))
    pooled = pd.concat(frames, ignore_index=True)
    if attribute not in pooled.columns:
        raise UserError(f"{records[0].predictions}: no column {attribute!r}")
    names = None
    if f"{attribute}_name" in pooled.columns:
        names = dict(zip(pooled[attribute], pooled[f"{attribute}_name"].astype(str)))
    from multifair.training.inference import frame_scores

    scores, classes = frame_scores(pooled, str(records[0].predictions))
    summary = summarize(
        pooled["label"].to_numpy(),
        scores,
        sensitive_features={attribute: pooled[attribute].to_numpy()},
        group_names={attribute: names} if names else None,
        n_boot=n_boot,
        seed=0,
        class_names=classes,
    )
    ci = summary["attributes"][attribute].get("ci") or {}
    out = {k: list(ci[k]) for k in ("auc", "es_auc", "es_acc", "dpd", "deodds") if k in ci}
    for name, bounds in (ci.get("group_auc") or {}).items():
        out[f"auc/{name}"] = list(bounds)
    return out


def build_tables(collection: Collection, *, n_boot: int | None = None) -> list[Table]:
    """One table per dataset x attribute from the finished runs."""
    cfg = collection.config
    n_boot = cfg.n_boot if n_boot is None else n_boot
    tables = []
    for dataset in cfg.datasets:
        meta_paths = dataset.meta_paths(cfg.seeds)
        for attribute in cfg.attributes:
            records = [
                r
                for r in collection.finished
                if r.run.dataset == dataset.label and r.run.attribute == attribute
            ]
            if not records:
                continue
            by_variant: dict[str, list[RunRecord]] = {}
            for record in records:
                by_variant.setdefault(record.run.variant, []).append(record)
            rows, groups = [], []
            for variant, recs in by_variant.items():
                row = _row(variant, recs, attribute, n_boot)
                for key in row.mean:
                    if key.startswith("auc/") and key[4:] not in groups:
                        groups.append(key[4:])
                rows.append(row)
            reference = next(
                (r for r in rows if r.label == cfg.reference and r.sweep_key is None), None
            )
            comparisons = 0
            if reference is not None:
                for row in rows:
                    if row is reference or row.reference_only:
                        continue
                    for metric in PAIRED_METRICS:
                        row.paired[metric] = paired_difference(
                            {s: v[metric] for s, v in row.per_seed.items()},
                            {s: v[metric] for s, v in reference.per_seed.items()},
                        )
                        comparisons += 1
            best = mean_synth_meta(meta_paths, attribute)
            tables.append(
                Table(
                    dataset=dataset.label,
                    attribute=attribute,
                    groups=groups,
                    rows=rows,
                    reference=reference.label if reference else None,
                    comparisons=comparisons,
                    best_achievable=best,
                    ci_note=(
                        f"95% percentile bootstrap CI ({n_boot} resamples) of the seeds' test "
                        "predictions pooled into one sample"
                        if n_boot
                        else ""
                    ),
                )
            )
    return tables


def _row(variant: str, records: Sequence[RunRecord], attribute: str, n_boot: int) -> Row:
    first = records[0]
    per_seed = {
        r.run.seed: {
            **run_values(r.metrics, attribute),
            **training_dynamics(r.run.run_dir / "log.jsonl"),
        }
        for r in records
    }
    keys = list(dict.fromkeys(k for v in per_seed.values() for k in v))  # group order kept
    mean, std = {}, {}
    for key in keys:
        vals = np.asarray([v.get(key, math.nan) for v in per_seed.values()], dtype=float)
        finite = vals[np.isfinite(vals)]
        mean[key] = float(finite.mean()) if finite.size else math.nan
        std[key] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return Row(
        variant=variant,
        label=first.run.label,
        method=str(first.metrics.get("method") or first.run.method),
        sweep_key=first.run.sweep_key,
        sweep_value=first.run.sweep_value,
        seeds=sorted(per_seed),
        per_seed=per_seed,
        mean=mean,
        std=std,
        ci=_pooled_ci(records, attribute, n_boot),
        select_by=selection_label(first.metrics),
        uses_attribute_at_test=any(r.metrics.get("uses_attribute_at_test") for r in records),
        reference_only=first.run.method.startswith("unimodal"),
        memory_kind=str(first.metrics.get("peak_memory_kind") or ""),
    )
