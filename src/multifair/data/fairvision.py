"""FairVision (Harvard-FairVision30k) glaucoma: fundus + 3-D OCT per subject.

Accepted layouts (split folders matched case-insensitively; `Test`/`Testing`/`test`):
    ROOT/Glaucoma/{Training,Validation,Test}/      CSV beside the disease folders (README)
    ROOT/Glaucoma/{train,val,test}/                renamed (reference training code)
    ROOT/Glaucoma/Dataset/{Training,Validation,Test}/   CSV under ROOT/Glaucoma/ReadMe/
ROOT may also point at the disease folder itself. Each split holds `data_xxxxx.npz` files
(`slo_xxxxx.jpg` and other files beside them are ignored). The npz is the source of truth for
label and attributes; `data_summary_glaucoma.csv` supplies age.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multifair.data.bundle import DataBundle
from multifair.data.config import DataConfig
from multifair.data.formats import csv_stem, read_csv, split_folders, subject_files
from multifair.data.subjects import SubjectFormat, SubjectInputs, build_subject_bundle
from multifair.errors import UserError

FORMAT = SubjectFormat(
    kind="fairvision",
    modalities={"fundus": ("image", "slo_fundus"), "oct": ("volume", "oct_bscans")},
)


@dataclass
class Located:
    """Where a dataset's pieces are: split folders, their subject files, and the CSVs."""

    root: Path
    base: Path  # the folder holding the split folders
    folders: dict[str, Path]
    files: dict[str, list[Path]]
    csvs: dict[str, Path] = field(default_factory=dict)


def _child(folder: Path, name: str) -> Path | None:
    """`folder/name`, matched case-insensitively."""
    if not folder.is_dir():
        return None
    exact = folder / name
    if exact.is_dir():
        return exact
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def find_split_base(candidates: Sequence[Path | None], root: Path, layouts: str) -> Path:
    for base in candidates:
        if base is not None and split_folders(base):
            return base
    raise UserError(f"{root}: no split folders found (expected {layouts})")


def collect_files(
    root: Path, base: Path, splits: Sequence[str], spellings: str
) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    folders = split_folders(base)
    missing = [s for s in splits if s not in folders]
    if missing:
        raise UserError(
            f"{base}: no folder for split(s) {missing} (found {sorted(p.name for p in folders.values())}; "
            f"accepted spellings: {spellings})"
        )
    files: dict[str, list[Path]] = {}
    for split in splits:
        files[split] = subject_files(folders[split])
        if not files[split]:
            raise UserError(f"{folders[split]}: empty split folder (no data_xxxxx.npz files)")
    return {s: folders[s] for s in splits}, files


def locate(root: Path, disease: str, splits: Sequence[str]) -> Located:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder")
    disease_dir = _child(root, disease)
    candidates = [
        _child(disease_dir, "Dataset") if disease_dir else None,
        disease_dir,
        _child(root, "Dataset"),
        root,
    ]
    base = find_split_base(
        candidates,
        root,
        f"{disease}/{{Training,Validation,Test}}, {disease}/{{train,val,test}} "
        f"or {disease}/Dataset/{{Training,Validation,Test}}",
    )
    folders, files = collect_files(
        root, base, splits, "Training/train, Validation/val, Test/Testing/test"
    )
    name = f"data_summary_{disease.lower()}.csv"
    csvs = {}
    for folder in [
        root,
        disease_dir,
        base,
        base.parent,
        _child(disease_dir or root, "ReadMe"),
        _child(root, "ReadMe"),
    ]:
        if folder is not None and (folder / name).is_file():
            csvs["summary"] = folder / name
            break
    return Located(root, base, folders, files, csvs)


def csv_ages(path: Path | None) -> dict[str, float]:
    """sample_id -> age from the summary CSV (missing or non-numeric ages are left out)."""
    if path is None:
        return {}
    frame = read_csv(path)
    if "filename" not in frame.columns:
        raise UserError(f"{path}: column 'filename' not found (columns: {list(frame.columns)})")
    if "age" not in frame.columns:
        return {}
    ages = {}
    for name, raw in zip(frame["filename"], frame["age"]):
        try:
            value = float(raw)
        except ValueError:
            continue
        if not math.isnan(value):
            ages[csv_stem(name)] = value
    return ages


def inputs(cfg: DataConfig, splits: Sequence[str]) -> SubjectInputs:
    """Locate the split files and read the CSV ages."""
    assert cfg.root is not None
    found = locate(cfg.root, cfg.disease, splits)
    ages = csv_ages(found.csvs.get("summary"))
    return SubjectInputs(FORMAT, found.root, found.base, found.files, found.csvs, None, ages)


def build(
    cfg: DataConfig, splits: Sequence[str], state: Mapping[str, Any] | None = None
) -> DataBundle:
    return build_subject_bundle(cfg, inputs(cfg, splits), state)
