"""Intersectional attributes (`data.attribute: race*gender`), built once for every loader.

A loader reads the single attributes (`race`, `gender`) as usual; this module turns them into
the intersection's codes, so every group-level method, the selection by ES-AUC and every
report see `race*gender` as one more attribute with groups named like `Black|Female`. A
sample whose part is unknown (-1) is unknown in the intersection.

The minimum group size rule (`data.min_group_size`, counted on the TRAINING split only, and
applied to every split alike): an intersection group with fewer training samples is not
trained as its own group; its first attribute keeps it. Per value of the first attribute:
- the groups with at least `min_group_size` training samples are groups of their own;
- the smaller ones are pooled into `<value>|other` (e.g. `Asian|other`: Asian patients of the
  small gender groups), together with the combinations never seen in training (0 samples);
- when no group of the value is large enough, or its small groups are too few even pooled,
  every group of the value becomes one, `<value>|*` (all Asian patients: what training on
  the first attribute alone would use).
Nobody becomes unknown (a group-level method still sees each patient's first attribute), no
group is smaller than the limit unless the first attribute's own group is, and val, test and
new data always map to a group fitted on training.

The fitted rule is JSON (`bundle.intersections`, stored in `bundle.state()`), so `evaluate` and
`predict` on new data reuse the training split's groups exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from multifair.errors import UserError
from multifair.metrics.fairness import UNKNOWN
from multifair.metrics.groups import ATTRIBUTE_SEP, GROUP_SEP, group_name, intersect

PART_SEP = ATTRIBUTE_SEP  # between attribute names: race*gender
NAME_SEP = GROUP_SEP  # between group names: Black|Female
POOL = "other"  # <value>|other: the small groups of one first-attribute value
WHOLE = "*"  # <value>|*: every group of that value


def parts(attribute: str) -> list[str]:
    """`race*gender` -> ["race", "gender"]; a single attribute -> [attribute]."""
    return [p.strip() for p in attribute.split(PART_SEP)]


def is_intersection(attribute: str) -> bool:
    return PART_SEP in attribute


def check_syntax(attribute: str) -> str:
    """The attribute name with blanks around `*` removed; a ValueError (a config error naming
    the key) for `race*`, `race*race` and the like."""
    names = parts(attribute)
    if any(not n for n in names):
        raise ValueError(f"{attribute!r} has an empty part (write e.g. race*gender)")
    if len(set(names)) != len(names):
        raise ValueError(f"{attribute!r} names an attribute twice")
    return PART_SEP.join(names)


def base_attributes(attributes: Iterable[str]) -> list[str]:
    """The single attributes a list of (possibly intersectional) attributes needs, in order."""
    return list(dict.fromkeys(p for a in attributes for p in parts(a)))


def evaluated(train_attribute: str, chosen: Sequence[str]) -> list[str]:
    """The evaluated attributes: `chosen`, the training attribute first when missing, and the
    parts of an intersectional training attribute (the single attributes stay evaluated)."""
    out = list(chosen)
    if train_attribute not in out:
        out.insert(0, train_attribute)
    for p in parts(train_attribute) if is_intersection(train_attribute) else []:
        if p not in out:
            out.append(p)
    return out


def check_parts(
    attribute: str,
    attributes: Iterable[str] | None,
    valid: Sequence[str],
    also: Collection[str] = (),
) -> None:
    """`data.attribute` and `data.attributes`: one line naming the key, the bad name and the
    valid attribute names (`also`: names accepted without being listed, e.g. table columns)."""
    keyed = [("data.attribute", attribute)] + [("data.attributes", a) for a in attributes or []]
    for key, attribute in keyed:
        if not is_intersection(attribute):
            continue
        for p in parts(attribute):
            if p not in valid and p not in also:
                more = ", or a column of the table" if also else ""
                raise UserError(
                    f"{key}: {p!r} in {attribute!r} is not an attribute of this data "
                    f"(valid: {list(valid)}{more})"
                )


def raw_codes(attribute: str, codes: Mapping[str, np.ndarray]) -> np.ndarray:
    """Codes of every combination seen (no size rule): what a table's seeded split stratifies
    by and what `data.unknown` tests; a single attribute's own codes."""
    if not is_intersection(attribute):
        return np.asarray(codes[attribute], dtype=np.int64)
    return intersect(codes, parts(attribute))[1]


