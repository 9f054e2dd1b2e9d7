"""`multifair benchmark`: a matrix of training runs and the paper-style table it produces.

A benchmark config names a training recipe (`base` + `overrides`) and a matrix:
datasets x attributes x methods x (optional sweep values) x seeds. Every cell is one
`python -m multifair train CONFIG key=value ...` subprocess with its own run directory, named
deterministically from (dataset, attribute, method label, sweep value, seed), so that

- a re-run skips every run whose `metrics.json` is complete (resumable after a kill),
- `--plan` can print the same command lines for a cluster scheduler, and
- `collect` can aggregate whatever has finished, whoever ran it.

What a (dataset, method entry) pair trains with is written to one training config file
(`OUTPUT/configs/<dataset>/<label>.yaml`); the command line carries only what varies per run.
The tables built from the finished runs live in `multifair.evaluation.benchmark_tables`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multifair.config import deep_merge, load_yaml, validate
from multifair.errors import UserError
from multifair.evaluation import launch
from multifair.evaluation.launch import Launcher

# Keys of the training config the benchmark sets for every run (docs/architecture.md).
SEED_KEY = "train.seed"
ATTRIBUTE_KEY = "data.attribute"
OUTPUT_KEY = "output.dir"
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
    """Generate a synthetic dataset (`multifair.data.synthetic`) before the runs, if missing.

    `resample: true` draws a new data set for every training seed: the runs of seed s read the
    data generated with the generator's seed s, in `<out>/seed<s>`. Every method still sees the
    same draw at a given seed (the paired differences stay paired), and the spread over seeds
    then includes the data's sampling, not only the training's. Without it every run reads
    one draw (`knobs.seed`, default 0).
    """

    flavour: Literal["fairvision", "fairvlmed", "table"]
    scenario: Literal["main", "neutral", "minority_pattern"] = "main"
    out: str  # where the generator writes; relative to the benchmark config's folder
    knobs: dict[str, Any] = Field(default_factory=dict)  # other SynthKnobs (seed, n, size, ...)
    resample: bool = False

    @model_validator(mode="after")
    def _one_seed_source(self) -> SynthData:
        if self.resample and "seed" in self.knobs:
            raise ValueError(
                "`resample: true` draws one data set per training seed (the generator's seed "
                "is the run's); remove `knobs.seed`"
            )
        return self

    def folder(self, seed: int) -> Path:
        """Where the data of the runs with training seed `seed` live."""
        return Path(self.out) / f"seed{seed}" if self.resample else Path(self.out)

    def draws(self, seeds: Sequence[int]) -> dict[Path, int | None]:
        """Each data folder to generate -> the generator seed (None: the knobs' own)."""
        if not self.resample:
            return {Path(self.out): None}
        return {self.folder(s): s for s in seeds}


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

    def meta_paths(self, seeds: Sequence[int]) -> list[Path]:
        """The synth_meta.json files of the reference lines (one per draw with `resample`)."""
        if self.synth_meta is not None:
            return [Path(self.synth_meta)]
        if self.synth is None:
            return []
        return [folder / "synth_meta.json" for folder in self.synth.draws(seeds)]


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
    # how each run starts: a fresh interpreter, or forked from one that imported torch once
    launcher: Launcher = "subprocess"

    @model_validator(mode="after")
    def _check_matrix(self) -> BenchmarkConfig:
        for what, labels in (
            ("datasets", [d.label for d in self.datasets]),
            ("methods", [m.label for m in self.methods]),
            ("attributes", self.attributes),
        ):
            safe = [safe_name(x) for x in labels]
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


def safe_name(text: str) -> str:
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


def execution_order(cfg: BenchmarkConfig, runs: Sequence[RunSpec]) -> list[RunSpec]:
    """`runs` seed by seed (stable otherwise): a partial benchmark has whole, paired seeds."""
    rank = {seed: i for i, seed in enumerate(cfg.seeds)}
    return sorted(runs, key=lambda run: rank.get(run.seed, len(rank)))


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
                    folder = safe_name(entry.label)
                    if key is not None:
                        folder += f"__{safe_name(key.split('.')[-1])}={safe_name(value)}"
                    for seed in cfg.seeds:
                        run_dir = (
                            out_dir
                            / "runs"
                            / safe_name(dataset.label)
                            / safe_name(attribute)
                            / folder
                        ) / f"seed{seed}"
                        overrides: dict[str, Any] = data_override(dataset, seed)
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
    return out_dir / "configs" / safe_name(dataset.label) / f"{safe_name(entry.label)}.yaml"


def dataset_section(
    base_data: Mapping[str, Any], dataset: DatasetEntry, seed: int
) -> dict[str, Any]:
    """The `data` section for one dataset (see `DatasetEntry`); with `synth.resample`, the
    draw of training seed `seed` (each run then points at its own draw: `data_override`)."""
    if dataset.data_config is not None:
        loaded = load_yaml(dataset.data_config)
        if not isinstance(loaded.get("data"), Mapping):
            raise UserError(f"{dataset.data_config}: needs a `data:` section")
        return dict(loaded["data"])
    synth = dataset.synth
    if synth is None:
        return dict(base_data)
    if synth.flavour == "table":
        path = synth.folder(seed) / "table.yaml"
        loaded = load_yaml(path)
        if not isinstance(loaded.get("data"), Mapping):
            raise UserError(f"{path}: needs a `data:` section (written by the generator)")
        return dict(loaded["data"])
    keep = dict(base_data) if base_data.get("kind") == synth.flavour else {}
    return {**keep, "kind": synth.flavour, "root": str(synth.folder(seed))}


def data_override(dataset: DatasetEntry, seed: int) -> dict[str, Any]:
    """The per-run data override of a resampled synthetic dataset: the draw of `seed`."""
    synth = dataset.synth
    if synth is None or not synth.resample:
        return {}
    if synth.flavour == "table":  # the generator's table.yaml names its CSV by absolute path
        return {"data.path": str((synth.folder(seed) / "table.csv").resolve())}
    return {"data.root": str(synth.folder(seed))}


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
    data["data"] = dataset_section(base_data, dataset, cfg.seeds[0])
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


def oversubscribed(parallel: int, threads: int, cores: int) -> str | None:
    """A warning when `parallel` runs of `threads` threads each exceed the CPU cores."""
    if parallel * threads <= cores:
        return None
    return (
        f"WARNING: {parallel} runs x {threads} threads exceed the {cores} CPU cores, so the "
        "runs compete for them (on a GPU machine too: data loading and the training loop run "
        f"on the CPU); --workers {max(1, cores // threads)} avoids that"
    )


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop(processes: Sequence[Any]) -> None:
    """Terminate, then kill after 10 s, each running process (Popen or a preloaded run)."""
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
        if synth is None:
            continue
        for folder, seed in synth.draws(cfg.seeds).items():
            if (folder / "synth_meta.json").is_file():
                continue
            from multifair.data.synthetic import SynthKnobs, generate

            seed_knob = {} if seed is None else {"seed": seed}
            knobs = validate(
                SynthKnobs,
                {**synth.knobs, **seed_knob, "flavour": synth.flavour, "scenario": synth.scenario},
                source=f"datasets.{dataset.label}.synth",
            )
            echo(f"generating {synth.flavour} data ({synth.scenario}) in {folder}")
            generate(knobs, folder, progress=False)


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
    launcher: Launcher | None = None,
    echo: Callable[[str], None] = print,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every unfinished run as a subprocess, up to `workers` at a time.

    A finished run (complete metrics.json) is skipped. An unfinished run's directory is
    cleared before it starts again (its previous stderr stays in `logs/`). A failed run is
    reported with the tail of its stderr and the benchmark continues with the others.
    Runs start seed by seed (every method's first seed, then every method's second, ...), so a
    benchmark stopped part-way leaves whole seeds that pair across methods.
    On Ctrl-C or SIGTERM the running children are terminated before this returns.
    `launcher` (default: the config's) says how a run starts (`multifair.evaluation.launch`).
    `on_done` is called with each finished or failed run's outcome (a progress bar).
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
    pending = execution_order(cfg, pending)
    total = len(pending)
    echo(
        f"{len(runs)} runs: {len(runs) - total} already finished, {total} to run, {workers} at a time"
    )
    warning = oversubscribed(min(workers, total), threads, os.cpu_count() or 1)
    if warning:
        echo(warning)
    stale = stale_runs(out_dir, runs)
    if stale:
        echo(
            f"WARNING: {len(stale)} finished runs were trained with a different config than the "
            "current one; they are kept - delete their run directories to retrain them: "
            + ", ".join(r.run_id for r in stale[:10])
            + (" ..." if len(stale) > 10 else "")
        )
    launcher = launcher or cfg.launcher
    active: dict[Any, tuple[RunSpec, float, Any, Any]] = {}
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
                    proc = launch.start(launcher, run.command(), stdout, stderr, env, threads)
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
                    if on_done is not None:
                        on_done(outcomes[-1])
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
        echo(f"FAILED {run.run_id} ({why}); stderr: {err_path}\n{indent(outcome.stderr_tail)}")
    return outcome


def indent(text: str) -> str:
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
            failed.append((run, tail(_log_paths(out_dir, run)[1])))
    return Collection(cfg, out_dir, runs, finished, missing, failed, stale_runs(out_dir, runs))
