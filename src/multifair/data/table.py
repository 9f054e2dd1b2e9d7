"""Bring-your-own table: one CSV/Parquet file (or one per split) described by a small config.

Per modality either a group of columns (numbers, booleans and categories mixed), a path
column (image or volume files) or a text column. Preprocessing is fitted on the TRAINING
split only and kept in `DataBundle.fitted` (JSON), so `build_data(cfg, splits, state=...)`
applies exactly the same transform to new data:
- numbers: missing values imputed with the training median, plus a `<col>__missing`
  indicator when the training split had missing values; then standardised (train mean/std);
- booleans ('t'/'f', 'yes'/'no', 'TRUE'/'FALSE', 1/0): 0/1, imputed with the training mode
  (+ indicator);
- categories: one-hot over the training categories (unseen or missing -> all zeros, + an
  indicator when the training split had missing values).
Before any of this, `missing_values` sentinels ("not measured" written as 0, -999, "?", ...)
become missing cells, so type inference and the statistics never see them; numeric columns
may carry a per-column transform (`log1p`, `clip` to training quantiles, `rank` to the
training CDF) applied before imputation and standardisation and stored with the rest.
Labels and attributes may be strings; group names are kept for reports.

`path: sklearn:diabetes` loads scikit-learn's bundled diabetes data (no download); see
configs/data/diabetes.yaml.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from multifair.csvcheck import check_csv_header
from multifair.data import cache, intersections
from multifair.data.bundle import (
    DataBundle,
    ModalitySpec,
    check_state,
    missing_policy,
    state_group_names,
)
from multifair.data.config import (
    SPLITS,
    AttributeColumn,
    ClassSpec,
    ColumnTransform,
    DataConfig,
    LabelSpec,
    SplitSpec,
)
from multifair.data.formats import (
    FALSE_STRINGS,
    SPLIT_FOLDERS,
    TRUE_STRINGS,
    BadFile,
    BadValue,
    NpzReader,
    label_value,
)
from multifair.data.transforms import fundus_uint8, oct_uint8
from multifair.errors import UserError

log = logging.getLogger(__name__)

SKLEARN_PREFIX = "sklearn:"
NUMERIC_SHARE = 0.9  # a column whose cells are >= 90% numbers is numeric; the rest are bad cells
RANK_KNOTS = 1001  # most knots a fitted `rank` transform keeps (its CDF is exact to ~1/1000)
_RULE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


# ---- reading ------------------------------------------------------------------------------------
def read_table(path: str) -> pd.DataFrame:
    """A CSV/TSV/Parquet file, or `sklearn:diabetes`."""
    if path.startswith(SKLEARN_PREFIX):
        name = path[len(SKLEARN_PREFIX) :]
        if name != "diabetes":
            raise UserError(f"data.path: {path!r}: only sklearn:diabetes is bundled")
        from sklearn.datasets import load_diabetes

        return load_diabetes(scaled=False, as_frame=True).frame
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data.path: {file} not found")
    suffix = file.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(file)
        sep = "\t" if suffix in (".tsv", ".tab") else ","
        check_csv_header(file, sep)
        return pd.read_csv(file, sep=sep, encoding="utf-8-sig", low_memory=False)
    except ImportError as exc:
        raise UserError(f"{file}: reading Parquet needs pyarrow ({exc})") from None
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{file}: cannot read table ({exc})") from None


def _raw_key(value: Any) -> str | None:
    """A cell as a vocabulary key: None for missing, integers without '.0', strings stripped."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    return text if text else None


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    for column in columns:
        if column not in frame.columns:
            shown = list(map(str, frame.columns))
            raise UserError(f"{source}: column {column!r} not found (columns: {shown})")


# ---- sentinel missing values ---------------------------------------------------------------------
def _as_number(value: Any) -> float | None:
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _number_or_nan(value: Any) -> float:
    """A cell as a number for sentinel matching; booleans and text are not numbers."""
    x = None if isinstance(value, (bool, np.bool_)) else _as_number(value)
    return math.nan if x is None else x


def sentinel_masks(values: pd.Series, sentinels: Sequence[str | int | float]) -> list[np.ndarray]:
    """Per sentinel, the cells equal to it: numerically when both sides are numbers (0 ==
    "0.0" == 0.0), else as text after stripping whitespace ("NA " == "NA")."""
    cells = values.tolist()
    texts = np.array([v.strip() if isinstance(v, str) else None for v in cells], dtype=object)
    numbers = np.array([_number_or_nan(v) for v in cells], dtype=np.float64)
    masks = []
    for sentinel in sentinels:
        mask = np.zeros(len(cells), dtype=bool)
        number = _as_number(sentinel)
        if number is not None:
            mask |= numbers == number
        if isinstance(sentinel, str):
            mask |= texts == sentinel.strip()
        masks.append(mask)
    return masks