def fit(
    attribute: str,
    train_codes: Mapping[str, np.ndarray],
    group_names: Mapping[str, Mapping[int, str]],
    min_group_size: int,
) -> dict[str, Any]:
    """The groups of one intersection from the training split's codes (JSON-able):
    {"parts", "min_group_size", "names": {code: name}, "lookup": [[c_1, ..., c_A, code], ...]
    over every combination of the parts' vocabularies, "train_counts": {name: n},
    "merged": [{"group", "n", "into"}]}."""
    names_of = parts(attribute)
    stacked = np.stack([np.asarray(train_codes[p], dtype=np.int64) for p in names_of], 1)  # (N, A)
    stacked = stacked[(stacked != UNKNOWN).all(axis=1)]
    vocab = [sorted(int(c) for c in group_names[p]) for p in names_of]
    combos = list(itertools.product(*vocab))
    counts = {c: int((stacked == np.asarray(c)).all(axis=1).sum()) for c in combos}

    def label(combo: Sequence[int]) -> str:
        return NAME_SEP.join(group_name(c, group_names[p]) for p, c in zip(names_of, combo))

    # group key per combination: the combination itself, its first value's pool, or its value
    key: dict[tuple[int, ...], tuple] = {}
    merged = []
    for first in vocab[0]:
        own = [c for c in combos if c[0] == first]
        # combinations never seen in training (0) never force a merge; they join the pool
        big = [c for c in own if counts[c] >= max(min_group_size, 1)]
        small = [c for c in own if 0 < counts[c] < min_group_size]
        # no group of the value is large enough, or its small ones are too few even together
        whole = not big or (bool(small) and sum(counts[c] for c in small) < min_group_size)
        for c in own:
            key[c] = (first, 2) if whole else (first, 0, *c[1:]) if c in big else (first, 1)
        first_name = group_name(first, group_names[names_of[0]])
        into = NAME_SEP.join([first_name, WHOLE if whole else POOL])
        for c in own if whole else small:
            if counts[c] > 0:  # a combination never seen in training simply maps there
                merged.append({"group": label(c), "n": counts[c], "into": into})
    order = sorted(set(key.values()))
    code_of = {k: i for i, k in enumerate(order)}
    names: dict[int, str] = {}
    train_counts: dict[str, int] = {}
    for c in combos:
        code = code_of[key[c]]
        k = key[c]
        first_name = group_name(c[0], group_names[names_of[0]])
        names[code] = (
            label(c) if k[1] == 0 else NAME_SEP.join([first_name, (POOL, WHOLE)[k[1] - 1]])
        )
        train_counts[names[code]] = train_counts.get(names[code], 0) + counts[c]
    return {
        "parts": names_of,
        "min_group_size": int(min_group_size),
        "names": {str(code): names[code] for code in sorted(names)},
        "lookup": [[*c, code_of[key[c]]] for c in combos],
        "train_counts": {names[code]: train_counts[names[code]] for code in sorted(names)},
        "merged": merged,
    }


def apply(fitted: Mapping[str, Any], codes: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N,) int64 codes of the fitted intersection; -1 where any part is unknown."""
    stacked = np.stack([np.asarray(codes[p], dtype=np.int64) for p in fitted["parts"]], 1)
    lookup = {tuple(row[:-1]): row[-1] for row in fitted["lookup"]}
    out = np.full(len(stacked), UNKNOWN, dtype=np.int64)
    for i, row in enumerate(map(tuple, stacked.tolist())):
        if UNKNOWN not in row:
            out[i] = lookup[row]  # every combination of the vocabularies is in the lookup
    return out


def names(fitted: Mapping[str, Any]) -> dict[int, str]:
    return {int(code): name for code, name in fitted["names"].items()}


def merge_lines(attribute: str, fitted: Mapping[str, Any]) -> list[str]:
    """One line per group that the size rule merged, e.g. "race*gender: Asian|Male has 12
    training samples < 30: merged into Asian|other"."""
    limit = fitted["min_group_size"]
    lines = []
    for m in fitted["merged"]:
        if m["n"] < limit:
            why = f"has {m['n']} training samples < {limit}"
        else:  # a large group whose value's other groups are too small even together
            why = (
                f"has {m['n']} training samples, but the smaller groups of its first attribute "
                f"stay < {limit} even together"
            )
        lines.append(f"{attribute}: {m['group']} {why}: merged into {m['into']}")
    return lines


def build(
    attributes: Sequence[str],
    codes: Mapping[str, Mapping[str, np.ndarray]],
    group_names: Mapping[str, Mapping[int, str]],
    min_group_size: int,
    saved: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fit (or reuse from `saved`, a previous bundle's `intersections`) every intersectional
    attribute in `attributes`; `codes` maps split -> attribute -> codes and must hold "train"
    unless `saved` has them all. Prints one line per merged group."""
    out: dict[str, dict[str, Any]] = {}
    for attribute in attributes:
        if not is_intersection(attribute):
            continue
        if saved is not None and attribute in saved:
            out[attribute] = dict(saved[attribute])
            continue
        if "train" not in codes:
            raise UserError(
                f"data.attribute(s): {attribute!r} needs the training split's group sizes "
                "(data.min_group_size); load the train split or the run's saved data state"
            )
        out[attribute] = fit(attribute, codes["train"], group_names, min_group_size)
        for line in merge_lines(attribute, out[attribute]):
            print(line, flush=True)  # the user must see it, whatever the logging set-up
    return out
