"""Reading a benchmark back: which runs of the plan finished, which are missing or failed.

`collect` reads whatever has finished under a benchmark directory, whoever ran it (this
runner or a cluster scheduler from `--plan`); `merge_collections` pools directories that ran
other seeds. The tables are built from a `Collection` (`benchmark_tables`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multifair.config import load_yaml, validate
from multifair.errors import UserError
from multifair.evaluation.benchmark_plan import BenchmarkConfig, RunSpec, plan
from multifair.evaluation.benchmark_run import (
    log_paths,
    read_metrics,
    read_status,
    stale_runs,
    tail,
)


@dataclass
class RunRecord:
    """A finished run: its matrix cell, metrics.json and where its predictions are."""

    run: RunSpec
    metrics: dict[str, Any]

    @property
    def predictions(self) -> Path:
        return self.run.run_dir / "predictions_test.csv"


@dataclass
class Collection:
    """What a benchmark directory holds right now."""

    config: BenchmarkConfig
    out_dir: Path
    runs: list[RunSpec]
    finished: list[RunRecord]
    missing: list[RunSpec]
    failed: list[tuple[RunSpec, str]]  # (run, stderr tail) for runs whose last attempt failed
    stale: list[RunSpec] = field(default_factory=list)  # finished with another config


def load_manifest(out_dir: str | Path) -> BenchmarkConfig:
    out_dir = Path(out_dir)
    path = out_dir / "benchmark.yaml"
    if not path.is_file():
        raise UserError(
            f"{out_dir}: not a benchmark directory (no benchmark.yaml; `multifair benchmark "
            "CONFIG --plan` or a run writes it)"
        )
    return validate(BenchmarkConfig, load_yaml(path), source=str(path))


def parse_seeds(spec: str, available: Sequence[int]) -> list[int]:
    """`"10-19"`, `"0,3,5"` or a mix (`"0-4,9"`) -> those seeds; each must be one of `available`."""
    seeds: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--seeds: expected e.g. 10-19 or 0,3,5, got {spec!r}") from None
    unknown = sorted(set(seeds) - set(available))
    if unknown or not seeds:
        raise UserError(
            f"--seeds {spec}: seeds {unknown} are not in the benchmark's seeds {list(available)}"
        )
    return [seed for seed in available if seed in set(seeds)]


def merge_collections(
    collections: Sequence[Collection], seeds: str | None = None, reference: str | None = None
) -> Collection:
    """Pool benchmark directories that ran the same attributes on other seeds (a replication
    in its own directory, say) into one collection: rows are matched by label, datasets by
    label, and paired differences use every seed both rows have. The pooled tables cover the
    FIRST directory's datasets; another directory's runs on datasets the first lacks are left
    out (`left_out_datasets` names them), and each other directory must share at least one.
    A (row, seed) in two directories is an error. `seeds` and `reference` act on the pooled
    collection as in `collect`. Tables and report go to the first directory."""
    first = collections[0]
    cfg = first.config
    datasets = {d.label for d in cfg.datasets}
    for other in collections[1:]:
        if list(other.config.attributes) != list(cfg.attributes):
            raise UserError(
                f"{other.out_dir}: attributes {list(other.config.attributes)} differ from "
                f"{first.out_dir}'s {list(cfg.attributes)}; only benchmarks of the same "
                "attributes pool"
            )
        if not datasets & {d.label for d in other.config.datasets}:
            raise UserError(
                f"{other.out_dir}: no dataset label in common with {first.out_dir} "
                f"({sorted(d.label for d in other.config.datasets)} vs {sorted(datasets)})"
            )
    owner: dict[tuple[str, str, str, int], Path] = {}
    for c in collections:
        for run in c.runs:
            if run.dataset not in datasets:
                continue
            cell = (run.dataset, run.attribute, run.variant, run.seed)
            if cell in owner:
                raise UserError(
                    f"{run.variant} seed {run.seed} ({run.dataset}/{run.attribute}) is in both "
                    f"{owner[cell]} and {c.out_dir}: pooled benchmarks need disjoint seeds"
                )
            owner[cell] = c.out_dir
    labels = [m.label for m in cfg.methods]
    methods = list(cfg.methods)
    for c in collections[1:]:
        for m in c.config.methods:
            if m.label not in labels:
                labels.append(m.label)
                methods.append(m)
    all_seeds = sorted({seed for c in collections for seed in c.config.seeds})
    keep = set(parse_seeds(seeds, all_seeds)) if seeds is not None else set(all_seeds)
    if reference is not None and reference not in labels:
        raise UserError(f"--reference {reference!r}: not an entry label (labels: {labels})")
    name = " + ".join(c.config.name for c in collections)
    if seeds is not None:
        name += f", seeds {seeds}"
    if reference is not None:
        name += f", vs {reference}"
    merged = cfg.model_copy(
        update={
            "seeds": [s for s in all_seeds if s in keep],
            "methods": methods,
            "name": name,
            "reference": reference or cfg.reference,
        }
    )
    kept = lambda run: run.seed in keep and run.dataset in datasets  # noqa: E731
    pick = lambda runs: [r for r in runs if kept(r)]  # noqa: E731
    return Collection(
        merged,
        first.out_dir,
        pick([r for c in collections for r in c.runs]),
        [r for c in collections for r in c.finished if kept(r.run)],
        pick([r for c in collections for r in c.missing]),
        [(r, e) for c in collections for r, e in c.failed if kept(r)],
        pick([r for c in collections for r in c.stale]),
    )


def left_out_datasets(collections: Sequence[Collection]) -> dict[Path, list[str]]:
    """Per other directory, its dataset labels the first directory lacks (not pooled)."""
    datasets = {d.label for d in collections[0].config.datasets}
    out = {}
    for c in collections[1:]:
        extra = [d.label for d in c.config.datasets if d.label not in datasets]
        if extra:
            out[c.out_dir] = extra
    return out


def collect(
    out_dir: str | Path,
    cfg: BenchmarkConfig | None = None,
    seeds: str | None = None,
    reference: str | None = None,
) -> Collection:
    """Read every run of the matrix that has finished; list the missing and failed ones.

    The run directories are the ones the config plans under `out_dir` (wherever the runs
    were executed: here, or by a cluster scheduler from `--plan`). `seeds` ("10-19",
    "0,3,5") keeps only those seeds, e.g. to report seeds fixed in advance on their own;
    `reference` pairs the other rows with another entry than the config's `reference`.
    """
    out_dir = Path(out_dir)
    cfg = cfg or load_manifest(out_dir)
    if seeds is not None:
        cfg = cfg.model_copy(
            update={"seeds": parse_seeds(seeds, cfg.seeds), "name": f"{cfg.name}, seeds {seeds}"}
        )
    if reference is not None:
        labels = [m.label for m in cfg.methods]
        if reference not in labels:
            raise UserError(f"--reference {reference!r}: not an entry label (labels: {labels})")
        cfg = cfg.model_copy(update={"reference": reference, "name": f"{cfg.name}, vs {reference}"})
    runs = plan(cfg, out_dir)
    finished, missing, failed = [], [], []
    for run in runs:
        metrics = read_metrics(run.run_dir)
        if metrics is not None:
            finished.append(RunRecord(run, metrics))
            continue
        missing.append(run)
        if read_status(out_dir, run).get("status") == "failed":
            failed.append((run, tail(log_paths(out_dir, run)[1])))
    return Collection(cfg, out_dir, runs, finished, missing, failed, stale_runs(out_dir, runs))
