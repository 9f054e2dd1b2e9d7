"""Subject-per-npz datasets shared by FairVision and FairVLMed.

One `data_xxxxx.npz` per subject: a scan reads every file's label and attribute scalars and
the headers (shape, dtype) of its image arrays - never the arrays themselves - so a bad file
fails (or is skipped) before training starts. The datasets then read samples either from
the npz files (preprocessing on the fly) or from the uint8 cache written by
`multifair data prepare` (see cache.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from multifair.console import bars_enabled
from multifair.data import intersections
from multifair.data.bundle import (
    CollatedSamples,
    DataBundle,
    ModalityKind,
    ModalitySpec,
    batch_tensor,
    missing_policy,
)
from multifair.data.cache import find_cache
from multifair.data.config import ClassSpec, DataConfig
from multifair.data.formats import (
    ATTRIBUTE_KEYS,
    ATTRIBUTES,
    GROUP_NAMES,
    BadFile,
    BadValue,
    NpzReader,
    Problems,
    attribute_code,
    label_value,
)
from multifair.data.transforms import fundus_uint8, oct_uint8
from multifair.errors import UserError

log = logging.getLogger(__name__)

# Text hook: (sample_id, note read from the npz or None) -> the text the model reads.
NoteFn = Callable[[str, "str | None"], str]


@dataclass(frozen=True)
class SubjectFormat:
    """One dataset's modalities: name -> (kind, npz key). Text modalities use key "note"."""

    kind: str
    modalities: dict[str, tuple[ModalityKind, str]]
    age_key: str | None = None  # npz scalar holding age (FairVLMed); FairVision: the CSV