def apply_missing_values(
    frame: pd.DataFrame, cfg: DataConfig
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The frame with every `missing_values` sentinel cell set to missing, and the counts
    [{column, value, cells}] (explicit per-column entries even when 0; '*' when it matched)."""
    if not cfg.missing_values:
        return frame, []
    frame = frame.copy()
    counts = []
    every = cfg.missing_values.get("*", [])
    for column in cfg.sentinel_columns():
        if column not in frame.columns:
            continue  # reported by the column check that follows
        own = cfg.missing_values.get(column, [])
        sentinels = list(dict.fromkeys([*own, *every]))
        if not sentinels:
            continue
        masks = sentinel_masks(frame[column], sentinels)
        for value, mask in zip(sentinels, masks):
            if mask.any() or value in own:
                counts.append({"column": column, "value": value, "cells": int(mask.sum())})
        frame[column] = frame[column].mask(np.logical_or.reduce(masks))
    return frame, counts


def describe_sentinel(count: Mapping[str, Any]) -> str:
    """'172 cells of chol equal 0: treated as missing'."""
    return (
        f"{count['cells']} cells of {count['column']} equal {count['value']!r}: treated as missing"
    )


# ---- label -------------------------------------------------------------------------------------
def _labels(
    frame: pd.DataFrame, spec: LabelSpec, source: str, classes: ClassSpec | None = None
) -> tuple[np.ndarray, list[str]]:
    """(N,) int64 labels (0/1, or class indices with `classes`); -2 marks a bad cell (its
    message is in the list, aligned)."""
    values = frame[spec.column].tolist()
    out = np.full(len(values), -2, dtype=np.int64)
    errors = [""] * len(values)
    where = f"column {spec.column!r}"
    rule = None
    if spec.rule is not None:
        m = _RULE.match(spec.rule)
        if m is None:
            raise UserError(f"data.label.rule: {spec.rule!r} is not '<op> <number>' (e.g. '> 0')")
        try:
            rule = (m.group(1), float(m.group(2)))
        except ValueError:
            raise UserError(
                f"data.label.rule: {m.group(2)!r} in {spec.rule!r} is not a number"
            ) from None
    positive = None if spec.positive is None else {_raw_key(v) for v in spec.positive}
    for i, value in enumerate(values):
        key = _raw_key(value)
        try:
            if key is None:
                raise BadValue(where, "label is missing (NaN/empty)")
            if classes is not None:  # multi-class: the class index
                try:
                    out[i] = classes.index(value)
                except ValueError as exc:
                    raise BadValue(where, str(exc)) from None
            elif rule is not None:
                try:
                    x = float(value)
                except (TypeError, ValueError):
                    raise BadValue(
                        where, f"{value!r} is not a number (label rule {spec.rule!r})"
                    ) from None
                if math.isnan(x):
                    raise BadValue(where, "label is NaN")
                op, thr = rule
                out[i] = int(
                    {
                        ">": x > thr,
                        ">=": x >= thr,
                        "<": x < thr,
                        "<=": x <= thr,
                        "==": x == thr,
                        "!=": x != thr,
                    }[op]
                )
            elif positive is not None:
                out[i] = int(key in positive)
            else:
                out[i] = label_value(value, where)
        except BadValue as exc:
            errors[i] = f"row {i}: {exc.where}: {exc.message}"
    return out, errors


# ---- attributes -------------------------------------------------------------------------------
def _attribute_spec(cfg: DataConfig, name: str) -> AttributeColumn:
    spec = cfg.attribute_columns.get(name, name)
    return AttributeColumn(column=spec) if isinstance(spec, str) else spec


def _bin_names(bins: Sequence[float]) -> dict[int, str]:
    edges = [f"{b:g}" for b in bins]
    names = {0: f"<{edges[0]}"}
    for i in range(1, len(edges)):
        names[i] = f"{edges[i - 1]}-{edges[i]}"
    names[len(edges)] = f">={edges[-1]}"
    return names


def fit_attribute(values: Sequence[Any], spec: AttributeColumn) -> dict[str, Any]:
    """Vocabulary of one attribute: {"vocab": {raw: code}} or bins, plus {"names": {code: name}}."""
    unknown = {_raw_key(v) for v in spec.unknown_values}
    if spec.bins is not None:
        if list(spec.bins) != sorted(spec.bins):
            raise UserError(f"data.attribute_columns.{spec.column}.bins must be ascending")
        return {"bins": list(spec.bins), "names": _bin_names(spec.bins)}
    if spec.names is not None:
        if isinstance(spec.names, list):
            pairs = [(_raw_key(v), str(v)) for v in spec.names]
        else:
            pairs = [(_raw_key(k), str(v)) for k, v in spec.names.items()]
        vocab = {raw: code for code, (raw, _) in enumerate(pairs)}
        return {"vocab": vocab, "names": {code: name for code, (_, name) in enumerate(pairs)}}
    keys = {k for k in map(_raw_key, values) if k is not None and k not in unknown}

    def order(k: str) -> tuple[int, float, str]:
        try:
            return (0, float(k), k)
        except ValueError:
            return (1, 0.0, k)

    ordered = sorted(keys, key=order)
    return {"vocab": {k: i for i, k in enumerate(ordered)}, "names": dict(enumerate(ordered))}


def _attribute_codes(
    values: Sequence[Any], spec: AttributeColumn, fitted: Mapping[str, Any]
) -> tuple[np.ndarray, list[str]]:
    unknown = {_raw_key(v) for v in spec.unknown_values}
    out = np.full(len(values), -1, dtype=np.int64)
    errors = [""] * len(values)
    for i, value in enumerate(values):
        key = _raw_key(value)
        if key is None or key in unknown:
            continue
        if "bins" in fitted:
            try:
                x = float(value)
            except (TypeError, ValueError):
                errors[i] = f"row {i}: column {spec.column!r}: {value!r} is not a number (bins)"
                continue
            out[i] = int(np.searchsorted(fitted["bins"], x, side="right"))
        elif key in fitted["vocab"]:
            out[i] = fitted["vocab"][key]
        else:
            known = sorted(fitted["vocab"])
            errors[i] = f"row {i}: column {spec.column!r}: {value!r} is not a known group {known}"
    return out, errors


# ---- splits -------------------------------------------------------------------------------------
def _split_from_column(values: Sequence[Any], spec: SplitSpec, source: str) -> np.ndarray:
    names = spec.names or {s: list(SPLIT_FOLDERS[s]) for s in SPLITS}
    lookup = {str(v).strip().lower(): s for s, vs in names.items() for v in vs}
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        key = _raw_key(value)
        split = lookup.get(key.lower()) if key is not None else None
        if split is None:
            raise UserError(
                f"{source}: column {spec.column!r} row {i}: {value!r} is not a split name "
                f"(accepted: {sorted(lookup)}; set data.split.names to map yours)"
            )
        out[i] = split
    return out


def stratified_split(labels: np.ndarray, groups: np.ndarray, spec: SplitSpec) -> np.ndarray:
    """Seeded split stratified by (label, group): each stratum is cut by the fractions."""
    rng = np.random.default_rng(spec.seed)
    out = np.empty(len(labels), dtype=object)
    order = [s for s in SPLITS if s in spec.fractions]
    cum = np.cumsum([spec.fractions[s] for s in order])
    for stratum in sorted(set(zip(labels.tolist(), groups.tolist()))):
        rows = np.flatnonzero((labels == stratum[0]) & (groups == stratum[1]))
        rows = rows[rng.permutation(len(rows))]
        cuts = np.round(cum * len(rows)).astype(int)
        start = 0
        for split, stop in zip(order, cuts):
            out[rows[start:stop]] = split
            start = stop
    return out


# ---- features ------------------------------------------------------------------------------------
def _column_type(values: pd.Series, forced_categorical: bool) -> str:
    if forced_categorical:
        return "categorical"
    if pd.api.types.is_bool_dtype(values):
        return "boolean"
    if pd.api.types.is_numeric_dtype(values):
        return "numeric"
    present = [str(v).strip().lower() for v in values if _raw_key(v) is not None]
    if present and all(v in TRUE_STRINGS | FALSE_STRINGS for v in present):
        return "boolean"
    # mostly numbers: a numeric column with a few bad cells (reported per row), not categories
    if (
        present
        and pd.to_numeric(pd.Series(present), errors="coerce").notna().mean() >= NUMERIC_SHARE
    ):
        return "numeric"
    return "categorical"


def column_types(frame: pd.DataFrame, spec: Any) -> dict[str, str]:
    """numeric / boolean / categorical per column of a tabular modality (structure only: read
    from the whole table, no statistics)."""
    return {c: _column_type(frame[c], c in spec.categorical) for c in spec.columns}


def cell_errors(
    frame: pd.DataFrame, types: dict[str, str], transforms: Mapping[str, str] | None = None
) -> list[str]:
    """Per row, the first cell that does not parse as its column's type, or lies outside its
    transform's domain (log1p: > -1) ("" = fine)."""
    errors = [""] * len(frame)
    for column, kind in types.items():
        if kind == "categorical":
            continue
        x, errs = (_as_float if kind == "numeric" else _as_bool)(frame[column], column)
        if (transforms or {}).get(column) == "log1p":
            for i in np.flatnonzero(x <= -1.0):
                errs[i] = errs[i] or f"row {i}: column {column!r}: {x[i]:g} is not > -1 (log1p)"
        for i, e in enumerate(errs):
            if e and not errors[i]:
                errors[i] = e
    return errors


def check_transforms(
    modality: str, types: Mapping[str, str], transforms: Mapping[str, str]
) -> None:
    """Transforms are for numeric columns: anything else is a config error naming the key."""
    for column, kind in transforms.items():
        if types[column] != "numeric":
            raise UserError(
                f"data.columns.{modality}.transforms.{column}: {kind} needs a numeric column; "
                f"{column!r} reads as {types[column]}"
            )


def fit_transform(observed: np.ndarray, spec: ColumnTransform, column: str) -> dict[str, Any]:
    """The fitted form of one column transform, from the training rows' observed values."""
    if spec.kind == "log1p":
        return {"kind": "log1p"}
    if observed.size == 0:
        raise UserError(
            f"column {column!r} has no observed value in the training rows; cannot fit {spec.kind}"
        )
    if spec.kind == "clip":
        assert spec.quantiles is not None
        low, high = np.quantile(observed, spec.quantiles)
        return {
            "kind": "clip",
            "quantiles": list(spec.quantiles),
            "low": float(low),
            "high": float(high),
        }
    # rank: mid-rank empirical CDF at the distinct values, thinned to RANK_KNOTS knots
    values, counts = np.unique(observed, return_counts=True)
    cdf = (np.cumsum(counts) - counts / 2.0) / observed.size
    keep = np.unique(np.round(np.linspace(0, len(values) - 1, RANK_KNOTS)).astype(np.int64))
    return {"kind": "rank", "x": values[keep].tolist(), "cdf": cdf[keep].tolist()}


def apply_transform(x: np.ndarray, fitted: Mapping[str, Any]) -> np.ndarray:
    """A fitted column transform on float64 values; NaN (missing) stays NaN."""
    if fitted["kind"] == "log1p":
        return np.log1p(x)
    if fitted["kind"] == "clip":
        return np.clip(x, fitted["low"], fitted["high"])
    # outside the training range np.interp holds the end values
    return np.where(np.isnan(x), np.nan, np.interp(x, fitted["x"], fitted["cdf"]))


def _as_float(values: pd.Series, column: str) -> tuple[np.ndarray, list[str]]:
    """Numbers as float64 with NaN for missing; non-numeric cells are errors (per row)."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    errors = [""] * len(values)
    for i, (raw, x) in enumerate(zip(values.tolist(), numbers)):
        if math.isnan(x) and _raw_key(raw) is not None and str(raw).strip().lower() != "nan":
            errors[i] = f"row {i}: column {column!r}: {raw!r} is not a number"
        if math.isinf(x):
            errors[i] = f"row {i}: column {column!r}: {raw!r} is not finite"
    return numbers, errors


def _as_bool(values: pd.Series, column: str) -> tuple[np.ndarray, list[str]]:
    out = np.full(len(values), np.nan)
    errors = [""] * len(values)
    for i, raw in enumerate(values.tolist()):
        key = _raw_key(raw)
        if key is None:
            continue
        text = key.lower()
        if text in TRUE_STRINGS or text == "true":
            out[i] = 1.0
        elif text in FALSE_STRINGS or text == "false":
            out[i] = 0.0
        else:
            errors[i] = (
                f"row {i}: column {column!r}: {raw!r} is not a boolean (t/f, yes/no, true/false, 1/0)"
            )
    return out, errors


def fit_features(
    frame: pd.DataFrame,
    types: dict[str, str],
    transforms: Mapping[str, ColumnTransform] | None = None,
) -> list[dict[str, Any]]:
    """Per-column transforms fitted on the training rows `frame` (bad cells already removed).
    A numeric column's `transforms` entry is fitted first; its median, mean and std are then
    those of the transformed values."""
    fitted = []
    for column, kind in types.items():
        values = frame[column]
        entry: dict[str, Any] = {"column": column, "type": kind}
        if kind == "categorical":
            keys = [_raw_key(v) for v in values]
            entry["categories"] = sorted({k for k in keys if k is not None})
            entry["indicator"] = any(k is None for k in keys)
        else:
            x, _ = (_as_float if kind == "numeric" else _as_bool)(values, column)
            observed = x[~np.isnan(x)]
            entry["indicator"] = bool(np.isnan(x).any())
            spec = (transforms or {}).get(column)
            if spec is not None:
                entry["transform"] = fit_transform(observed, spec, column)
                observed = apply_transform(observed, entry["transform"])
            if kind == "numeric":
                fill = float(np.median(observed)) if observed.size else 0.0
                mean = float(observed.mean()) if observed.size else 0.0
                std = float(observed.std()) if observed.size else 1.0
                entry.update(fill=fill, mean=mean, std=std if std > 1e-12 else 1.0)
            else:
                entry["fill"] = float(observed.mean() >= 0.5) if observed.size else 0.0
        fitted.append(entry)
    return fitted


def feature_names(fitted: Sequence[Mapping[str, Any]]) -> list[str]:
    names = []
    for entry in fitted:
        col = entry["column"]
        if entry["type"] == "categorical":
            names.extend(f"{col}={c}" for c in entry["categories"])
        else:
            names.append(col)
        if entry["indicator"]:
            names.append(f"{col}__missing")
    return names


def transform_features(
    frame: pd.DataFrame, fitted: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, list[str]]:
    """(N, F) float32 features and per-row error messages ("" = fine)."""
    blocks: list[np.ndarray] = []
    errors = [""] * len(frame)
    for entry in fitted:
        col = entry["column"]
        values = frame[col]
        if entry["type"] == "categorical":
            keys = [_raw_key(v) for v in values]
            cats = {c: j for j, c in enumerate(entry["categories"])}
            block = np.zeros((len(frame), len(cats)), dtype=np.float32)
            for i, k in enumerate(keys):
                if k in cats:
                    block[i, cats[k]] = 1.0
            blocks.append(block)
            missing = np.array([k is None for k in keys])
        else:
            x, errs = (_as_float if entry["type"] == "numeric" else _as_bool)(values, col)
            for i, e in enumerate(errs):
                if e and not errors[i]:
                    errors[i] = e
            missing = np.isnan(x)
            if "transform" in entry:
                x = apply_transform(x, entry["transform"])
            x = np.where(missing, entry["fill"], x)
            if entry["type"] == "numeric":
                x = (x - entry["mean"]) / entry["std"]
            blocks.append(x.astype(np.float32)[:, None])
        if entry["indicator"]:
            blocks.append(missing.astype(np.float32)[:, None])
    return np.concatenate(blocks, axis=1), errors


# ---- dataset ------------------------------------------------------------------------------------
class PathReader:
    """One image/volume modality decoded from its files into the uint8 tensor the model reads:
    fundus-style (C, S, S) for images, (K, S, S) for volumes. The slow path the cache replaces
    (and what `prepare_image_cache` runs, through `load_modalities`)."""

    def __init__(
        self,
        modality: str,
        kind: str,
        paths: Sequence[str | None],
        key: str | None,
        image_size: int,
        oct_slices: int,
    ) -> None:
        self.modality = modality
        self.kind = kind
        self.paths = list(paths)
        self.key = key
        self.image_size = image_size
        self.oct_slices = oct_slices

    def __len__(self) -> int:
        return len(self.paths)

    # shape of the zeros a row without a file gets (the model leaves it out: `present`)
    placeholder: tuple[int, ...] | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        if path is None:
            assert self.placeholder is not None, "set PathReader.placeholder for absent rows"
            return torch.zeros(self.placeholder, dtype=torch.uint8)
        arr = read_array(path, self.key)
        try:
            if self.kind == "image":
                return fundus_uint8(arr, self.image_size, self.key or "pixels")
            return oct_uint8(arr, self.oct_slices, self.image_size, self.key or "volume")
        except BadValue as exc:
            raise BadFile(path, exc.where, exc.message) from None

    def load_modalities(self, index: int) -> dict[str, torch.Tensor]:
        """The cache writer's interface: {modality: uint8 tensor}."""
        return {self.modality: self[index]}


class MappedRows:
    """One modality read from the memory-mapped cache: sample i is row `rows[i]` of a
    (N, C|K, S, S) uint8 array. The map is opened lazily in each process (DataLoader workers
    included), so the dataset pickles cheaply."""

    def __init__(self, path: Path, rows: np.ndarray) -> None:
        self.path = Path(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._map: np.ndarray | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None, "_pid": -1}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._pid != os.getpid():
            self._map, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        assert self._map is not None
        row = self.rows[index]
        if row < 0:  # the sample lacks this modality: placeholder zeros (`present` is False)
            return torch.zeros(self._map.shape[1:], dtype=torch.uint8)
        return torch.from_numpy(np.array(self._map[row]))


class TableDataset(Dataset):
    """Rows of a table as sample dicts: tabular modalities are precomputed float32 rows;
    image/volume modalities come from `images` (decoded from their files, or cached); text
    as is."""

    def __init__(
        self,
        sample_ids: list[str],
        labels: np.ndarray,
        codes: dict[str, np.ndarray],
        train_attribute: str,
        tabular: dict[str, np.ndarray],
        images: dict[str, PathReader | MappedRows],
        texts: dict[str, list[str]],
        order: Sequence[str],
        present: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.present = present or {}  # modality -> (N,) bool, only modalities with an absence
        self.sample_ids = sample_ids
        self.labels = labels
        self.codes = codes
        self.train_attribute = train_attribute
        self.tabular = {m: torch.from_numpy(np.ascontiguousarray(x)) for m, x in tabular.items()}
        self.images = images
        self.texts = texts
        self.order = list(order)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        for m in self.order:
            if m in self.tabular:
                sample[m] = self.tabular[m][index]
            elif m in self.texts:
                sample[m] = self.texts[m][index]
            else:
                sample[m] = self.images[m][index]
        codes = {a: int(c[index]) for a, c in self.codes.items()}
        if self.present:
            sample["present"] = {m: bool(p[index]) for m, p in self.present.items()}
        sample.update(
            label=int(self.labels[index]),
            group=codes[self.train_attribute],
            attributes=codes,
            sample_id=self.sample_ids[index],
            index=index,
        )
        return sample


def read_array(path: str, key: str | None) -> np.ndarray:
    """An image/volume file named in a path column: .npz (array `key`), .npy, .png/.jpg."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        with NpzReader(path) as z:
            if key is None:
                if len(z.keys) != 1:
                    raise BadFile(
                        path, None, f"several arrays {z.keys}; set `key` for this modality"
                    )
                key = z.keys[0]
            return z.array(key)
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise BadFile(path, None, "file not found") from None
        except (OSError, ValueError, EOFError) as exc:
            raise BadFile(path, None, f"unreadable .npy ({exc})") from None
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        raise BadFile(path, None, "reading images needs pillow") from None
    try:
        with Image.open(path) as img:
            return np.array(img.convert("L") if img.mode not in ("L", "RGB") else img)
    except FileNotFoundError:
        raise BadFile(path, None, "file not found") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise BadFile(path, None, f"unreadable image ({exc})") from None


# ---- image/volume path columns and their cache -------------------------------------------------
def resolve_paths(
    values: Sequence[Any], column: str, base: Path, allow_missing: bool = False
) -> tuple[list[str | None], list[str]]:
    """The file each row's path cell names (relative paths: from the table's folder); an empty
    cell is None and a row error. With `allow_missing` (a missing modality is allowed) an
    empty cell or a file that does not exist is None without an error: the row lacks it - a
    logged warning counts the files named but absent, and when NONE of the named files exists
    (a wrong folder, not missing scans) it is an error."""
    files: list[str | None] = []
    errors = [""] * len(values)
    named, absent = 0, []
    for i, raw in enumerate(values):
        key = _raw_key(raw)
        if key is None:
            if not allow_missing:
                errors[i] = f"row {i}: column {column!r}: empty path"
            files.append(None)
            continue
        path = Path(key)
        path = path if path.is_absolute() else base / path
        named += 1
        if allow_missing and not path.exists():
            absent.append(path)
            files.append(None)
        else:
            files.append(str(path))
    if absent and len(absent) == named:
        raise UserError(
            f"column {column!r}: none of the {named} files it names exists (first: {absent[0]}); "
            f"relative paths are read from the table's folder {base}"
        )
    if absent:
        log.warning(
            "column %r: %d of %d files it names do not exist (first: %s): those rows lack the "
            "modality",
            column, len(absent), named, absent[0],
        )  # fmt: skip
    return files, errors


def tabular_absent(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """(N,) bool: rows where every column of a tabular modality is missing (NaN, empty, a
    sentinel already turned missing) - the modality was not measured for that sample."""
    absent = np.ones(len(frame), dtype=bool)
    for column in columns:
        absent &= np.array([_raw_key(v) is None for v in frame[column].tolist()], dtype=bool)
    return absent


def unique_files(files: Sequence[str | None]) -> list[str]:
    """The cache's rows for one modality: each named file once, sorted (several table rows may
    name one file, and reordering the table does not invalidate the cache)."""
    return sorted({f for f in files if f is not None})


def image_cache_settings(cfg: DataConfig) -> dict[str, Any]:
    """Everything that changes a table's cached tensors (all its image/volume modalities are
    cached, so any `modalities` subset can use the cache)."""
    return {
        "format": cache.FORMAT_VERSION,
        "kind": "table",
        "image_size": cfg.image_size,
        "oct_slices": cfg.oct_slices,
        "modalities": {
            m: [mod.kind, mod.key]
            for m, mod in cfg.columns.items()
            if mod.kind in ("image", "volume")
        },
    }


def find_image_cache(
    cfg: DataConfig, base: Path, files: Mapping[str, Sequence[str | None]]
) -> dict[str, cache.OpenStore] | None:
    """The verified cache of these modalities' files (`data.cache`, or TABLE_FOLDER/
    .multifair_cache when it holds a valid one), or None to decode the files."""
    stores = cache.find_stores(
        cfg.cache,
        base / cache.DEFAULT_DIRNAME,
        image_cache_settings(cfg),
        lambda: {m: cache.fingerprint_files(base, unique_files(f)) for m, f in files.items()},
        prepare="multifair data prepare CONFIG [CACHE]",
    )
    if stores is not None:
        log.info(
            "reading %s from the cache under %s",
            sorted(files),
            cfg.cache or base / cache.DEFAULT_DIRNAME,
        )
    return stores


def _cached_bad_rows(
    store: cache.OpenStore, files: Sequence[str | None], column: str, base: Path
) -> list[str]:
    """Row errors for the files `data prepare --skip-bad` recorded as bad."""
    problems = {}
    for bad in store.bad:
        problems[bad["file"]] = problems[str(base / bad["file"])] = bad["problem"]
    bad_files = set(np.asarray(unique_files(files), dtype=object)[store.flags == 2].tolist())
    return [
        f"row {i}: column {column!r}: {f}: {problems.get(f, 'recorded as bad by data prepare')}"
        if f in bad_files
        else ""
        for i, f in enumerate(files)
    ]


def prepare_image_cache(
    cfg: DataConfig, cache_base: Path | None = None, workers: int = 0, progress: bool = True
) -> dict[str, Any]:
    """`multifair data prepare CONFIG` for a table: decode every file its image/volume path
    columns name into the memory-mapped uint8 cache (default TABLE_FOLDER/.multifair_cache),
    resumably. Bad files raise unless `skip_bad` (then they are recorded)."""
    frame, _, source, base = _frames(cfg, SPLITS)
    modalities = [m for m, mod in cfg.columns.items() if mod.kind in ("image", "volume")]
    if not modalities:
        raise UserError(f"data prepare: {source} has no image or volume path column to cache")
    _require_columns(frame, [cfg.columns[m].column for m in modalities], source)  # type: ignore[misc]
    stores = []
    for m in modalities:
        mod = cfg.columns[m]
        # an empty cell or absent file is a missing modality (not cached) unless `impute`
        allow_missing = cfg.absent_is_missing
        files, _ = resolve_paths(frame[mod.column].tolist(), str(mod.column), base, allow_missing)
        reader = PathReader(m, mod.kind, unique_files(files), mod.key, cfg.image_size, cfg.oct_slices)  # fmt: skip
        shape = _stored_shape(reader, cfg.skip_bad, source)
        stores.append(cache.RowStore(m, cache.fingerprint_files(base, reader.paths), {m: shape}, reader))  # fmt: skip
    target = Path(cache_base) if cache_base is not None else base / cache.DEFAULT_DIRNAME
    return cache.prepare_stores(
        target, image_cache_settings(cfg), stores, cfg.skip_bad, workers, progress
    )


def _stored_shape(reader: PathReader, skip_bad: bool, source: str) -> list[int]:
    """Per-row shape of a modality's cached array: (K, S, S) for volumes; for images the
    channels of the first readable file (1 gray, 3 colour)."""
    size = reader.image_size
    if reader.kind == "volume":
        return [reader.oct_slices, size, size]
    for i in range(len(reader)):
        try:
            return list(reader[i].shape)
        except BadFile:
            if not skip_bad:
                raise
    raise UserError(f"{source}: no readable file in the {reader.modality} path column")


# ---- build ------------------------------------------------------------------------------------
def _frames(
    cfg: DataConfig, splits: Sequence[str]
) -> tuple[pd.DataFrame, np.ndarray | None, str, Path]:
    """The whole table, the split per row when files are per split, the source name, its folder."""
    if isinstance(cfg.path, dict):
        bad = set(cfg.path) - set(SPLITS)
        if bad:
            raise UserError(f"data.path: unknown split(s) {sorted(bad)}; use {list(SPLITS)}")
        parts, names = [], []
        for split in SPLITS:
            if split in cfg.path:
                frame = read_table(cfg.path[split])
                parts.append(frame)
                names.extend([split] * len(frame))
        base = Path(next(iter(cfg.path.values()))).parent
        return (
            pd.concat(parts, ignore_index=True),
            np.array(names, dtype=object),
            str(cfg.path),
            base,
        )
    assert isinstance(cfg.path, str)
    base = Path(cfg.path).parent if not cfg.path.startswith(SKLEARN_PREFIX) else Path(".")
    return read_table(cfg.path), None, cfg.path, base


def build(
    cfg: DataConfig, splits: Sequence[str], state: Mapping[str, Any] | None = None
) -> DataBundle:
    """Load, split, fit (on train, unless `state` brings a fitted transform) and wrap a table."""
    frame, file_splits, source, base = _frames(cfg, splits)
    frame, sentinels = apply_missing_values(frame, cfg)
    if sentinels:
        cells = sum(count["cells"] for count in sentinels)
        log.info("%s: %d sentinel cell(s) treated as missing (data inspect lists them)", source, cells)  # fmt: skip
    label_spec = cfg.label_spec()
    order = list(cfg.columns) if cfg.modalities is None else list(dict.fromkeys(cfg.modalities))
    unknown_modalities = [m for m in order if m not in cfg.columns]
    if unknown_modalities:
        raise UserError(
            f"data.modalities: {unknown_modalities} not in data.columns {list(cfg.columns)}"
        )
    chosen = list(cfg.attributes) if cfg.attributes is not None else list(cfg.attribute_columns)
    attributes = intersections.evaluated(cfg.attribute, chosen)
    intersections.check_parts(
        cfg.attribute, cfg.attributes, list(cfg.attribute_columns), also=set(frame.columns)
    )
    base_attributes = intersections.base_attributes(attributes)  # the single ones, read below
    specs = {a: _attribute_spec(cfg, a) for a in base_attributes}
    needed = [s.column for s in specs.values()]
    for m in order:
        mod = cfg.columns[m]
        needed += mod.columns if mod.kind == "tabular" else [mod.column]  # type: ignore[list-item]
    if cfg.id_column:
        needed.append(cfg.id_column)
    if cfg.split.column and file_splits is None and "all" not in splits:
        needed.append(cfg.split.column)
    _require_columns(frame, needed, source)
    has_label = label_spec.column in frame.columns
    if not has_label and state is None:
        _require_columns(frame, [label_spec.column], source)

    # labels and attribute codes for every row; bad rows collected (skipped only if asked)
    row_errors: list[str] = [""] * len(frame)

    def merge(errors: list[str]) -> None:
        for i, e in enumerate(errors):
            if e and not row_errors[i]:
                row_errors[i] = e

    if has_label:
        labels, errs = _labels(frame, label_spec, source, cfg.class_spec())
        merge(errs)
    else:  # predicting on new, unlabelled data with a saved state
        labels = np.full(len(frame), -1, dtype=np.int64)
    if state is not None:
        check_state(state, "table")
        fitted_all = state["fitted"]
        group_names = state_group_names(state)
        missing = [a for a in base_attributes if a not in fitted_all["attributes"]]
        if missing:
            raise UserError(f"data state has no fitted attribute(s) {missing}")
    else:
        fitted_all = {"attributes": {}, "features": {}}
        for a in base_attributes:
            fitted_all["attributes"][a] = fit_attribute(frame[specs[a].column].tolist(), specs[a])
        group_names = {}
    codes: dict[str, np.ndarray] = {}
    for a in base_attributes:
        fa = fitted_all["attributes"][a]
        codes[a], errs = _attribute_codes(frame[specs[a].column].tolist(), specs[a], fa)
        merge(errs)
        group_names[a] = {int(k): str(v) for k, v in fa["names"].items()}

    # column types (from the state when predicting) and cells that do not parse
    tabular_mods = [m for m in order if cfg.columns[m].kind == "tabular"]
    types: dict[str, dict[str, str]] = {}
    for m in tabular_mods:
        if state is not None:
            if m not in fitted_all["features"]:
                raise UserError(f"data state has no fitted features for modality {m!r}")
            entries = fitted_all["features"][m]
            types[m] = {e["column"]: e["type"] for e in entries}
            transforms = {e["column"]: e["transform"]["kind"] for e in entries if "transform" in e}
            _require_columns(frame, list(types[m]), source)
        else:
            types[m] = column_types(frame, cfg.columns[m])
            transforms = {c: t.kind for c, t in cfg.columns[m].transforms.items()}
            check_transforms(m, types[m], transforms)
        merge(cell_errors(frame, types[m], transforms))

    # image/volume path columns: the file of each row, read from the cache when it holds them
    image_mods = [m for m in order if cfg.columns[m].kind in ("image", "volume")]
    files: dict[str, list[str | None]] = {}
    allow_missing = cfg.absent_is_missing  # impute: an empty path stays a bad row
    for m in image_mods:
        files[m], errs = resolve_paths(frame[cfg.columns[m].column].tolist(), cfg.columns[m].column, base, allow_missing)  # fmt: skip
        merge(errs)
    stores = find_image_cache(cfg, base, files) if image_mods else None
    if stores is not None:
        for m in image_mods:
            merge(_cached_bad_rows(stores[m], files[m], cfg.columns[m].column, base))

    # split assignment (stratified by every combination of an intersection, before any merge)
    train_groups = intersections.raw_codes(cfg.attribute, codes)
    if "all" in splits:
        if len(splits) != 1:
            raise UserError("split 'all' cannot be combined with other splits")
        assignment = np.array(["all"] * len(frame), dtype=object)
    elif file_splits is not None:
        assignment = file_splits
    elif cfg.split.column:
        assignment = _split_from_column(frame[cfg.split.column].tolist(), cfg.split, source)
    else:
        assignment = stratified_split(labels, train_groups, cfg.split)

    bad = np.array([bool(e) for e in row_errors])
    skipped: list[dict[str, Any]] = []
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        if not cfg.skip_bad:
            raise UserError(f"{source}: {row_errors[first]}")
        skipped = [{"file": source, "key": None, "problem": e} for e in row_errors if e]
        log.warning(
            "%s: skipped %d bad row(s) (first: %s)", source, len(skipped), row_errors[first]
        )
    unknown = train_groups == -1
    if cfg.unknown == "error" and (unknown & ~bad).any():
        first = int(np.flatnonzero(unknown & ~bad)[0])
        raise UserError(
            f"{source}: row {first}: {cfg.attribute} is missing/unknown; set data.unknown to keep or drop"
        )
    keep = ~bad & (~unknown if cfg.unknown == "drop" else True)

    # missing modalities: which rows have each modality (data.missing_modalities)
    present_all: dict[str, np.ndarray] = {}
    for m in order:
        mod = cfg.columns[m]
        if mod.kind in ("image", "volume"):
            absent = np.array([f is None for f in files[m]], dtype=bool)
        elif not cfg.absent_is_missing:
            absent = np.zeros(len(frame), dtype=bool)  # median cells / "" text fed as data
        elif mod.kind == "tabular":
            absent = tabular_absent(frame, mod.columns)  # type: ignore[arg-type]
        else:  # text
            absent = np.array([_raw_key(v) is None for v in frame[mod.column].tolist()])
        present_all[m] = ~absent
    dropped: dict[str, int] = {}
    for split in sorted(set(assignment[keep].tolist())):
        rows = np.flatnonzero(keep & (assignment == split))
        ok, dropped[split] = missing_policy(
            {m: p[rows] for m, p in present_all.items()},
            cfg.missing_modalities,
            lambda i, rows=rows: f"row {int(rows[i])}",
            source,
            split,
        )
        keep[rows[~ok]] = False

    # fit features on the (good) training rows only
    if state is None:
        train_rows = keep & (assignment == "train")
        if not train_rows.any():
            raise UserError(f"{source}: the train split is empty; cannot fit preprocessing")
        train_frame = frame.loc[train_rows]
        for m in tabular_mods:
            fitted_all["features"][m] = fit_features(
                train_frame, types[m], cfg.columns[m].transforms
            )

    # intersections: groups from the training rows' sizes (or the saved state), every split alike
    train_rows = keep & (assignment == "train")
    train_codes = (
        {"train": {a: c[train_rows] for a, c in codes.items()}} if train_rows.any() else {}
    )
    fitted_groups = intersections.build(
        attributes,
        train_codes,
        group_names,
        cfg.min_group_size,
        saved=(state or {}).get("intersections"),
    )
    for a, fitted_group in fitted_groups.items():
        codes[a] = intersections.apply(fitted_group, codes)
        group_names[a] = intersections.names(fitted_group)

    ids_all = (
        [str(v) for v in frame[cfg.id_column].tolist()]
        if cfg.id_column
        else [f"row_{i:05d}" for i in range(len(frame))]
    )
    # the shape of an absent image/volume's placeholder: that of a present file's tensor
    placeholders: dict[str, tuple[int, ...] | None] = {}
    for m in image_mods:
        mod = cfg.columns[m]
        first = next((files[m][i] for i in np.flatnonzero(keep) if files[m][i] is not None), None)
        if first is None:
            raise UserError(f"{source}: no row has a file in column {mod.column!r} ({m})")
        probe = PathReader(m, mod.kind, [first], mod.key, cfg.image_size, cfg.oct_slices)
        placeholders[m] = (
            tuple(probe[0].shape)
            if stores is None
            else tuple(np.load(stores[m].arrays[m], mmap_mode="r").shape[1:])
        )
    absent_counts: dict[str, dict[str, int]] = {}
    datasets: dict[str, Dataset] = {}
    for split in splits:
        rows = np.flatnonzero(keep & (assignment == split))
        if rows.size == 0:
            raise UserError(f"{source}: the {split} split is empty")
        part = frame.iloc[rows]
        tabular = {}
        for m in tabular_mods:
            x, errs = transform_features(part, fitted_all["features"][m])
            assert not any(errs), "bad cells are removed before the split"
            tabular[m] = x
        images: dict[str, PathReader | MappedRows] = {}
        texts = {}
        for m in order:
            mod = cfg.columns[m]
            if mod.kind in ("image", "volume"):
                split_files = [files[m][i] for i in rows]
                if stores is None:
                    reader = PathReader(m, mod.kind, split_files, mod.key, cfg.image_size, cfg.oct_slices)  # fmt: skip
                    reader.placeholder = placeholders[m]
                    images[m] = reader
                else:
                    at = {f: r for r, f in enumerate(unique_files(files[m]))}
                    images[m] = MappedRows(
                        stores[m].arrays[m],
                        np.array([-1 if f is None else at[f] for f in split_files]),
                    )
            elif mod.kind == "text":
                texts[m] = [
                    "" if _raw_key(v) is None else str(v) for v in part[mod.column].tolist()
                ]
        datasets[split] = TableDataset(
            [ids_all[i] for i in rows],
            labels[rows],
            {a: codes[a][rows] for a in attributes},
            cfg.attribute,
            tabular,
            images,
            texts,
            order,
            present={m: p[rows] for m, p in present_all.items() if not p[rows].all()},
        )
        absent_counts[split] = {m: int((~present_all[m][rows]).sum()) for m in order}
    modalities: dict[str, ModalitySpec] = {}
    s = cfg.image_size
    for m in order:
        mod = cfg.columns[m]
        if mod.kind == "tabular":
            names = feature_names(fitted_all["features"][m])
            modalities[m] = ModalitySpec(
                m, "tabular", (len(names),), len(names), (len(names),), "float32", tuple(names)
            )
        elif mod.kind == "image":
            c = int(placeholders[m][0])  # type: ignore[index]
            modalities[m] = ModalitySpec(
                m, "image", (cfg.channels, s, s), cfg.channels, (c, s, s), "uint8"
            )
        elif mod.kind == "volume":
            k = cfg.oct_slices
            modalities[m] = ModalitySpec(m, "volume", (k, s, s), k, (k, s, s), "uint8")
        else:
            modalities[m] = ModalitySpec(m, "text", (), 0, (), "str")
    for a in base_attributes:
        fitted_all["attributes"][a]["names"] = {str(k): v for k, v in group_names[a].items()}
    return DataBundle(
        config=cfg,
        datasets=datasets,
        modalities=modalities,
        attributes=attributes,
        group_names={a: group_names[a] for a in attributes},
        train_attribute=cfg.attribute,
        source="table" if stores is None else "cache",
        skipped=skipped,
        fitted=fitted_all,
        intersections=fitted_groups,
        missing={
            "policy": cfg.missing_modalities,
            "absent": absent_counts,
            "dropped": {k: v for k, v in dropped.items() if k in splits},
        },
    )
