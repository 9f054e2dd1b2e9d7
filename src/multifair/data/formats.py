"""What the Harvard datasets look like on disk: attribute vocabulary, split folder spellings,
and a safe npz reader whose errors name the file, the key and the value.

The same code reads the real downloads and the trees written by `multifair.data.synthetic`.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multifair.csvcheck import check_csv_header
from multifair.errors import UserError

log = logging.getLogger(__name__)

# ---- attribute vocabulary ------------------------------------------------------------------
# One vocabulary over both datasets. Codes are the ones stored in the npz files; -1 = unknown.
GROUP_NAMES: dict[str, dict[int, str]] = {
    "race": {0: "Asian", 1: "Black", 2: "White"},
    "gender": {0: "Female", 1: "Male"},
    "ethnicity": {0: "Non-Hispanic", 1: "Hispanic"},
    "language": {0: "English", 1: "Spanish", 2: "Other"},
    "maritalstatus": {
        0: "Married/Partnered",
        1: "Single",
        2: "Divorced",
        3: "Widowed",
        4: "Legally Separated",
    },
}
ATTRIBUTES: tuple[str, ...] = tuple(GROUP_NAMES)

# npz keys per attribute, in the order tried (FairVision: male/hispanic; FairVLMed: gender/ethnicity)
ATTRIBUTE_KEYS: dict[str, tuple[str, ...]] = {
    "race": ("race",),
    "gender": ("male", "gender"),
    "ethnicity": ("hispanic", "ethnicity"),
    "language": ("language",),
    "maritalstatus": ("maritalstatus",),
}

# String spellings seen in legacy npz files and in the CSV summaries (lower-cased, stripped).
_STRING_CODES: dict[str, dict[str, int]] = {
    "race": {
        "asian": 0,
        "black": 1,
        "black or african american": 1,
        "african american": 1,
        "white": 2,
        "white or caucasian": 2,
        "caucasian": 2,
    },
    "gender": {"female": 0, "f": 0, "male": 1, "m": 1},
    "ethnicity": {"non-hispanic": 0, "non hispanic": 0, "not hispanic": 0, "hispanic": 1},
    "language": {"english": 0, "spanish": 1, "other": 2},
    "maritalstatus": {
        "married": 0,
        "married or partnered": 0,
        "married/partnered": 0,
        "partnered": 0,
        "single": 1,
        "divorced": 2,
        "widowed": 3,
        "legally separated": 4,
        "separated": 4,
    },
}
_UNKNOWN_STRINGS = {"", "unknown", "-1", "nan", "none", "null", "n/a", "na"}

# Legacy race strings written by `synthetic` when asked (as found in old FairVision files).
LEGACY_RACE = {0: "Asian", 1: "Black or African American", 2: "White or Caucasian"}

# Split folder spellings (compared case-insensitively).
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("training", "train"),
    "val": ("validation", "val", "valid"),
    "test": ("test", "testing"),
}
CSV_USE: dict[str, str] = {"training": "train", "validation": "val", "test": "test"}


def _scalar(raw: Any, where: str, what: str) -> Any:
    """An npz 0-d array or a CSV cell as a Python scalar (bytes decoded); arrays are errors."""
    value = raw.item() if isinstance(raw, np.ndarray) and raw.ndim == 0 else raw
    if isinstance(value, np.ndarray):
        raise BadValue(where, f"expected {what}, got an array of shape {value.shape}")
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8", "replace")
    return value


def attribute_code(attribute: str, raw: Any, where: str) -> int:
    """Map a stored attribute value (int code, float, or string) to its code, -1 for unknown.

    Raises `BadValue` for anything outside the vocabulary.
    """
    names = GROUP_NAMES[attribute]
    value = _scalar(raw, where, "a scalar")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _UNKNOWN_STRINGS:
            return -1
        if text in _STRING_CODES[attribute]:
            return _STRING_CODES[attribute][text]
        try:
            value = float(text)
        except ValueError:
            raise BadValue(
                where, f"{value!r} is not a {attribute} value (known: {sorted(names.values())})"
            ) from None
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if isinstance(value, (int, np.integer, float, np.floating)):
        if isinstance(value, (float, np.floating)) and (math.isnan(value) or value != int(value)):
            raise BadValue(where, f"{value!r} is not an integer code")
        code = int(value)
        if code == -1 or code in names:
            return code
        raise BadValue(where, f"{code} is not a {attribute} code (valid: {sorted(names)} or -1)")
    raise BadValue(where, f"{value!r} has unsupported type {type(value).__name__}")


def label_value(raw: Any, where: str) -> int:
    """A 0/1 label from an npz scalar or CSV cell (0/1, booleans, 'yes'/'no')."""
    value = _scalar(raw, where, "a scalar label")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_STRINGS:
            return 1
        if text in FALSE_STRINGS:
            return 0
        try:
            value = float(text)
        except ValueError:
            raise BadValue(where, f"label {value!r} is not 0/1 or yes/no") from None
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer, float, np.floating)):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            raise BadValue(where, "label is NaN")
        if value in (0, 1):
            return int(value)
        raise BadValue(where, f"label {value!r} is outside {{0, 1}}")
    raise BadValue(where, f"label {value!r} has unsupported type {type(value).__name__}")


TRUE_STRINGS = {"1", "1.0", "yes", "y", "true", "t"}
FALSE_STRINGS = {"0", "0.0", "no", "n", "false", "f"}


# ---- errors and problems ---------------------------------------------------------------------
class BadValue(Exception):
    """Internal: a bad value at `where` (e.g. "race"); wrapped into a `BadFile` by the reader."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


