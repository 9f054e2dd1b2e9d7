"""The `data` section of a run config: one pydantic model for the three kinds of input.

`kind` selects the loader: "fairvision" and "fairvlmed" read the Harvard npz trees,
"table" reads a CSV/Parquet file described column by column. Fields that belong to another
kind are rejected when set (so a typo'd or misplaced key fails at load time, naming the key).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from multifair.data.intersections import base_attributes, check_syntax
from multifair.errors import UserError

Kind = Literal["fairvision", "fairvlmed", "table"]
Split = str  # "train" | "val" | "test" (table also accepts "all")
SPLITS: tuple[str, str, str] = ("train", "val", "test")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelSpec(_Strict):
    """How a table's label column becomes 0/1.

    Without `rule`/`positive` the column must hold 0/1 (or booleans such as 'yes'/'no',
    't'/'f', 'TRUE'/'FALSE'). `rule` is a comparison with a number, e.g. "> 0" or ">= 140.5";
    `positive` lists the values that count as 1 (everything else is 0), e.g. ["M", "yes"].
    """

    column: str
    rule: str | None = None
    positive: list[str | int | float] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> LabelSpec:
        if self.rule is not None and self.positive is not None:
            raise ValueError("give either rule or positive, not both")
        return self


class AttributeColumn(_Strict):
    """A table column that defines a demographic attribute.

    Strings (or integers) become codes 0..G-1 in sorted order unless `names` maps each raw
    value to a display name (its position in `names` is the code). Numeric columns can be
    binned with `bins` (ascending edges; G = len(bins) + 1 groups, left-closed). Missing values
    and the raw values listed in `unknown_values` get code -1 (unknown).
    """

    column: str
    bins: list[float] | None = None
    names: dict[str, str] | list[str] | None = None
    unknown_values: list[str | int | float] = Field(default_factory=list)


CLIP_QUANTILES: tuple[float, float] = (0.005, 0.995)

# Multi-class labels (`data.classes`). The FairVision AMD and DR npz files hold a string
# (`amd_condition`, `dr_subtype`) naming a finer diagnosis; these presets group those values
# into ordered stages. Raw values as in Harvard-FairVision30k (not.in.icd.table means no ICD
# code for the disease was found: counted with "no disease").
CLASS_PRESETS: dict[str, dict[str, list[str]]] = {
    "fairvision_amd": {
        "normal": ["not.in.icd.table", "no.amd.diagnosis"],
        "early": ["early.dry"],
        "intermediate": ["intermediate.dry"],
        "late": [
            "advanced.atrophic.dry.with.subfoveal.involvement",
            "advanced.atrophic.dry.without.subfoveal.involvement",
            "wet.amd.active.choroidal.neovascularization",
            "wet.amd.inactive.choroidal.neovascularization",
            "wet.amd.inactive.scar",
        ],
    },
    "fairvision_dr": {
        "no_dr": ["not.in.icd.table", "no.dr.diagnosis"],
        "non_vision_threatening": ["mild.npdr", "moderate.npdr"],
        "vision_threatening": ["severe.npdr", "pdr"],
    },
}
# label_key -> the preset used when `classes` is not given (fairvision)
DEFAULT_CLASSES: dict[str, str] = {"amd_condition": "fairvision_amd", "dr_subtype": "fairvision_dr"}


def class_key(raw: Any) -> str:
    """How a raw label value is matched against `data.classes`: trimmed, case-insensitive,
    integral numbers as integers (2, 2.0 and "2" are the same class)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, bool):
        return str(int(raw))
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
        return str(int(value)) if value.is_integer() else repr(value)
    if hasattr(raw, "item") and not isinstance(raw, str):  # numpy scalar
        return class_key(raw.item())
    return str(raw).strip().lower()


class ClassSpec(_Strict):
    """The classes of a multi-class label, in order (class k is logit k), and the raw values
    that belong to each."""

    names: list[str]
    values: dict[str, list[str]]  # class name -> raw keys (`class_key`)

    @cached_property
    def _lookup(self) -> dict[str, int]:  # built once: `index` runs once per row or file
        return self.lookup()

    def lookup(self) -> dict[str, int]:
        return {v: k for k, name in enumerate(self.names) for v in self.values[name]}

    def index(self, raw: Any) -> int:
        """The class index of a raw label value; an unknown value raises ValueError naming it
        (the caller adds where it was read)."""
        found = self._lookup.get(class_key(raw))
        if found is None:
            known = [v for name in self.names for v in self.values[name]]
            raise ValueError(f"label {raw!r} is not one of data.classes {known}")
        return found