@dataclass
class Records:
    """Per-split metadata in columns: everything but the pixels."""

    sample_ids: list[str]
    paths: list[str]
    labels: np.ndarray  # (N,) int64
    codes: dict[str, np.ndarray]  # attribute -> (N,) int64, -1 unknown
    age: np.ndarray  # (N,) float64, NaN unknown
    notes: list[str] | None = None
    stored: dict[str, tuple[list[int], str]] = field(
        default_factory=dict
    )  # modality -> (shape, dtype) of the first file that has it
    # modality -> (N,) bool: which samples have it (absent npz key, missing note); modalities
    # every sample has are left out
    present: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def take(self, rows: np.ndarray) -> Records:
        rows = np.asarray(rows, dtype=np.int64)
        return Records(
            sample_ids=[self.sample_ids[i] for i in rows],
            paths=[self.paths[i] for i in rows],
            labels=self.labels[rows],
            codes={a: c[rows] for a, c in self.codes.items()},
            age=self.age[rows],
            notes=None if self.notes is None else [self.notes[i] for i in rows],
            stored=dict(self.stored),
            present={m: p[rows] for m, p in self.present.items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_ids": self.sample_ids,
            "paths": self.paths,
            "labels": self.labels.tolist(),
            "codes": {a: c.tolist() for a, c in self.codes.items()},
            "age": [None if math.isnan(x) else float(x) for x in self.age],
            "notes": self.notes,
            "stored": {m: [list(s), d] for m, (s, d) in self.stored.items()},
            "present": {m: p.astype(int).tolist() for m, p in self.present.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Records:
        return cls(
            sample_ids=list(data["sample_ids"]),
            paths=list(data["paths"]),
            labels=np.asarray(data["labels"], dtype=np.int64),
            codes={a: np.asarray(c, dtype=np.int64) for a, c in data["codes"].items()},
            age=np.asarray([np.nan if x is None else x for x in data["age"]], dtype=np.float64),
            notes=data.get("notes"),
            stored={m: (list(s), str(d)) for m, (s, d) in data.get("stored", {}).items()},
            present={m: np.asarray(p, dtype=bool) for m, p in data.get("present", {}).items()},
        )


# ---- scanning ---------------------------------------------------------------------------------
def present_attributes(path: Path) -> list[str]:
    """Vocabulary attributes whose key is in this (first) file."""
    with NpzReader(path) as z:
        return [a for a in ATTRIBUTES if z.first_key(ATTRIBUTE_KEYS[a]) is not None]


def _check_header(modality_kind: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if dtype.kind not in "biuf":
        return f"dtype {dtype} is not numeric"
    if modality_kind == "image":
        ok = len(shape) == 2 or (len(shape) == 3 and (shape[-1] in (3, 4) or shape[0] in (1, 3)))
        if not ok or min(shape) < 1:
            return f"shape {shape} is not a 2-D image (H, W)"
    if modality_kind == "volume" and (len(shape) != 3 or min(shape) < 1):
        return f"shape {shape} is not a volume (D, H, W)"
    return None


def _label(raw: Any, key: str, classes: ClassSpec | None) -> int:
    if classes is None:
        return label_value(raw, key)
    try:
        return classes.index(raw)
    except ValueError as exc:
        raise BadValue(key, str(exc)) from None


def scan_file(
    path: Path,
    fmt: SubjectFormat,
    label_key: str,
    attributes: Sequence[str],
    modalities: Sequence[str],
    read_note: bool,
    allow_missing: bool = False,
    classes: ClassSpec | None = None,
) -> dict[str, Any]:
    """Read one subject's scalars and array headers. Raises `BadFile` naming file/key/value.
    With `allow_missing` an image/volume key absent from the file is a missing modality
    (`out["absent"]`), not an error. With `classes` the label is a class index (multi-class),
    else 0/1."""
    with NpzReader(path) as z:
        z.require(label_key)
        try:
            out: dict[str, Any] = {"label": _label(z.scalar(label_key), label_key, classes)}
            codes = {}
            for attribute in attributes:
                key = z.first_key(ATTRIBUTE_KEYS[attribute])
                if key is None:
                    z.require(ATTRIBUTE_KEYS[attribute][0])  # raises "missing key"
                    raise AssertionError  # pragma: no cover
                codes[attribute] = attribute_code(attribute, z.scalar(key), key)
            out["codes"] = codes
            age = math.nan
            if fmt.age_key is not None and z.has(fmt.age_key):
                raw = z.scalar(fmt.age_key)
                try:
                    age = float(raw)
                except (TypeError, ValueError):
                    raise BadValue(fmt.age_key, f"age {raw!r} is not a number") from None
            out["age"] = age
        except BadValue as exc:
            raise BadFile(path, exc.where, exc.message) from None
        stored = {}
        out["absent"] = []
        for name in modalities:
            kind, key = fmt.modalities[name]
            if kind == "text":
                continue
            if allow_missing and not z.has(key):
                out["absent"].append(name)
                continue
            shape, dtype = z.header(key)
            problem = _check_header(kind, shape, dtype)
            if problem:
                raise BadFile(path, key, problem)
            stored[name] = (list(shape), str(dtype))
        out["stored"] = stored
        note = None
        if read_note:
            z.require("note")
            shape, dtype = z.header("note")
            if dtype.kind not in "US":
                raise BadFile(path, "note", f"expected a string, got dtype {dtype}")
            note = str(z.scalar("note"))
        out["note"] = note
    return out


def scan_split(
    files: Sequence[Path],
    fmt: SubjectFormat,
    cfg: DataConfig,
    attributes: Sequence[str],
    modalities: Sequence[str],
    problems: Problems,
    note_fn: NoteFn | None = None,
    ages: Mapping[str, float] | None = None,
    desc: str = "scan",
) -> Records:
    """Scan a split's files into `Records`; bad files raise or are collected in `problems`."""
    text = [m for m in modalities if fmt.modalities[m][0] == "text"]
    read_note = bool(text) and cfg.note_from == "npz" and fmt.kind == "fairvlmed"
    classes = cfg.class_spec()
    ids, paths, labels, ages_out, notes = [], [], [], [], []
    allow_missing = cfg.absent_is_missing
    absent: dict[str, list[bool]] = {m: [] for m in modalities}
    note_missing = getattr(note_fn, "missing", None)
    codes: dict[str, list[int]] = {a: [] for a in attributes}
    stored: dict[str, tuple[list[int], str]] = {}
    show = len(files) >= 2000 and log.isEnabledFor(logging.INFO)
    for path in tqdm(files, desc=desc, disable=not bars_enabled(show), leave=False):
        try:
            info = scan_file(
                path, fmt, cfg.label_key, attributes, modalities, read_note, allow_missing, classes
            )
        except BadFile as exc:
            problems.add(exc)
            continue
        sample_id = path.stem
        ids.append(sample_id)
        paths.append(str(path))
        labels.append(info["label"])
        for a in attributes:
            codes[a].append(info["codes"][a])
        age = info["age"]
        if math.isnan(age) and ages is not None:
            age = ages.get(sample_id, math.nan)
        ages_out.append(age)
        if text:
            assert note_fn is not None
            notes.append(note_fn(sample_id, info["note"]))
        for m in modalities:
            if fmt.modalities[m][0] == "text":
                # the released fallback text stays in the batch; under `mask` it is not data
                gone = allow_missing and note_missing is not None and note_missing(sample_id, info["note"])  # fmt: skip
            else:
                gone = m in info["absent"]
            absent[m].append(bool(gone))
        for m, value in info["stored"].items():
            stored.setdefault(m, value)
    return Records(
        sample_ids=ids,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        codes={a: np.asarray(c, dtype=np.int64) for a, c in codes.items()},
        age=np.asarray(ages_out, dtype=np.float64),
        notes=notes if text else None,
        stored=stored,
        present={m: ~np.asarray(a, dtype=bool) for m, a in absent.items() if any(a)},
    )


# ---- datasets ---------------------------------------------------------------------------------
class _SubjectDataset(Dataset):
    """Common sample-dict assembly; subclasses provide the modality tensors."""

    def __init__(
        self, records: Records, modalities: Mapping[str, ModalityKind], train_attribute: str
    ) -> None:
        self.records = records
        self.modality_kinds = dict(modalities)
        self.train_attribute = train_attribute
        self.sample_ids = records.sample_ids
        self.labels = records.labels
        self.codes = records.codes
        self.extra = {"age": records.age}  # per-sample metadata that is not an attribute
        # modality -> (N,) bool for the modalities some sample lacks (see Records.present)
        self.present = {m: p for m, p in records.present.items() if m in self.modality_kinds}

    def __len__(self) -> int:
        return len(self.records)

    def _meta(self, index: int) -> dict[str, Any]:
        codes = {a: int(c[index]) for a, c in self.codes.items()}
        meta: dict[str, Any] = {}
        if self.present:
            meta["present"] = {m: bool(p[index]) for m, p in self.present.items()}
        return meta | {
            "label": int(self.labels[index]),
            "group": codes[self.train_attribute],
            "attributes": codes,
            "sample_id": self.sample_ids[index],
            "index": index,
        }


class NpzSubjectDataset(_SubjectDataset):
    """Reads and preprocesses one npz per sample (the slow path the cache replaces)."""

    def __init__(
        self,
        records: Records,
        modalities: Mapping[str, ModalityKind],
        keys: Mapping[str, str],
        train_attribute: str,
        image_size: int,
        oct_slices: int,
    ) -> None:
        super().__init__(records, modalities, train_attribute)
        self.keys = dict(keys)
        self.image_size = image_size
        self.oct_slices = oct_slices

    def load_modalities(self, index: int) -> dict[str, Any]:
        path = self.records.paths[index]
        out: dict[str, Any] = {}
        with NpzReader(path) as z:
            for name, kind in self.modality_kinds.items():
                key = self.keys[name]
                if kind != "text" and name in self.present and not self.present[name][index]:
                    # absent: zeros of the stored shape, which the model leaves out
                    out[name] = torch.zeros(self.placeholder_shape(name), dtype=torch.uint8)
                    continue
                try:
                    if kind == "image":
                        out[name] = fundus_uint8(z.array(key), self.image_size, key)
                    elif kind == "volume":
                        out[name] = oct_uint8(z.array(key), self.oct_slices, self.image_size, key)
                    else:
                        assert self.records.notes is not None
                        out[name] = self.records.notes[index]
                except BadValue as exc:
                    raise BadFile(path, exc.where, exc.message) from None
        return out

    def placeholder_shape(self, name: str) -> tuple[int, ...]:
        """The uint8 shape an absent modality is filled with (what a present one yields)."""
        size = self.image_size
        if self.modality_kinds[name] == "volume":
            return (self.oct_slices, size, size)
        return (stored_channels(self.records.stored.get(name)), size, size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load_modalities(index)
        sample.update(self._meta(index))
        return sample


class CachedSubjectDataset(_SubjectDataset):
    """Reads uint8 tensors from the memory-mapped cache: one sample is a few slices of pages.

    Memory maps are opened lazily in each process (DataLoader workers included), so the
    dataset pickles cheaply under any start method.
    """

    def __init__(
        self,
        records: Records,
        modalities: Mapping[str, ModalityKind],
        arrays: Mapping[str, Path],
        rows: np.ndarray,
        train_attribute: str,
    ) -> None:
        super().__init__(records, modalities, train_attribute)
        self.array_paths = {m: Path(p) for m, p in arrays.items()}
        self.rows = np.asarray(rows, dtype=np.int64)  # dataset index -> cache row
        self._maps: dict[str, np.ndarray] = {}
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}
        state["_pid"] = -1
        return state

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._pid != os.getpid():
            self._maps = {m: np.load(p, mmap_mode="r") for m, p in self.array_paths.items()}
            self._pid = os.getpid()
        return self._maps

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        sample: dict[str, Any] = {}
        arrays = self._arrays()
        for name, kind in self.modality_kinds.items():
            if kind == "text":
                assert self.records.notes is not None
                sample[name] = self.records.notes[index]
            else:
                sample[name] = torch.from_numpy(np.array(arrays[name][row]))
        sample.update(self._meta(index))
        return sample

    def __getitems__(self, indices: Sequence[int]) -> CollatedSamples:
        """Batched read straight into the batch tensors (shared memory inside a worker): one
        copy from the page cache per sample, rows read in file order."""
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        arrays = self._arrays()
        samples = CollatedSamples({} for _ in range(len(idx)))
        samples.tensors = {}
        for name, kind in self.modality_kinds.items():
            if kind == "text":
                continue
            source = arrays[name]
            block = batch_tensor((len(rows), *source.shape[1:]), torch.uint8)  # (B, C|K, S, S)
            view = block.numpy()
            for j in np.argsort(rows, kind="stable").tolist():
                view[j] = source[rows[j]]
            samples.tensors[name] = block
        for j, index in enumerate(idx.tolist()):
            sample = samples[j]
            for name, kind in self.modality_kinds.items():
                if kind == "text":
                    assert self.records.notes is not None
                    sample[name] = self.records.notes[index]
                else:
                    sample[name] = samples.tensors[name][j]
            sample.update(self._meta(index))
        return samples


# ---- building a bundle --------------------------------------------------------------------------
def select_modalities(cfg: DataConfig, fmt: SubjectFormat) -> list[str]:
    names = list(fmt.modalities)
    if cfg.modalities is None:
        return names
    unknown = [m for m in cfg.modalities if m not in names]
    if unknown:
        raise UserError(f"data.modalities: {unknown} not in {cfg.kind}'s modalities {names}")
    return list(dict.fromkeys(cfg.modalities))


def select_attributes(cfg: DataConfig, present: Sequence[str], source: str) -> list[str]:
    """The evaluated attributes (training attribute first is not required; it is included,
    with its parts when it is an intersection)."""
    named = [cfg.attribute, *(cfg.attributes or [])]
    intersections.check_parts(
        cfg.attribute, cfg.attributes, [a for a in present if a in GROUP_NAMES]
    )
    for name in intersections.base_attributes(named):
        if name not in GROUP_NAMES:
            raise UserError(
                f"data.attribute(s): {name!r} is not an attribute (known: {list(GROUP_NAMES)})"
            )
        if name not in present:
            raise UserError(f"{source}: attribute {name!r} not stored (present: {list(present)})")
    chosen = list(cfg.attributes) if cfg.attributes is not None else list(present)
    return intersections.evaluated(cfg.attribute, chosen)


def apply_unknown_policy(
    records: Records, cfg: DataConfig, split: str, attribute: str
) -> tuple[Records, np.ndarray]:
    """Keep / drop / reject samples whose training attribute is -1. Returns (records, kept rows)."""
    rows = np.arange(len(records))
    unknown = records.codes[attribute] == -1
    if not unknown.any() or cfg.unknown == "keep":
        return records, rows
    if cfg.unknown == "error":
        first = int(np.flatnonzero(unknown)[0])
        raise UserError(
            f"{records.paths[first]}: {attribute} is -1 (unknown) in {int(unknown.sum())} "
            f"{split} sample(s); set data.unknown to keep or drop"
        )
    log.info("%s: dropped %d sample(s) with unknown %s", split, int(unknown.sum()), attribute)
    kept = rows[~unknown]
    return records.take(kept), kept


def stored_channels(stored: tuple[list[int], str] | None) -> int:
    """Channels of the uint8 fundus the loader emits: 1 for (H, W), 3 for colour files."""
    if stored is None:
        return 1
    shape = stored[0]
    return 1 if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1) else 3


def modality_specs(
    cfg: DataConfig, fmt: SubjectFormat, modalities: Sequence[str], records: Records
) -> dict[str, ModalitySpec]:
    specs = {}
    s = cfg.image_size
    for name in modalities:
        kind, _ = fmt.modalities[name]
        if kind == "image":
            c = stored_channels(records.stored.get(name))
            specs[name] = ModalitySpec(
                name, kind, (cfg.channels, s, s), cfg.channels, (c, s, s), "uint8"
            )
        elif kind == "volume":
            k = cfg.oct_slices
            specs[name] = ModalitySpec(name, kind, (k, s, s), k, (k, s, s), "uint8")
        else:
            specs[name] = ModalitySpec(name, kind, (), 0, (), "str")
    return specs


@dataclass
class SubjectInputs:
    """A located dataset: its format, split files, CSVs and the text/age hooks."""

    fmt: SubjectFormat
    root: Path
    base: Path
    files: dict[str, list[Path]]
    csvs: dict[str, Path]
    note_fn: NoteFn | None = None
    ages: dict[str, float] | None = None


def first_attributes(files: Iterable[Path], skip_bad: bool, root: Path) -> list[str]:
    """The attributes stored in the first readable file (a bad one raises unless skip_bad)."""
    problems = Problems(skip=skip_bad)
    for path in files:
        try:
            return present_attributes(path)
        except BadFile as exc:
            problems.add(exc)
    raise UserError(f"{root}: no readable npz file")


@dataclass
class SubjectSource:
    """What `cache.write_cache` stores of a located FairVision/FairVLMed tree: the scanned
    records of each split and the preprocessed uint8 pixels of every modality."""

    cfg: DataConfig
    inputs: SubjectInputs

    @property
    def root(self) -> Path:
        return self.inputs.root

    @property
    def files(self) -> dict[str, list[Path]]:
        return self.inputs.files

    @property
    def keys(self) -> dict[str, str]:
        return {m: key for m, (_, key) in self.inputs.fmt.modalities.items()}

    @property
    def kinds(self) -> dict[str, ModalityKind]:
        return {m: kind for m, (kind, _) in self.inputs.fmt.modalities.items()}

    def attributes(self) -> list[str]:
        files = (p for split_files in self.files.values() for p in split_files)
        return first_attributes(files, self.cfg.skip_bad, self.root)

    def scan(self, split: str, attributes: list[str], problems: Problems) -> Records:
        inputs = self.inputs
        return scan_split(
            inputs.files[split],
            inputs.fmt,
            self.cfg,
            attributes,
            list(inputs.fmt.modalities),  # every modality: any subset can use the cache
            problems,
            inputs.note_fn,
            inputs.ages,
            desc=f"scan {split}",
        )

    def read_records(self, data: Any) -> Records:
        return Records.from_json(data)

    def dataset(self, records: Records) -> NpzSubjectDataset:
        cfg = self.cfg
        return NpzSubjectDataset(
            records, self.kinds, self.keys, cfg.attribute, cfg.image_size, cfg.oct_slices
        )

    def shapes(self, records: Records) -> dict[str, list[int]]:
        size, k = self.cfg.image_size, self.cfg.oct_slices
        return {
            m: [stored_channels(records.stored.get(m)), size, size]
            if kind == "image"
            else [k, size, size]
            for m, kind in self.kinds.items()
            if kind != "text"
        }


def build_subject_bundle(
    cfg: DataConfig, inputs: SubjectInputs, state: Mapping[str, Any] | None = None
) -> DataBundle:
    """Shared build for FairVision/FairVLMed once the split files are known; `state` (a
    previous `bundle.state()`) brings the intersection groups fitted on its training split."""
    fmt, root, files = inputs.fmt, inputs.root, inputs.files
    note_fn, ages = inputs.note_fn, inputs.ages

    modalities = select_modalities(cfg, fmt)
    kinds = {m: fmt.modalities[m][0] for m in modalities}
    keys = {m: fmt.modalities[m][1] for m in modalities}
    cached = find_cache(cfg, root, files, Records.from_json)
    problems = Problems(skip=cfg.skip_bad)
    records: dict[str, Records] = {}
    rows: dict[str, np.ndarray] = {}
    if cached is not None:
        present = cached.attributes
        for split in files:
            records[split], rows[split] = cached.records[split], cached.rows[split]
            for bad in cached.bad[split]:
                problems.add(BadFile(bad["file"], bad.get("key"), bad["problem"]))
        source = "cache"
    else:
        first = next((p for split in files for p in files[split]), None)
        assert first is not None
        # bad files met here are met again by the scan below, which reports them
        present = first_attributes((p for s in files for p in files[s]), cfg.skip_bad, root)
        for split, split_files in files.items():
            records[split] = scan_split(
                split_files,
                fmt,
                cfg,
                present,
                modalities,
                problems,
                note_fn,
                ages,
                desc=f"scan {split}",
            )
            if len(records[split]) == 0:
                raise UserError(f"{root}: no readable sample in the {split} split")
            rows[split] = np.arange(len(records[split]))
        source = "npz"
    problems.report(f"{cfg.kind} {root}")
    attributes = select_attributes(cfg, present, str(root))
    group_names = {a: dict(GROUP_NAMES[a]) for a in intersections.base_attributes(attributes)}
    fitted = intersections.build(
        attributes,
        {split: rec.codes for split, rec in records.items()},
        group_names,
        cfg.min_group_size,
        saved=(state or {}).get("intersections"),
    )
    group_names.update({a: intersections.names(f) for a, f in fitted.items()})
    datasets: dict[str, Dataset] = {}
    dropped: dict[str, int] = {}
    absent_counts: dict[str, dict[str, int]] = {}
    for split in files:
        rec = records[split]
        rec.codes = {
            a: intersections.apply(fitted[a], rec.codes) if a in fitted else rec.codes[a]
            for a in attributes
        }
        rec, kept = apply_unknown_policy(rec, cfg, split, cfg.attribute)
        if len(rec) == 0:
            raise UserError(f"{root}: the {split} split is empty after data.unknown={cfg.unknown}")
        # missing modalities (data.missing_modalities), over the modalities this run reads
        have = {m: rec.present.get(m, np.ones(len(rec), dtype=bool)) for m in modalities}
        ok, dropped[split] = missing_policy(
            have,
            cfg.missing_modalities,
            lambda i, rec=rec: str(rec.paths[i]),
            f"{cfg.kind} {root}",
            split,
        )
        if not ok.all():
            rec, kept = rec.take(np.flatnonzero(ok)), kept[ok]
        if len(rec) == 0:
            raise UserError(f"{root}: the {split} split is empty after data.missing_modalities")
        absent_counts[split] = {
            m: int((~rec.present[m]).sum()) if m in rec.present else 0 for m in modalities
        }
        if source == "cache":
            datasets[split] = CachedSubjectDataset(
                rec,
                kinds,
                cached.arrays[split],
                rows[split][kept],
                cfg.attribute,  # type: ignore[union-attr]
            )
        else:
            datasets[split] = NpzSubjectDataset(
                rec, kinds, keys, cfg.attribute, cfg.image_size, cfg.oct_slices
            )
    any_records = next(iter(records.values()))
    return DataBundle(
        config=cfg,
        datasets=datasets,
        modalities=modality_specs(cfg, fmt, modalities, any_records),
        attributes=attributes,
        group_names={a: group_names[a] for a in attributes},
        train_attribute=cfg.attribute,
        source=source,
        skipped=[p.as_dict() for p in problems.items],
        intersections=fitted,
        missing={
            "policy": cfg.missing_modalities,
            "absent": absent_counts,
            "dropped": dropped,
        },
    )
