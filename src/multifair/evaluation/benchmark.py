"""`multifair benchmark`: a matrix of training runs and the paper-style table it produces.

A benchmark config names one training config (`base`) and a matrix:
datasets x attributes x methods x (optional sweep values) x seeds. Every cell is one
`python -m multifair train BASE key=value ...` subprocess with its own run directory, named
deterministically from (dataset, attribute, method label, sweep value, seed), so that

- a re-run skips every run whose `metrics.json` is complete (resumable after a kill),
- `--plan` can print the same command lines for a cluster scheduler, and
- `collect` can aggregate whatever has finished, whoever ran it.

Aggregation builds one table per dataset x attribute: rows = method entries, columns = AUC,
ES-AUC, ES-ACC, each group's AUC, DPD, DEOdds (mean +- std over seeds, plus bootstrap CIs of the
seeds' pooled test predictions from `multifair.metrics`), time per step and peak memory, and the
PAIRED difference to the reference method (default `erm`) by seed with a 95% t-interval.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multifair.config import deep_merge, load_yaml, validate
from multifair.errors import UserError

# Keys of the training config the benchmark sets for every run (docs/architecture.md).
SEED_KEY = "train.seed"
ATTRIBUTE_KEY = "data.attribute"
OUTPUT_KEY = "output.dir"
# Columns of the table, in order; group AUC columns are inserted after ES-ACC.
METRICS = ("auc", "es_auc", "es_acc", "dpd", "deodds")
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
# File-safe names. No "=": `multifair train` reads an argument with "=" as an override, so a
# config path must not contain one ("=" appears only in a sweep folder's `__key=value`).
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


# ============================================================================================
# Config
# ============================================================================================
def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 1}, "method.tau": 0.1} -> {"train.epochs": 1, "method.tau": 0.1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthData(_Strict):
    """Generate a synthetic dataset (`multifair.data.synthetic`) before the runs, if missing."""

    flavour: Literal["fairvision", "fairvlmed", "table"]
    scenario: Literal["main", "neutral", "minority_pattern"] = "main"
    out: str  # where the generator writes; relative to the benchmark config's folder
    knobs: dict[str, Any] = Field(default_factory=dict)  # other SynthKnobs (seed, n, size, ...)


class DatasetEntry(_Strict):
    """One dataset of the matrix.

    Its `data` section comes from, in order: `data_config` (a YAML file with a `data:`
    section, which replaces the base config's), else the generated data when `synth` is given
    (the table flavour's `table.yaml`; `kind` + `root` for the image flavours), else the base
    config. `overrides` then apply on top, like every other override.
    """

    label: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    data_config: str | None = None  # relative to the benchmark config's folder
    synth: SynthData | None = None
    # synth_meta.json with the generator's best achievable per-group AUC (reference lines);
    # defaults to `<synth.out>/synth_meta.json` when `synth` is given.
    synth_meta: str | None = None

    def meta_path(self) -> Path | None:
        if self.synth_meta is not None:
            return Path(self.synth_meta)
        return Path(self.synth.out) / "synth_meta.json" if self.synth is not None else None


class MethodEntry(_Strict):
    """One row of the table: a label, the `method` block, and any other overrides.

    Ablations (modality level only, group level only, released variant) and protocol
    variants (`train.select_by: es_auc`) are ordinary entries.
    """

    label: str
    method: dict[str, Any] = Field(default_factory=dict)  # -> method.<key>; `name` is required
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _has_name(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("name"), str) or not value["name"]:
            raise ValueError("needs a `name` (the registered method, e.g. erm)")
        return value


class Sweep(_Strict):
    """Sweep one config key over values, for the listed method labels (all when omitted)."""

    key: str
    values: list[Any] = Field(min_length=1)
    methods: list[str] | None = None


class BenchmarkConfig(_Strict):
    """A whole benchmark: the base training config, the matrix, and how to run it."""

    name: str
    # training config; relative paths resolve against this file's folder. Optional: without it
    # the recipe is `overrides` + each dataset's data section.
    base: str | None = None
    output: str  # the benchmark directory; relative paths resolve against the working dir
    overrides: dict[str, Any] = Field(default_factory=dict)
    datasets: list[DatasetEntry] = Field(default_factory=lambda: [DatasetEntry(label="data")])
    attributes: list[str] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    # one sweep or a list; an entry under several sweeps runs each key's values in turn
    # (one key at a time, the others at their configured value; not a grid)
    sweep: list[Sweep] = Field(default_factory=list)
    reference: str = "erm"  # label of the row every other row is compared to (paired by seed)
    workers: int = Field(default=1, ge=1)
    threads_per_run: int | None = Field(default=None, ge=1)  # default: cores // workers
    timeout_s: float | None = Field(default=None, gt=0)  # per run
    n_boot: int = Field(default=1000, ge=0)  # bootstrap resamples of the pooled predictions

    @model_validator(mode="after")
    def _check_matrix(self) -> BenchmarkConfig:
        for what, labels in (
            ("datasets", [d.label for d in self.datasets]),
            ("methods", [m.label for m in self.methods]),
            ("attributes", self.attributes),
        ):
            safe = [_safe(x) for x in labels]
            if len(set(safe)) != len(safe):
                raise ValueError(f"{what}: labels must be unique (after making them file-safe)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: must be unique")
        labels = {m.label for m in self.methods}
        for sweep in self.sweep:
            unknown = sorted(set(sweep.methods or ()) - labels)
            if unknown:
                raise ValueError(f"sweep.methods: {unknown} are not method labels {sorted(labels)}")
        keys = [s.key for s in self.sweep]
        if len(set(keys)) != len(keys):
            raise ValueError("sweep: each key at most once")
        return self

    @field_validator("sweep", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, Mapping) else value


def _safe(text: str) -> str:
    return _SAFE.sub("_", str(text)).strip("_") or "_"


def load_benchmark(path: str | Path) -> tuple[BenchmarkConfig, Path]:
    """Read and validate a benchmark config. Returns it with `base` made absolute."""
    path = Path(path)
    cfg = validate(BenchmarkConfig, load_yaml(path), source=str(path))
    base = None
    if cfg.base is not None:
        base = Path(cfg.base)
        if not base.is_absolute():
            base = (path.parent / base).resolve()
        if not base.is_file():
            raise UserError(f"{path}: base: training config not found: {base}")
    # absolute, so the planned commands work from any working directory (cluster jobs)
    cfg = cfg.model_copy(
        update={"base": str(base) if base else None, "output": str(Path(cfg.output).resolve())}
    )
    for i, dataset in enumerate(cfg.datasets):
        if dataset.synth is not None and not Path(dataset.synth.out).is_absolute():
            synth = dataset.synth.model_copy(
                update={"out": str((path.parent / dataset.synth.out).resolve())}
            )
            cfg.datasets[i] = dataset.model_copy(update={"synth": synth})
        for key in ("synth_meta", "data_config"):
            value = getattr(cfg.datasets[i], key)
            if value is not None and not Path(value).is_absolute():
                cfg.datasets[i] = cfg.datasets[i].model_copy(
                    update={key: str((path.parent / value).resolve())}
                )
    return cfg, Path(cfg.output)


# ============================================================================================
# Plan: one RunSpec per matrix cell
# ============================================================================================
def format_value(value: Any) -> str:
    """A config value as the text after `key=` that `parse_overrides` reads back unchanged."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and value.strip() == value and value:
                return value
        except yaml.YAMLError:
            pass
        return json.dumps(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, list, dict)):
        return json.dumps(value)
    raise UserError(f"override value {value!r}: only strings, numbers, booleans, lists, maps")


@dataclass(frozen=True)
class RunSpec:
    """One cell of the matrix."""

    dataset: str
    attribute: str
    label: str
    method: str  # registered method name
    seed: int
    sweep_key: str | None
    sweep_value: Any
    run_dir: Path
    config: Path  # the method entry's training config (base with its method block)
    overrides: dict[str, Any]  # dotted key -> value, in the order they are applied

    @property
    def variant(self) -> str:
        """Row key inside a dataset x attribute table: the label plus the sweep value."""
        if self.sweep_key is None:
            return self.label
        return f"{self.label} [{self.sweep_key.split('.')[-1]}={self.sweep_value}]"

    @property
    def run_id(self) -> str:
        return "/".join(self.run_dir.parts[-4:])

    def command(self) -> list[str]:
        args = [f"{k}={format_value(v)}" for k, v in self.overrides.items()]
        return [sys.executable, "-m", "multifair", "train", str(self.config), *args]


def plan(cfg: BenchmarkConfig, out_dir: Path) -> list[RunSpec]:
    """Every run of the matrix, in a stable order (dataset, attribute, method, sweep, seed).

    What is common to a (dataset, entry) pair lives in its training config file; the command
    line carries only what varies per run: the sweep value, attribute, seed and run directory.
    """
    runs: list[RunSpec] = []
    for dataset in cfg.datasets:
        for attribute in cfg.attributes:
            for entry in cfg.methods:
                cells: list[tuple[str | None, Any]] = [
                    (sweep.key, value)
                    for sweep in cfg.sweep
                    if sweep.methods is None or entry.label in sweep.methods
                    for value in sweep.values
                ] or [(None, None)]
                for key, value in cells:
                    folder = _safe(entry.label)
                    if key is not None:
                        folder += f"__{_safe(key.split('.')[-1])}={_safe(value)}"
                    for seed in cfg.seeds:
                        run_dir = (
                            out_dir / "runs" / _safe(dataset.label) / _safe(attribute) / folder
                        ) / f"seed{seed}"
                        overrides: dict[str, Any] = {}
                        if key is not None:
                            overrides[key] = value
                        overrides[ATTRIBUTE_KEY] = attribute
                        overrides[SEED_KEY] = seed
                        overrides[OUTPUT_KEY] = str(run_dir)
                        runs.append(
                            RunSpec(
                                dataset=dataset.label,
                                attribute=attribute,
                                label=entry.label,
                                method=str(entry.method["name"]),
                                seed=seed,
                                sweep_key=key,
                                sweep_value=value,
                                run_dir=run_dir,
                                config=entry_config_path(out_dir, dataset, entry),
                                overrides=overrides,
                            )
                        )
    return runs


def entry_config_path(out_dir: Path, dataset: DatasetEntry, entry: MethodEntry) -> Path:
    return out_dir / "configs" / _safe(dataset.label) / f"{_safe(entry.label)}.yaml"


def dataset_section(base_data: Mapping[str, Any], dataset: DatasetEntry) -> dict[str, Any]:
    """The `data` section for one dataset (see `DatasetEntry`)."""
    if dataset.data_config is not None:
        loaded = load_yaml(dataset.data_config)
        if not isinstance(loaded.get("data"), Mapping):
            raise UserError(f"{dataset.data_config}: needs a `data:` section")
        return dict(loaded["data"])
    synth = dataset.synth
    if synth is None:
        return dict(base_data)
    if synth.flavour == "table":
        path = Path(synth.out) / "table.yaml"
        loaded = load_yaml(path)
        if not isinstance(loaded.get("data"), Mapping):
            raise UserError(f"{path}: needs a `data:` section (written by the generator)")
        return dict(loaded["data"])
    keep = dict(base_data) if base_data.get("kind") == synth.flavour else {}
    return {**keep, "kind": synth.flavour, "root": synth.out}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"train.epochs": 1} -> {"train": {"epochs": 1}} (values kept as given)."""
    out: dict[str, Any] = {}
    for key, value in _flatten(flat).items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def entry_config(cfg: BenchmarkConfig, dataset: DatasetEntry, entry: MethodEntry) -> dict[str, Any]:
    """The training config of one (dataset, method entry) pair, merged in this order:
    base -> the dataset's data section -> benchmark overrides -> dataset overrides -> the
    entry's method block -> the entry's overrides.

    The method parameters set so far are kept only when they belong to the same method (a
    method's parameters are invalid for another: `erm` has no `tau`); otherwise the entry's
    block replaces them.
    """
    data = load_yaml(cfg.base) if cfg.base else {}
    base_data = data.get("data") if isinstance(data.get("data"), Mapping) else {}
    data["data"] = dataset_section(base_data, dataset)
    data = deep_merge(data, _nest(cfg.overrides))
    data = deep_merge(data, _nest(dataset.overrides))
    method = data.get("method") if isinstance(data.get("method"), Mapping) else {}
    if method.get("name") == entry.method["name"]:
        data["method"] = deep_merge(method, entry.method)
    else:
        data["method"] = dict(entry.method)
    return deep_merge(data, _nest(entry.overrides))


def write_entry_configs(cfg: BenchmarkConfig, out_dir: Path) -> None:
    """One training config per (dataset, method entry): what the run commands name."""
    for dataset in cfg.datasets:
        for entry in cfg.methods:
            path = entry_config_path(out_dir, dataset, entry)
            if "=" in str(path):
                raise UserError(
                    f"output: {out_dir}: a path with '=' cannot be passed to `multifair train` "
                    "(it would be read as a key=value override); choose another folder"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            header = (
                f"# benchmark {cfg.name!r}: dataset {dataset.label!r}, entry {entry.label!r} "
                f"(base: {cfg.base})\n"
            )
            body = yaml.safe_dump(entry_config(cfg, dataset, entry), sort_keys=False)
            path.write_text(header + body, encoding="utf-8")


def plan_lines(cfg: BenchmarkConfig, runs: Sequence[RunSpec]) -> list[str]:
    """One shell command line per run (what `--plan` prints)."""
    return [shlex.join(run.command()) for run in runs]


# ============================================================================================
# Run state
# ============================================================================================
def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics.json if it is complete (a finished run), else None."""
    path = run_dir / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    test = data.get("test") if isinstance(data, dict) else None
    if not isinstance(test, dict):
        return None
    overall = test.get("overall")
    if not isinstance(overall, dict) or "auc" not in overall or "attributes" not in test:
        return None
    return data


def is_finished(run: RunSpec) -> bool:
    return read_metrics(run.run_dir) is not None


def _log_paths(out_dir: Path, run: RunSpec) -> tuple[Path, Path, Path]:
    """stdout, stderr and status files of a run, kept outside the run directory (which the
    trainer owns) so that a failed attempt's evidence survives the retry's clean-up."""
    stem = str(out_dir / "logs" / "__".join(run.run_dir.parts[-4:]))
    # appended, not Path.with_suffix: a label like "p=0.5" has a dot of its own
    return Path(stem + ".stdout"), Path(stem + ".stderr"), Path(stem + ".status")


def fingerprint(run: RunSpec) -> str:
    """What the run trains with: its training config file and its per-run overrides (not the
    run directory). A finished run whose recorded fingerprint differs is stale."""
    try:
        text = run.config.read_text(encoding="utf-8")
    except OSError:
        text = ""
    overrides = {k: v for k, v in run.overrides.items() if k != OUTPUT_KEY}
    payload = text + "\n" + json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_status(out_dir: Path, run: RunSpec) -> dict[str, Any]:
    """The status the runner recorded for a run's last attempt ({} when there is none)."""
    try:
        data = json.loads(_log_paths(out_dir, run)[2].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stale_runs(out_dir: Path, runs: Sequence[RunSpec]) -> list[RunSpec]:
    """Finished runs that this runner trained with a different config than the current one."""
    out = []
    for run in runs:
        recorded = read_status(out_dir, run).get("fingerprint")
        if recorded and is_finished(run) and recorded != fingerprint(run):
            out.append(run)
    return out


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class RunOutcome:
    run: RunSpec
    status: Literal["done", "skipped", "failed"]
    seconds: float = 0.0
    returncode: int | None = None
    stderr_tail: str = ""


class Terminated(Exception):
    """SIGTERM while the benchmark runs (handled like Ctrl-C: stop the children, exit)."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread so `finally` stops the children."""
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            raise Terminated()

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prepare_data(cfg: BenchmarkConfig, echo: Callable[[str], None] = print) -> None:
    """Generate missing synthetic datasets (before any run or config needs them).

    A dataset counts as present when its `synth_meta.json` exists; the generator refuses to
    overwrite a non-empty folder without it (so a half-written folder is never reused).
    """
    for dataset in cfg.datasets:
        synth = dataset.synth
        if synth is None or (Path(synth.out) / "synth_meta.json").is_file():
            continue
        from multifair.data.synthetic import SynthKnobs, generate

        knobs = validate(
            SynthKnobs,
            {**synth.knobs, "flavour": synth.flavour, "scenario": synth.scenario},
            source=f"datasets.{dataset.label}.synth",
        )
        echo(f"generating {synth.flavour} data ({synth.scenario}) in {synth.out}")
        generate(knobs, synth.out, progress=False)


def write_manifest(cfg: BenchmarkConfig, out_dir: Path) -> None:
    """The resolved config next to the runs (what `collect` and `report` read back) and the
    per-entry training configs the run commands name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_entry_configs(cfg, out_dir)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (out_dir / "benchmark.yaml").write_text(text, encoding="utf-8")


def execute(
    cfg: BenchmarkConfig,
    runs: Sequence[RunSpec],
    out_dir: Path,
    *,
    workers: int | None = None,
    echo: Callable[[str], None] = print,
) -> list[RunOutcome]:
    """Run every unfinished run as a subprocess, up to `workers` at a time.

    A finished run (complete metrics.json) is skipped. An unfinished run's directory is
    cleared before it starts again (its previous stderr stays in `logs/`). A failed run is
    reported with the tail of its stderr and the benchmark continues with the others.
    On Ctrl-C or SIGTERM the running children are terminated before this returns.
    """
    workers = workers or cfg.workers
    threads = cfg.threads_per_run or max(1, (os.cpu_count() or 1) // workers)
    env = _child_env(threads)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    outcomes: list[RunOutcome] = []
    pending: list[RunSpec] = []
    for run in runs:
        if is_finished(run):
            outcomes.append(RunOutcome(run, "skipped"))
        else:
            pending.append(run)
    total = len(pending)
    echo(
        f"{len(runs)} runs: {len(runs) - total} already finished, {total} to run, {workers} at a time"
    )
    stale = stale_runs(out_dir, runs)
    if stale:
        echo(
            f"WARNING: {len(stale)} finished runs were trained with a different config than the "
            "current one; they are kept - delete their run directories to retrain them: "
            + ", ".join(r.run_id for r in stale[:10])
            + (" ..." if len(stale) > 10 else "")
        )
    active: dict[subprocess.Popen[bytes], tuple[RunSpec, float, Any, Any]] = {}
    started = 0
    with _sigterm_as_exception():
        try:
            while pending or active:
                while pending and len(active) < workers:
                    run = pending.pop(0)
                    if run.run_dir.exists():
                        shutil.rmtree(run.run_dir)
                    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
                    out_path, err_path, status_path = _log_paths(out_dir, run)
                    status_path.unlink(missing_ok=True)
                    stdout = out_path.open("wb")
                    stderr = err_path.open("wb")
                    proc = subprocess.Popen(run.command(), stdout=stdout, stderr=stderr, env=env)
                    started += 1
                    echo(f"[{started}/{total}] start {run.run_id}")
                    active[proc] = (run, time.monotonic(), stdout, stderr)
                time.sleep(0.1)
                for proc in list(active):
                    run, t0, stdout, stderr = active[proc]
                    elapsed = time.monotonic() - t0
                    if proc.poll() is None:
                        if cfg.timeout_s is None or elapsed < cfg.timeout_s:
                            continue
                        _stop([proc])
                        stderr.write(f"\n[benchmark] killed after {cfg.timeout_s:g} s\n".encode())
                    stdout.close()
                    stderr.close()
                    del active[proc]
                    outcomes.append(_finish(run, proc.returncode, elapsed, out_dir, echo))
        finally:
            # Ctrl-C / SIGTERM / a bug: never leave training processes running behind us.
            _stop(list(active))
            for _, _, stdout, stderr in active.values():
                stdout.close()
                stderr.close()
    return outcomes


def _finish(
    run: RunSpec, returncode: int, seconds: float, out_dir: Path, echo: Callable[[str], None]
) -> RunOutcome:
    _, err_path, status_path = _log_paths(out_dir, run)
    done = returncode == 0 and is_finished(run)
    status: Literal["done", "failed"] = "done" if done else "failed"
    info = {
        "status": status,
        "returncode": returncode,
        "seconds": round(seconds, 3),
        "fingerprint": fingerprint(run),
    }
    status_path.write_text(json.dumps(info) + "\n", encoding="utf-8")
    outcome = RunOutcome(run, status, seconds, returncode)
    if done:
        echo(f"done {run.run_id} ({seconds:.1f} s)")
    else:
        why = f"exit {returncode}" if returncode != 0 else "exit 0 but no complete metrics.json"
        outcome.stderr_tail = tail(err_path)
        echo(f"FAILED {run.run_id} ({why}); stderr: {err_path}\n{_indent(outcome.stderr_tail)}")
    return outcome


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


# ============================================================================================
# Collect: read finished runs back
# ============================================================================================
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


def collect(out_dir: str | Path, cfg: BenchmarkConfig | None = None) -> Collection:
    """Read every run of the matrix that has finished; list the missing and failed ones.

    The run directories are the ones the config plans under `out_dir` (wherever the runs
    were executed: here, or by a cluster scheduler from `--plan`).
    """
    out_dir = Path(out_dir)
    cfg = cfg or load_manifest(out_dir)
    runs = plan(cfg, out_dir)
    finished, missing, failed = [], [], []
    for run in runs:
        metrics = read_metrics(run.run_dir)
        if metrics is not None:
            finished.append(RunRecord(run, metrics))
            continue
        missing.append(run)
        if read_status(out_dir, run).get("status") == "failed":
            failed.append((run, tail(_log_paths(out_dir, run)[1])))
    return Collection(cfg, out_dir, runs, finished, missing, failed, stale_runs(out_dir, runs))


# ============================================================================================
# Tables
# ============================================================================================
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
    return values


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
    summary = summarize(
        pooled["label"].to_numpy(),
        pooled["score"].to_numpy(),
        sensitive_features={attribute: pooled[attribute].to_numpy()},
        group_names={attribute: names} if names else None,
        n_boot=n_boot,
        seed=0,
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
        meta_path = dataset.meta_path()
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
            best = read_synth_meta(meta_path, attribute) if meta_path else None
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
    per_seed = {r.run.seed: run_values(r.metrics, attribute) for r in records}
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
        select_by=str(first.metrics.get("select_by") or "auc"),
        uses_attribute_at_test=any(r.metrics.get("uses_attribute_at_test") for r in records),
        reference_only=first.run.method.startswith("unimodal"),
        memory_kind=str(first.metrics.get("peak_memory_kind") or ""),
    )


# ============================================================================================
# Rendering: terminal, Markdown, CSV, JSON
# ============================================================================================
def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    text = f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def _fmt_ci(bounds: Sequence[float] | None) -> str:
    if not bounds or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds):
        return "-"
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _fmt_paired(p: Paired | None) -> str:
    if p is None or p.n == 0:
        return "-"
    if not math.isfinite(p.lo):
        return f"{p.mean:+.3f} (n={p.n})"
    return f"{p.mean:+.3f} [{p.lo:+.3f}, {p.hi:+.3f}]"


def _row_name(row: Row) -> str:
    name = row.variant + (f" {ATTRIBUTE_MARK}" if row.uses_attribute_at_test else "")
    return name + (" (reference)" if row.reference_only else "")


def table_blocks(table: Table) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """The table as (title, header, rows, notes) blocks shared by every renderer."""
    ordered = [r for r in table.rows if not r.reference_only] + [
        r for r in table.rows if r.reference_only
    ]
    header = ["method", *[column_name(c) for c in table.columns], "s/step", "peak MB", "sel.", "n"]
    main = []
    for row in ordered:
        cells = [_fmt(row.mean.get(c, math.nan), row.std.get(c)) for c in table.columns]
        main.append(
            [
                _row_name(row),
                *cells,
                _fmt(row.mean.get("time_per_step_s", math.nan), digits=4),
                _fmt(row.mean.get("peak_memory_mb", math.nan), digits=0),
                row.select_by,
                str(len(row.seeds)),
            ]
        )
    for name, values in (table.best_achievable or {}).items():
        cells = [_fmt(values.get(c, math.nan)) if c in values else "" for c in table.columns]
        main.append([name, *cells, "", "", "", ""])
    notes = ["mean ± std over seeds (n = number of seeds); sel. = checkpoint selection criterion"]
    kinds = sorted({r.memory_kind for r in table.rows if r.memory_kind})
    if kinds:
        notes.append(f"s/step: training seconds per optimisation step; peak MB: {', '.join(kinds)}")
    if any(r.uses_attribute_at_test for r in table.rows):
        notes.append(
            f"{ATTRIBUTE_MARK} uses the sensitive attribute at test time (not available to a "
            "deployed model that is blind to it)"
        )
    if any(r.reference_only for r in table.rows):
        notes.append("(reference) rows: single-modality models, shown as reference lines")
    if table.best_achievable:
        notes.append(
            "best achievable: AUC of the generator's latent signals on the test split (an "
            "ideal observer; no model can do better in expectation)"
        )
    blocks = [(f"{table.dataset} / {table.attribute}", header, main, notes)]

    if any(row.ci for row in ordered):
        ci_rows = [
            [_row_name(row), *[_fmt_ci(row.ci.get(c)) for c in table.columns]] for row in ordered
        ]
        blocks.append(
            (
                "pooled-prediction bootstrap CIs",
                ["method", *[column_name(c) for c in table.columns]],
                ci_rows,
                [table.ci_note + "; seed-to-seed spread is the ± std above"],
            )
        )
    if table.reference is not None and table.comparisons:
        diff_rows = [
            [
                _row_name(row),
                *[_fmt_paired(row.paired.get(m)) for m in PAIRED_METRICS],
                str(max((p.n for p in row.paired.values()), default=0)),
            ]
            for row in ordered
            if row.paired
        ]
        blocks.append(
            (
                f"paired difference to {table.reference} (by seed)",
                ["method", *[f"Δ {METRIC_NAMES[m]}" for m in PAIRED_METRICS], "pairs"],
                diff_rows,
                [
                    "mean of per-seed differences with a 95% t-interval over the seeds both runs "
                    f"have; {table.comparisons} comparisons, intervals not adjusted for "
                    "multiplicity"
                ],
            )
        )
    return blocks


def to_markdown(tables: Sequence[Table], collection: Collection | None = None) -> str:
    out = []
    if collection is not None:
        out.append(f"# Benchmark `{collection.config.name}`\n")
        out.append(_status_line(collection) + "\n")
    for table in tables:
        for i, (title, header, rows, notes) in enumerate(table_blocks(table)):
            out.append(f"{'##' if i == 0 else '###'} {title}\n")
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out.extend(
                "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows
            )
            out.append("")
            out.extend(f"- {note}" for note in notes if note)
            out.append("")
    if collection is not None and collection.failed:
        out.append("## Failed runs\n")
        for run, err in collection.failed:
            out.append(f"- `{run.run_id}`:\n\n```\n{err}\n```\n")
    return "\n".join(out)


def _status_line(collection: Collection) -> str:
    text = f"{len(collection.finished)} of {len(collection.runs)} runs finished"
    if collection.missing:
        text += f"; {len(collection.missing)} missing"
    if collection.failed:
        text += f" ({len(collection.failed)} failed)"
    if collection.stale:
        text += (
            f"; WARNING: {len(collection.stale)} finished runs were trained with a different "
            "config than the current one"
        )
    return text


def to_csv(tables: Sequence[Table]) -> str:
    """One line per (dataset, attribute, row): means, stds, CIs, paired differences."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    metrics = ["auc", "es_auc", "es_acc", "worst_auc", "dpd", "deodds"]
    groups = sorted({g for t in tables for g in t.groups})
    columns = metrics[:4] + [f"auc/{g}" for g in groups] + metrics[4:]
    header = ["dataset", "attribute", "row", "label", "method", "sweep_key", "sweep_value"]
    header += ["n_seeds", "select_by", "uses_attribute_at_test", "reference_only"]
    for c in columns:
        header += [f"{c}_mean", f"{c}_std", f"{c}_ci_lo", f"{c}_ci_hi"]
    header += ["time_per_step_s", "peak_memory_mb"]
    for m in PAIRED_METRICS:
        header += [f"d_{m}_mean", f"d_{m}_lo", f"d_{m}_hi", f"d_{m}_n"]
    writer.writerow(header)
    for table in tables:
        for row in table.rows:
            line: list[Any] = [table.dataset, table.attribute, row.variant, row.label, row.method]
            line += [row.sweep_key or "", "" if row.sweep_value is None else row.sweep_value]
            line += [len(row.seeds), row.select_by, row.uses_attribute_at_test, row.reference_only]
            for c in columns:
                ci = row.ci.get(c) or [math.nan, math.nan]
                line += [row.mean.get(c, math.nan), row.std.get(c, math.nan), *ci]
            line += [row.mean.get("time_per_step_s"), row.mean.get("peak_memory_mb")]
            for m in PAIRED_METRICS:
                p = row.paired.get(m)
                line += [p.mean, p.lo, p.hi, p.n] if p else ["", "", "", ""]
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in line])
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(tables: Sequence[Table], collection: Collection | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"tables": []}
    if collection is not None:
        out["benchmark"] = collection.config.name
        out["runs"] = {
            "planned": len(collection.runs),
            "finished": len(collection.finished),
            "missing": [r.run_id for r in collection.missing],
            "failed": [{"run": r.run_id, "stderr_tail": err} for r, err in collection.failed],
            "stale": [r.run_id for r in collection.stale],
        }
    for table in tables:
        out["tables"].append(
            {
                "dataset": table.dataset,
                "attribute": table.attribute,
                "groups": table.groups,
                "reference": table.reference,
                "comparisons": table.comparisons,
                "best_achievable_auc": table.best_achievable,
                "ci_note": table.ci_note,
                "rows": [
                    {
                        "row": r.variant,
                        "label": r.label,
                        "method": r.method,
                        "sweep_key": r.sweep_key,
                        "sweep_value": r.sweep_value,
                        "seeds": r.seeds,
                        "select_by": r.select_by,
                        "uses_attribute_at_test": r.uses_attribute_at_test,
                        "reference_only": r.reference_only,
                        "mean": r.mean,
                        "std": r.std,
                        "ci": r.ci,
                        "per_seed": r.per_seed,
                        "paired": {
                            m: {"mean": p.mean, "lo": p.lo, "hi": p.hi, "n": p.n, "diffs": p.diffs}
                            for m, p in r.paired.items()
                        },
                    }
                    for r in table.rows
                ],
            }
        )
    return _jsonable(out)