def make_class_spec(classes: list[Any] | dict[str, Any] | str) -> ClassSpec:
    """`data.classes` -> ClassSpec: a list (each value its own class, named as written), a
    mapping class name -> raw value or list of raw values, or a preset name."""
    if isinstance(classes, str):
        if classes not in CLASS_PRESETS:
            raise ValueError(
                f"classes: {classes!r} is not a preset ({sorted(CLASS_PRESETS)}); give a list or "
                "a mapping class -> raw values"
            )
        classes = CLASS_PRESETS[classes]  # type: ignore[assignment]
    if isinstance(classes, list):
        mapping = {str(c): [c] for c in classes}
    else:
        mapping = {
            str(name): (list(raw) if isinstance(raw, (list, tuple)) else [raw])
            for name, raw in classes.items()
        }
    if len(mapping) < 2:
        raise ValueError(f"classes: give at least two classes, got {list(mapping)}")
    values = {name: [class_key(v) for v in raw] for name, raw in mapping.items()}
    seen: dict[str, str] = {}
    for name, keys in values.items():
        if not keys:
            raise ValueError(f"classes: class {name!r} has no values")
        for key in keys:
            if key in seen and seen[key] != name:
                raise ValueError(f"classes: value {key!r} is in both {seen[key]!r} and {name!r}")
            seen[key] = name
    if len(set(n.lower() for n in mapping)) != len(mapping):
        raise ValueError(f"classes: two class names differ only by case: {list(mapping)}")
    return ClassSpec(names=list(mapping), values=values)


class ColumnTransform(_Strict):
    """A per-column transform of a numeric table column, fitted on the training rows.

    `log1p`: log(1 + x) (needs x > -1; nothing fitted). `clip`: clip to the training
    `quantiles` (default 0.5% and 99.5%). `rank`: the training empirical CDF, interpolated
    (values in (0, 1)). Missing values stay missing (imputed afterwards). Written as just the
    name (`tsh: log1p`) or as a mapping (`crp: {kind: clip, quantiles: [0.01, 0.99]}`).
    """

    kind: Literal["log1p", "clip", "rank"]
    quantiles: tuple[float, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_quantiles(self) -> ColumnTransform:
        if self.kind != "clip":
            if self.quantiles is not None:
                raise ValueError(f"`quantiles` is for clip, not {self.kind}")
            return self
        if self.quantiles is None:
            self.quantiles = CLIP_QUANTILES
        low, high = self.quantiles
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1 (got {[low, high]})")
        return self


class TableModality(_Strict):
    """One modality of a table.

    tabular: `columns` (numbers, booleans and categories mixed; types are detected, and
    `categorical` forces columns to be treated as categories; `transforms` maps numeric
    columns to a `ColumnTransform`). image/volume: `column` holds a path (relative to the
    table file) to an .npz (array `key`), .npy, .png or .jpg file. text: `column` holds the
    text.
    """

    kind: Literal["tabular", "image", "volume", "text"] = "tabular"
    columns: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)
    transforms: dict[str, ColumnTransform] = Field(default_factory=dict)
    column: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _fields_for_kind(self) -> TableModality:
        if self.kind == "tabular":
            if not self.columns:
                raise ValueError("a tabular modality needs a non-empty `columns` list")
            if self.column is not None:
                raise ValueError("`column` is for image/volume/text modalities; use `columns`")
            missing = [c for c in self.categorical if c not in self.columns]
            if missing:
                raise ValueError(f"categorical columns {missing} are not in `columns`")
            missing = [c for c in self.transforms if c not in self.columns]
            if missing:
                raise ValueError(f"transforms: columns {missing} are not in `columns`")
            both = [c for c in self.transforms if c in self.categorical]
            if both:
                raise ValueError(
                    f"transforms: columns {both} are categorical (transforms need numbers)"
                )
        else:
            if self.transforms:
                raise ValueError(f"`transforms` is for tabular modalities, not {self.kind}")
            if self.column is None:
                raise ValueError(f"a {self.kind} modality needs `column` (the path/text column)")
            if self.columns:
                raise ValueError(f"`columns` is for tabular modalities, not {self.kind}")
        return self


