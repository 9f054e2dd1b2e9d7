"""Group codes: turning attribute columns (strings or integers) into the integer codes the
metrics take, and building intersectional attributes such as race x gender."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from multifair.errors import UserError
from multifair.metrics.fairness import UNKNOWN

__all__ = ["UNKNOWN_NAME", "encode_groups", "group_name", "intersect"]

UNKNOWN_NAME = "unknown"


def group_name(code: int, names: Mapping[int, str] | None) -> str:
    """The display name of a group code: its given name, "unknown" for -1, else the code."""
    if names is not None and int(code) in names:
        return str(names[int(code)])
    return UNKNOWN_NAME if int(code) == UNKNOWN else str(int(code))


def encode_groups(
    values: Sequence | np.ndarray | pd.Series, *, label: str = "groups"
) -> tuple[np.ndarray, dict[int, str]]:
    """Attribute values -> (codes (n,) int64, {code: name}).

    Integer values are kept as codes (-1 = unknown). Strings become codes 0..G-1 in sorted order
    of the distinct strings, so the groups are "the sorted distinct values". Missing values (NaN,
    empty strings) are unknown (-1). `label` names the column in error messages."""
    series = pd.Series(values)
    missing = series.isna().to_numpy() | (series.astype(str).str.strip() == "").to_numpy()
    present = series[~missing]
    numeric = pd.to_numeric(present, errors="coerce")
    if len(present) and not numeric.isna().any():
        as_float = numeric.to_numpy(dtype=np.float64)
        if not np.all(as_float == np.round(as_float)):
            i = int(np.flatnonzero(as_float != np.round(as_float))[0])
            raise UserError(
                f"{label}: value {present.iloc[i]} is neither an integer code nor a group name"
            )
        codes = np.full(len(series), UNKNOWN, dtype=np.int64)
        codes[~missing] = as_float.astype(np.int64)
        if (codes < UNKNOWN).any():
            bad = int(codes[codes < UNKNOWN][0])
            raise UserError(f"{label}: code {bad} is invalid (codes are >= 0, or -1 for unknown)")
        return codes, {int(c): str(int(c)) for c in np.unique(codes) if c != UNKNOWN}
    text = present.astype(str).str.strip()
    names = sorted(text.unique())
    lookup = {name: k for k, name in enumerate(names)}
    codes = np.full(len(series), UNKNOWN, dtype=np.int64)
    codes[~missing] = text.map(lookup).to_numpy(dtype=np.int64)
    return codes, dict(enumerate(names))


ATTRIBUTE_SEP = "*"  # between attribute names: race*gender (as data.attribute spells it)
GROUP_SEP = "|"  # between group names: Black|Female


def intersect(
    sensitive_features: Mapping[str, object],
    attributes: Sequence[str],
    group_names: Mapping[str, Mapping[int, str]] | None = None,
    *,
    sep: str = GROUP_SEP,
) -> tuple[str, np.ndarray, dict[int, str]]:
    """An intersectional attribute from several: ("race*gender", codes (n,), {code: "White|Female"})
    (the attribute named as `data.attribute` spells it for training).

    A sample is unknown (-1) when any of its attributes is unknown. Codes follow the sorted order
    of the code tuples, so they are deterministic."""
    if len(attributes) < 2:
        raise UserError(f"intersecting needs at least two attributes, got {list(attributes)}")
    missing = [a for a in attributes if a not in sensitive_features]
    if missing:
        raise UserError(
            f"cannot intersect: no attribute {missing[0]!r}; available: {sorted(sensitive_features)}"
        )
    columns = [np.asarray(sensitive_features[a], dtype=np.int64) for a in attributes]
    stacked = np.stack(columns, axis=1)  # (n, A)
    known = (stacked != UNKNOWN).all(axis=1)
    combos, inverse = np.unique(stacked[known], axis=0, return_inverse=True)
    codes = np.full(len(stacked), UNKNOWN, dtype=np.int64)
    codes[known] = inverse.reshape(-1)
    names = {}
    for k, combo in enumerate(combos):
        parts = [group_name(c, (group_names or {}).get(a)) for a, c in zip(attributes, combo)]
        names[k] = sep.join(parts)
    return ATTRIBUTE_SEP.join(attributes), codes, names
