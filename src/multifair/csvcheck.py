"""CSV headers checked before pandas reads them (shared by the table reader, the dataset
summary CSVs and `multifair audit`; no heavy imports, so `audit` stays light)."""

from __future__ import annotations

import csv
from pathlib import Path

from multifair.errors import UserError

# Column prefixes of a run's predictions CSVs (training.inference writes them; audit and
# diagnose read them back; here so that reading them needs no torch)
AUX_SCORE_PREFIX = "aux_score_"  # + modality: that modality's auxiliary head
PRESENT_PREFIX = "present_"  # + modality: 1 if the sample has it (data with missing modalities)
SCORE_PREFIX = "score_"  # + class name: multi-class probability columns, in class order

SEPARATORS = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


def check_csv_header(path: str | Path, sep: str = ",", casefold: bool = False) -> None:
    """What pandas would hide in a CSV header: a file separated by another character (read as
    ONE column) and duplicate column names (silently renamed 'x.1'). Unreadable files are left
    to the reader, which names its own problem."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh, delimiter=sep), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return
    names = [h.strip().lower() if casefold else h.strip() for h in header]
    if len(names) == 1:
        for other, shown in SEPARATORS.items():
            if other != sep and other in names[0]:
                raise UserError(
                    f"{path}: the header reads as one column with {SEPARATORS[sep]} as the "
                    f"separator, but it holds {shown}s; save the file {SEPARATORS[sep]}-separated"
                )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise UserError(
                f"{path}: duplicate column {name!r} (columns {seen[name] + 1} and {i + 1}); "
                "every column needs its own name"
            )
        seen[name] = i
