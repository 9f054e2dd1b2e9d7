"""FairVLMed (the FairCLIP dataset): fundus + clinical note per subject.

Layout: ROOT/{Training,Validation,Test}/data_xxxxx.npz (the test folder is also seen as
`Testing` or `test`). The note is read from the npz (`note`, a 0-d unicode array) or from the
CSVs (`data_summary.csv` column `note`); the GPT-4 summary from `data_summary.csv`
(`gpt4_summary`) or `gpt-4_summarized_notes.csv` / `gpt4_summarized_notes.csv` (`summary`).
CSVs sit at ROOT or ROOT/ReadMe. Released text handling: lower-cased; missing/"nan" ->
"no clinical notes available"; shorter than 10 characters -> "no significant clinical
findings reported". Tokenisation belongs to the text encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multifair.data.bundle import DataBundle
from multifair.data.config import DataConfig
from multifair.data.fairvision import Located, _child, collect_files, find_split_base
from multifair.data.formats import csv_stem, read_csv
from multifair.data.subjects import SubjectFormat, SubjectInputs, build_subject_bundle
from multifair.errors import UserError

FORMAT = SubjectFormat(
    kind="fairvlmed",
    modalities={"fundus": ("image", "slo_fundus"), "note": ("text", "note")},
    age_key="age",
)
NO_NOTE = "no clinical notes available"
SHORT_NOTE = "no significant clinical findings reported"
SUMMARY_FILES = ("gpt-4_summarized_notes.csv", "gpt4_summarized_notes.csv")


def note_is_missing(text: str | None) -> bool:
    """No note: absent, empty, or "nan"/"none" (what the released code replaces by NO_NOTE)."""
    return text is None or not str(text).strip() or str(text).strip().lower() in ("nan", "none")


def clean_note(text: str | None, lowercase: bool = True) -> str:
    """The released fallbacks for empty and short notes."""
    if text is None:
        return NO_NOTE
    text = str(text).strip()
    if not text or text.lower() in ("nan", "none"):
        return NO_NOTE
    if lowercase:
        text = text.lower()
    if len(text) < 10:
        return SHORT_NOTE
    return text


def locate(root: Path, splits: Sequence[str]) -> Located:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder")
    base = find_split_base([root, _child(root, "Dataset")], root, "{Training,Validation,Test}")
    folders, files = collect_files(
        root, base, splits, "Training/train, Validation/val, Test/Testing/test"
    )
    csvs = {}
    for folder in [root, base, _child(root, "ReadMe")]:
        if folder is None:
            continue
        for key, names in {
            "summary": ("data_summary.csv",),
            "gpt4": SUMMARY_FILES,
            "original": ("original_notes.csv",),
        }.items():
            for name in names:
                if key not in csvs and (folder / name).is_file():
                    csvs[key] = folder / name
    return Located(root, base, folders, files, csvs)


def _column_map(path: Path, column: str) -> dict[str, str]:
    frame = read_csv(path)
    for needed in ("filename", column):
        if needed not in frame.columns:
            raise UserError(f"{path}: column {needed!r} not found (columns: {list(frame.columns)})")
    return {csv_stem(f): t for f, t in zip(frame["filename"], frame[column])}


def note_table(cfg: DataConfig, found: Located) -> dict[str, str] | None:
    """sample_id -> raw text from the CSVs, or None when notes come from the npz."""
    if cfg.note == "original" and cfg.note_from == "npz":
        return None
    if cfg.note == "original":
        for key, column in (("summary", "note"), ("original", "note")):
            if key in found.csvs:
                return _column_map(found.csvs[key], column)
        raise UserError(
            f"{found.root}: data.note_from=csv but neither data_summary.csv nor original_notes.csv "
            "was found (looked in ROOT and ROOT/ReadMe)"
        )
    if "gpt4" in found.csvs:
        return _column_map(found.csvs["gpt4"], "summary")
    if "summary" in found.csvs:
        return _column_map(found.csvs["summary"], "gpt4_summary")
    raise UserError(
        f"{found.root}: data.note=summary needs {SUMMARY_FILES[0]} or data_summary.csv "
        "(looked in ROOT and ROOT/ReadMe)"
    )


@dataclass
class NoteSource:
    """Picklable note hook: the npz note, or the CSV text for the sample id, then the fallbacks."""

    table: dict[str, str] | None
    lowercase: bool
    fallback: bool = True  # data.note_fallback: a missing note is the fallback text, present

    def __call__(self, sample_id: str, npz_note: str | None) -> str:
        if self.table is None:
            return clean_note(npz_note, self.lowercase)
        return clean_note(self.table.get(sample_id), self.lowercase)

    def missing(self, sample_id: str, npz_note: str | None) -> bool:
        """True when the sample has no note (the text above is then the released fallback)."""
        if self.fallback:
            return False
        raw = npz_note if self.table is None else self.table.get(sample_id)
        return note_is_missing(raw)


def inputs(cfg: DataConfig, splits: Sequence[str]) -> SubjectInputs:
    """Locate the split files and the note CSVs."""
    assert cfg.root is not None
    found = locate(cfg.root, splits)
    note_fn = NoteSource(note_table(cfg, found), cfg.lowercase_note, cfg.note_fallback)
    return SubjectInputs(FORMAT, found.root, found.base, found.files, found.csvs, note_fn, None)


def build(
    cfg: DataConfig, splits: Sequence[str], state: Mapping[str, Any] | None = None
) -> DataBundle:
    return build_subject_bundle(cfg, inputs(cfg, splits), state)
