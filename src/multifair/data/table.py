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
Labels and attributes may be strings; group names are kept for reports.

`path: sklearn:diabetes` loads scikit-learn's bundled diabetes data (no download); see
configs/data/diabetes.yaml.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from multifair.csvcheck import check_csv_header
from multifair.data.bundle import DataBundle, ModalitySpec, check_state, state_group_names
from multifair.data.config import SPLITS, AttributeColumn, DataConfig, LabelSpec, SplitSpec
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


# ---- label -------------------------------------------------------------------------------------
def _labels(frame: pd.DataFrame, spec: LabelSpec, source: str) -> tuple[np.ndarray, list[str]]:
    """(N,) int64 labels; -2 marks a bad cell (its message is in the list, aligned)."""
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
            if rule is not None:
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


def cell_errors(frame: pd.DataFrame, types: dict[str, str]) -> list[str]:
    """Per row, the first cell that does not parse as its column's type ("" = fine)."""
    errors = [""] * len(frame)
    for column, kind in types.items():
        if kind == "categorical":
            continue
        _, errs = (_as_float if kind == "numeric" else _as_bool)(frame[column], column)
        for i, e in enumerate(errs):
            if e and not errors[i]:
                errors[i] = e
    return errors


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


def fit_features(frame: pd.DataFrame, types: dict[str, str]) -> list[dict[str, Any]]:
    """Per-column transforms fitted on the training rows `frame` (bad cells already removed)."""
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
            x = np.where(missing, entry["fill"], x)
            if entry["type"] == "numeric":
                x = (x - entry["mean"]) / entry["std"]
            blocks.append(x.astype(np.float32)[:, None])
        if entry["indicator"]:
            blocks.append(missing.astype(np.float32)[:, None])
    return np.concatenate(blocks, axis=1), errors