class SplitSpec(_Strict):
    """How a table's rows are split.

    `column` names a column whose values name the split (`names` maps our split names to
    the values used in the file; the defaults accept train/training, val/valid/validation,
    test/testing, case-insensitive). Without `column`, a seeded split stratified by label
    and training attribute with the given `fractions`.
    """

    column: str | None = None
    names: dict[str, list[str]] | None = None
    fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2}
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check_fractions(self) -> SplitSpec:
        bad = set(self.fractions) - set(SPLITS)
        if bad:
            raise ValueError(f"fractions: unknown split(s) {sorted(bad)}; use {list(SPLITS)}")
        if any(v < 0 for v in self.fractions.values()):
            raise ValueError("fractions must be >= 0")
        total = sum(self.fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1 (got {total:g})")
        if self.names is not None:
            bad = set(self.names) - set(SPLITS)
            if bad:
                raise ValueError(f"names: unknown split(s) {sorted(bad)}; use {list(SPLITS)}")
        return self


# Which optional fields each kind may set (the rest must keep their default).
_KIND_FIELDS: dict[str, set[str]] = {
    "fairvision": {"root", "label_key", "disease"},
    "fairvlmed": {"root", "label_key", "note", "note_from", "lowercase_note", "note_fallback"},
    "table": {
        "path",
        "label",
        "attribute_columns",
        "columns",
        "split",
        "id_column",
        "missing_values",
    },
}
_ALL_KIND_FIELDS = set().union(*_KIND_FIELDS.values())


class DataConfig(_Strict):
    """Everything a loader needs. See `multifair.data` for the API built on it."""

    kind: Kind
    # -- where ------------------------------------------------------------------------------
    root: Path | None = None  # fairvision/fairvlmed: the dataset folder
    path: str | dict[str, str] | None = None  # table: file, {split: file}, or "sklearn:diabetes"
    # -- groups -----------------------------------------------------------------------------
    # the TRAINING attribute: its codes go to batch["group"]; `race*gender` trains on the
    # intersection (data/intersections.py), whose parts stay evaluated too
    attribute: str = "race"
    attributes: list[str] | None = None  # evaluated attributes (default: all present)
    # an intersection group with fewer TRAINING samples is merged into its first attribute's
    # remainder (`Asian|other`), the same way in every split; 0: never merge
    min_group_size: int = Field(30, ge=0)
    # -1 (unknown) codes of the training attribute: keep them (metrics drop them), drop those
    # samples from every split, or treat them as an error.
    unknown: Literal["keep", "drop", "error"] = "keep"
    # A sample that lacks a modality (empty/missing file path or npz key, empty note, a tabular
    # modality with every cell missing): "mask" keeps it with batch["present"][m] False (the
    # model excludes the modality, nothing imputed reaches fusion); "impute" feeds the
    # placeholder as data (the released FairVLMed note text, median-imputed table cells; an
    # absent image is still an error); "drop" removes the sample (counted in the log);
    # "error" refuses it, naming it. A sample with NO modality present is always dropped,
    # counted, under "mask" (there is nothing to predict from).
    missing_modalities: Literal["mask", "impute", "drop", "error"] = "mask"
    # -- what the model reads ---------------------------------------------------------------
    modalities: list[str] | None = None  # subset of the dataset's modalities (default: all)
    image_size: int = Field(224, ge=8, le=4096)  # fundus side and OCT slice side, in pixels
    oct_slices: int = Field(10, ge=1, le=1024)  # slices taken at linspace(0, D-1, K)
    channels: Literal[1, 3] = 3  # fundus channels reaching the model (3: gray -> RGB)
    augment: bool = True  # train-only flip + colour jitter (released preprocessing)
    # -- loading ----------------------------------------------------------------------------
    # None: use ROOT/.multifair_cache when it holds a valid cache for these settings;
    # "off": never; a path: that cache must exist and match (else an error).
    cache: str | None = None
    num_workers: int = Field(2, ge=0)
    skip_bad: bool = False  # skip (count and report) unreadable/invalid files instead of failing
    # -- fairvision / fairvlmed -------------------------------------------------------------
    label_key: str = "glaucoma"
    # multi-class labels (any kind): a list of values (class k = the k-th), a mapping class ->
    # raw value(s), or a preset (fairvision_amd, fairvision_dr). None: binary 0/1 labels, except
    # fairvision label_key amd_condition / dr_subtype, which default to their preset.
    classes: list[str | int] | dict[str, str | int | list[str | int]] | str | None = None
    disease: str = "Glaucoma"  # fairvision: the disease folder under ROOT
    note: Literal["original", "summary"] = "original"  # fairvlmed: clinical note or GPT-4 summary
    note_from: Literal["npz", "csv"] = "npz"  # fairvlmed: where the original note is read
    lowercase_note: bool = True
    # fairvlmed: a missing note ("", "nan") becomes the released fallback text and counts as
    # present (released behaviour; the constant text acts as a learned "no note" input); false:
    # it is a missing modality, handled by `missing_modalities`
    note_fallback: bool = True
    # -- table ------------------------------------------------------------------------------
    label: str | LabelSpec | None = None
    attribute_columns: dict[str, str | AttributeColumn] = Field(default_factory=dict)
    columns: dict[str, TableModality] = Field(default_factory=dict)
    split: SplitSpec = Field(default_factory=SplitSpec)
    id_column: str | None = None
    # sentinel values that mean "not measured": column -> values, "*" -> every feature and
    # attribute column (a column's own list adds to "*"); matched before types are inferred
    missing_values: dict[str, list[str | int | float]] = Field(default_factory=dict)

    @field_validator("attribute")
    @classmethod
    def _check_attribute(cls, value: str) -> str:
        return check_syntax(value)

    @field_validator("attributes")
    @classmethod
    def _check_attributes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [check_syntax(a) for a in value]

    @field_validator("missing_values")
    @classmethod
    def _check_missing_values(
        cls, value: dict[str, list[str | int | float]], info: ValidationInfo
    ) -> dict[str, list[str | int | float]]:
        for column, sentinels in value.items():
            if any(isinstance(v, str) and not v.strip() for v in sentinels):
                raise ValueError(f"{column}: an empty sentinel is already missing; remove it")
        if {"columns", "attribute_columns", "attribute"} <= set(info.data):  # all validated
            known = _sentinel_columns(info.data)
            unknown = sorted(set(value) - {"*"} - set(known))
            if unknown:
                raise ValueError(
                    f"{unknown} are not feature or attribute columns of this config "
                    f"(use '*' for all of them; columns: {known})"
                )
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> DataConfig:
        allowed = _KIND_FIELDS[self.kind]
        for name in sorted(_ALL_KIND_FIELDS - allowed):
            value = getattr(self, name)
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if value != default:
                owners = [k for k, f in _KIND_FIELDS.items() if name in f]
                raise ValueError(f"`{name}` is only for kind {' / '.join(owners)}, not {self.kind}")
        if self.kind in ("fairvision", "fairvlmed") and self.root is None:
            raise ValueError(f"kind {self.kind} needs `root` (the dataset folder)")
        if self.kind == "fairvlmed" and self.note == "summary" and self.note_from == "npz":
            # the npz holds only the original note; summaries come from the CSVs
            self.note_from = "csv"
        if self.kind == "table":
            if self.path is None:
                raise ValueError("kind table needs `path` (a CSV/Parquet file or sklearn:diabetes)")
            if self.label is None:
                raise ValueError("kind table needs `label` (a column name or {column, rule})")
            if not self.columns:
                raise ValueError("kind table needs `columns` (modality name -> its columns)")
        if self.attributes is not None and not self.attributes:
            raise ValueError("attributes: give at least one attribute, or leave it out for all")
        if self.classes is not None:
            make_class_spec(self.classes)  # a bad list/mapping/preset fails at load time
            if isinstance(self.label, LabelSpec) and (
                self.label.rule is not None or self.label.positive is not None
            ):
                raise ValueError(
                    "label.rule / label.positive make a binary label; drop them "
                    "when `classes` is given (multi-class)"
                )
        return self

    @property
    def absent_is_missing(self) -> bool:
        """Whether an absent modality (empty block, empty path, absent npz array) is a missing
        modality; under `impute` it is data (tabular) or a bad row/file (image, volume)."""
        return self.missing_modalities != "impute"

    def class_spec(self) -> ClassSpec | None:
        """The multi-class label's classes, or None for a binary (0/1) label."""
        classes = self.classes
        if classes is None and self.kind != "table":
            classes = DEFAULT_CLASSES.get(self.label_key)
        return None if classes is None else make_class_spec(classes)

    def sentinel_columns(self) -> list[str]:
        """The table columns `missing_values` applies to: tabular features and attributes."""
        return _sentinel_columns(self.__dict__)

    def label_spec(self) -> LabelSpec:
        assert self.label is not None
        return LabelSpec(column=self.label) if isinstance(self.label, str) else self.label


def _sentinel_columns(fields: Mapping[str, Any]) -> list[str]:
    """Tabular feature columns and attribute columns, from validated DataConfig fields."""
    columns = [c for m in fields["columns"].values() for c in m.columns]
    names = base_attributes(
        [fields["attribute"], *(fields.get("attributes") or []), *fields["attribute_columns"]]
    )
    for name in names:
        spec = fields["attribute_columns"].get(name, name)
        columns.append(spec if isinstance(spec, str) else spec.column)
    return list(dict.fromkeys(columns))


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> DataConfig:
    """Read a YAML file holding a data section (`data: {...}`) or a bare data mapping."""
    from multifair import config as _config

    raw: dict[str, Any] = _config.load_yaml(path)
    if "data" in raw and isinstance(raw["data"], dict):
        raw = raw["data"]
    if overrides:
        raw = _config.deep_merge(raw, _config.parse_overrides(overrides))
    if "kind" not in raw:
        raise UserError(f"{path}: data.kind: missing (one of fairvision, fairvlmed, table)")
    return _config.validate(DataConfig, raw, source=f"{path}: data")
