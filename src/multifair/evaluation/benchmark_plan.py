"""A benchmark's config and its plan: which training runs the matrix holds.

A benchmark config names a training recipe (`base` + `overrides`) and a matrix:
datasets x attributes x methods x (optional sweep values) x seeds. Every cell is one
`python -m multifair train CONFIG key=value ...` command with its own run directory, named
deterministically from (dataset, attribute, method label, sweep value, seed), so that a re-run,
`--plan` for a cluster scheduler, and `collect` all find the same runs.

What a (dataset, method entry) pair trains with is written to one training config file
(`OUTPUT/configs/<dataset>/<label>.yaml`); the command line carries only what varies per run.
Running the plan: `benchmark_run`; reading it back: `benchmark_collect`.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multifair.config import deep_merge, load_yaml, validate
from multifair.errors import UserError
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


def _check_method_names(cfg: BenchmarkConfig, path: Path) -> None:
    """An unknown method fails here, before any run starts (the rest of each entry's config
    is validated by its run, whose failure `collect` reports)."""
    import multifair.methods  # noqa: F401  (registers every method)
    from multifair.methods.base import METHODS

    for entry in cfg.methods:
        try:
            METHODS.get(entry.method["name"])
        except UserError as exc:
            raise UserError(f"{path}: methods: entry {entry.label!r}: {exc}") from None


def load_benchmark(path: str | Path) -> tuple[BenchmarkConfig, Path]:
    """Read and validate a benchmark config. Returns it with `base` made absolute."""
    path = Path(path)
    cfg = validate(BenchmarkConfig, load_yaml(path), source=str(path))
    _check_method_names(cfg, path)
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


def write_manifest(cfg: BenchmarkConfig, out_dir: Path) -> None:
    """The resolved config next to the runs (what `collect` and `report` read back) and the
    per-entry training configs the run commands name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_entry_configs(cfg, out_dir)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (out_dir / "benchmark.yaml").write_text(text, encoding="utf-8")