class BadFile(UserError):
    """A user file that cannot be used: names the file, the key (if any) and what is wrong."""

    def __init__(
        self, path: str | Path, key: str | None = None, message: str | None = None
    ) -> None:
        if message is None:
            # Re-raised by a DataLoader worker as BadFile(traceback text): keep its last line,
            # the original one-line message.
            lines = [ln for ln in str(path).splitlines() if ln.strip()]
            text = lines[-1] if lines else str(path)
            text = text.split("BadFile: ", 1)[-1]
            self.path, self.key, self.message = "", None, text
            super().__init__(text)
            return
        self.path = str(path)
        self.key = key
        self.message = message
        where = f"{self.path}" + (f": key {key!r}" if key else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers
        return (BadFile, (self.path, self.key, self.message))

    def as_dict(self) -> dict[str, str | None]:
        return {"file": self.path, "key": self.key, "problem": self.message}


@dataclass
class Problems:
    """Collects bad files when the user asked to skip them (`skip_bad`), else raises at once."""

    skip: bool
    items: list[BadFile] = field(default_factory=list)

    def add(self, error: BadFile) -> None:
        if not self.skip:
            raise error
        self.items.append(error)

    def __len__(self) -> int:
        return len(self.items)

    def report(self, what: str) -> None:
        if self.items:
            first = self.items[0]
            log.warning("%s: skipped %d bad file(s) (first: %s)", what, len(self.items), first)


# ---- npz reading -----------------------------------------------------------------------------
_READ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error, KeyError)


class NpzReader:
    """A lazily-read npz file. Never unpickles: object arrays are refused.

    `header(key)` reads only a member's .npy header (shape, dtype) - cheap even for a
    200x200x200 volume; `scalar`/`array` read one member in full.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except FileNotFoundError:
            raise BadFile(self.path, None, "file not found") from None
        except _READ_ERRORS as exc:
            raise BadFile(self.path, None, f"unreadable npz ({_short(exc)})") from None
        if not hasattr(self._npz, "files"):  # np.load returned a plain .npy array
            raise BadFile(self.path, None, "not an npz archive (a single .npy array)")
        self.keys: list[str] = list(self._npz.files)

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._npz.close()

    def has(self, key: str) -> bool:
        return key in self.keys

    def first_key(self, candidates: Iterable[str]) -> str | None:
        for key in candidates:
            if key in self.keys:
                return key
        return None

    def require(self, key: str) -> None:
        if key not in self.keys:
            raise BadFile(self.path, key, f"missing key (keys present: {sorted(self.keys)})")

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of one member, reading only its header."""
        self.require(key)
        try:
            with self._npz.zip.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        except _READ_ERRORS as exc:
            raise BadFile(self.path, key, f"unreadable member ({_short(exc)})") from None
        if dtype.hasobject:
            raise BadFile(self.path, key, "object array (would need pickle); refusing to load")
        return tuple(shape), dtype

    def array(self, key: str) -> np.ndarray:
        self.require(key)
        try:
            return self._npz[key]
        except ValueError as exc:
            if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                raise BadFile(
                    self.path, key, "object array (would need pickle); refusing to load"
                ) from None
            raise BadFile(self.path, key, f"unreadable member ({_short(exc)})") from None
        except _READ_ERRORS as exc:
            raise BadFile(self.path, key, f"unreadable member ({_short(exc)})") from None

    def scalar(self, key: str) -> Any:
        value = self.array(key)
        if value.ndim != 0 and value.size != 1:
            raise BadFile(self.path, key, f"expected a scalar, got shape {value.shape}")
        return value.reshape(()).item() if value.dtype.kind not in "US" else str(value.reshape(()))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 120 else text[:117] + "..."


# ---- folders and CSVs --------------------------------------------------------------------------
_SUBJECT = re.compile(r"^data_(\d+)\.npz$")


def split_folders(base: Path) -> dict[str, Path]:
    """The split folders directly under `base`, keyed train/val/test.

    Two spellings of one split (e.g. `Test` and `test`) are ambiguous and an error.
    """
    found: dict[str, Path] = {}
    if not base.is_dir():
        return found
    for child in sorted(base.iterdir()):
        if not child.is_dir():
            continue
        for split, spellings in SPLIT_FOLDERS.items():
            if child.name.lower() in spellings:
                if split in found:
                    raise UserError(
                        f"{base}: both {found[split].name!r} and {child.name!r} look like the "
                        f"{split} split; keep one"
                    )
                found[split] = child
    return found


def subject_files(folder: Path) -> list[Path]:
    """`data_xxxxx.npz` files of one split folder, sorted by id (other files are ignored)."""
    files = [p for p in folder.iterdir() if p.is_file() and _SUBJECT.match(p.name)]
    return sorted(files, key=lambda p: (int(_SUBJECT.match(p.name).group(1)), p.name))  # type: ignore[union-attr]


def read_csv(path: Path) -> Any:
    """Read a summary CSV (UTF-8 with or without BOM; headers lower-cased and stripped)."""
    import pandas as pd

    check_csv_header(path, casefold=True)
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: cannot read CSV ({_short(exc)})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame


def csv_stem(filename: str) -> str:
    """'data_00042.npz' or 'data_00042' -> 'data_00042'."""
    name = Path(str(filename).strip()).name
    return name[:-4] if name.lower().endswith(".npz") else name