def print_tables(tables: Sequence[Table], file: Any = None) -> None:
    """Print the tables in the terminal (rich when available)."""
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:  # pragma: no cover - rich is a dependency
        print(to_markdown(tables), file=file or sys.stdout)
        return
    from rich.markup import escape

    # wide enough that cells never wrap (a table is read across, and copied from logs)
    console = Console(file=file, width=max(400, shutil.get_terminal_size().columns))
    for table in tables:
        for title, header, rows, notes in table_blocks(table):
            rich_table = RichTable(title=escape(title), title_justify="left")
            for i, name in enumerate(header):
                rich_table.add_column(
                    escape(name), justify="left" if i == 0 else "right", no_wrap=True
                )
            for row in rows:
                rich_table.add_row(*(escape(cell) for cell in row))
            console.print(rich_table)
            for note in notes:
                if note:
                    console.print(f"  {escape(note)}", style="dim")


def write_results(
    tables: Sequence[Table], collection: Collection, out_dir: Path | None = None
) -> dict[str, Path]:
    """results.md / results.csv / results.json under `<benchmark dir>/results/`."""
    out_dir = out_dir or collection.out_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "results.md",
        "csv": out_dir / "results.csv",
        "json": out_dir / "results.json",
    }
    paths["markdown"].write_text(to_markdown(tables, collection), encoding="utf-8")
    paths["csv"].write_text(to_csv(tables), encoding="utf-8")
    paths["json"].write_text(
        json.dumps(to_json(tables, collection), indent=2) + "\n", encoding="utf-8"
    )
    return paths