# ---- dataset ------------------------------------------------------------------------------------
class TableDataset(Dataset):
    """Rows of a table as sample dicts: tabular modalities are precomputed float32 rows;
    image/volume modalities are read from their path column on access; text as is."""

    def __init__(
        self,
        sample_ids: list[str],
        labels: np.ndarray,
        codes: dict[str, np.ndarray],
        train_attribute: str,
        tabular: dict[str, np.ndarray],
        paths: dict[str, tuple[str, list[str], str | None]],
        texts: dict[str, list[str]],
        order: Sequence[str],
        image_size: int,
        oct_slices: int,
    ) -> None:
        self.sample_ids = sample_ids
        self.labels = labels
        self.codes = codes
        self.train_attribute = train_attribute
        self.tabular = {m: torch.from_numpy(np.ascontiguousarray(x)) for m, x in tabular.items()}
        self.paths = paths  # modality -> (kind, paths, npz key)
        self.texts = texts
        self.order = list(order)
        self.image_size = image_size
        self.oct_slices = oct_slices

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _read(self, modality: str, index: int) -> torch.Tensor:
        kind, paths, key = self.paths[modality]
        path = paths[index]
        arr = read_array(path, key)
        try:
            if kind == "image":
                return fundus_uint8(arr, self.image_size, key or "pixels")
            return oct_uint8(arr, self.oct_slices, self.image_size, key or "volume")
        except BadValue as exc:
            raise BadFile(path, exc.where, exc.message) from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        for m in self.order:
            if m in self.tabular:
                sample[m] = self.tabular[m][index]
            elif m in self.texts:
                sample[m] = self.texts[m][index]
            else:
                sample[m] = self._read(m, index)
        codes = {a: int(c[index]) for a, c in self.codes.items()}
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
            return np.asarray(img.convert("L") if img.mode not in ("L", "RGB") else img)
    except FileNotFoundError:
        raise BadFile(path, None, "file not found") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise BadFile(path, None, f"unreadable image ({exc})") from None


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
    label_spec = cfg.label_spec()
    order = list(cfg.columns) if cfg.modalities is None else list(dict.fromkeys(cfg.modalities))
    unknown_modalities = [m for m in order if m not in cfg.columns]
    if unknown_modalities:
        raise UserError(
            f"data.modalities: {unknown_modalities} not in data.columns {list(cfg.columns)}"
        )
    attributes = list(cfg.attributes) if cfg.attributes is not None else list(cfg.attribute_columns)
    if cfg.attribute not in attributes:
        attributes.insert(0, cfg.attribute)
    specs = {a: _attribute_spec(cfg, a) for a in attributes}
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
        labels, errs = _labels(frame, label_spec, source)
        merge(errs)
    else:  # predicting on new, unlabelled data with a saved state
        labels = np.full(len(frame), -1, dtype=np.int64)
    if state is not None:
        check_state(state, "table")
        fitted_all = state["fitted"]
        group_names = state_group_names(state)
        missing = [a for a in attributes if a not in fitted_all["attributes"]]
        if missing:
            raise UserError(f"data state has no fitted attribute(s) {missing}")
    else:
        fitted_all = {"attributes": {}, "features": {}}
        for a in attributes:
            fitted_all["attributes"][a] = fit_attribute(frame[specs[a].column].tolist(), specs[a])
        group_names = {}
    codes: dict[str, np.ndarray] = {}
    for a in attributes:
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
            types[m] = {e["column"]: e["type"] for e in fitted_all["features"][m]}
            _require_columns(frame, list(types[m]), source)
        else:
            types[m] = column_types(frame, cfg.columns[m])
        merge(cell_errors(frame, types[m]))

    # split assignment
    if "all" in splits:
        if len(splits) != 1:
            raise UserError("split 'all' cannot be combined with other splits")
        assignment = np.array(["all"] * len(frame), dtype=object)
    elif file_splits is not None:
        assignment = file_splits
    elif cfg.split.column:
        assignment = _split_from_column(frame[cfg.split.column].tolist(), cfg.split, source)
    else:
        assignment = stratified_split(labels, codes[cfg.attribute], cfg.split)

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
    unknown = codes[cfg.attribute] == -1
    if cfg.unknown == "error" and (unknown & ~bad).any():
        first = int(np.flatnonzero(unknown & ~bad)[0])
        raise UserError(
            f"{source}: row {first}: {cfg.attribute} is missing/unknown; set data.unknown to keep or drop"
        )
    keep = ~bad & (~unknown if cfg.unknown == "drop" else True)

    # fit features on the (good) training rows only
    if state is None:
        train_rows = keep & (assignment == "train")
        if not train_rows.any():
            raise UserError(f"{source}: the train split is empty; cannot fit preprocessing")
        train_frame = frame.loc[train_rows]
        for m in tabular_mods:
            fitted_all["features"][m] = fit_features(train_frame, types[m])

    ids_all = (
        [str(v) for v in frame[cfg.id_column].tolist()]
        if cfg.id_column
        else [f"row_{i:05d}" for i in range(len(frame))]
    )
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
        paths, texts = {}, {}
        for m in order:
            mod = cfg.columns[m]
            if mod.kind in ("image", "volume"):
                resolved = []
                for raw in part[mod.column].tolist():
                    key = _raw_key(raw)
                    if key is None:
                        raise UserError(f"{source}: column {mod.column!r}: empty path")
                    p = Path(key)
                    resolved.append(str(p if p.is_absolute() else base / p))
                paths[m] = (mod.kind, resolved, mod.key)
            elif mod.kind == "text":
                texts[m] = [
                    "" if _raw_key(v) is None else str(v) for v in part[mod.column].tolist()
                ]
        datasets[split] = TableDataset(
            [ids_all[i] for i in rows],
            labels[rows],
            {a: c[rows] for a, c in codes.items()},
            cfg.attribute,
            tabular,
            paths,
            texts,
            order,
            cfg.image_size,
            cfg.oct_slices,
        )
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
            first = next(iter(datasets.values()))
            c = int(first._read(m, 0).shape[0]) if len(first) else 1  # type: ignore[attr-defined]
            modalities[m] = ModalitySpec(
                m, "image", (cfg.channels, s, s), cfg.channels, (c, s, s), "uint8"
            )
        elif mod.kind == "volume":
            k = cfg.oct_slices
            modalities[m] = ModalitySpec(m, "volume", (k, s, s), k, (k, s, s), "uint8")
        else:
            modalities[m] = ModalitySpec(m, "text", (), 0, (), "str")
    for a, names in group_names.items():
        fitted_all["attributes"][a]["names"] = {str(k): v for k, v in names.items()}
    return DataBundle(
        config=cfg,
        datasets=datasets,
        modalities=modalities,
        attributes=attributes,
        group_names=group_names,
        train_attribute=cfg.attribute,
        source="table",
        skipped=skipped,
        fitted=fitted_all,
    )
