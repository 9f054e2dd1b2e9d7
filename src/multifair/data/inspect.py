"""`multifair data inspect ROOT`: what a dataset holds and everything wrong with it.

Reads one file at a time (scalars and array headers; `deep=True` also decodes every array),
so a 10,000-subject tree is inspected without loading it into memory. Reports counts per
split, label balance per attribute group, the shapes and dtypes seen, and every problem
found (per file: each missing key, bad value or unreadable member).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from multifair.console import bars_enabled
from multifair.data.config import (
    DEFAULT_CLASSES,
    SPLITS,
    ClassSpec,
    DataConfig,
    load_data_config,
    make_class_spec,
)
from multifair.data.formats import (
    ATTRIBUTE_KEYS,
    ATTRIBUTES,
    GROUP_NAMES,
    BadFile,
    BadValue,
    NpzReader,
    attribute_code,
    csv_stem,
    label_value,
    read_csv,
    split_folders,
    subject_files,
)
from multifair.data.intersections import is_intersection
from multifair.data.transforms import fundus_uint8, oct_uint8
from multifair.errors import UserError

SKEW_LIMIT = 2.0  # |skew| above this flags a numeric column for a transform
MISSINGNESS_P = 0.01  # chi-square p below this (and a >= 5-point spread) flags a modality
MISSINGNESS_SPREAD = 0.05


def detect_kind(root: Path) -> str:
    """fairvision or fairvlmed, from the first npz's keys (OCT volume vs note)."""
    from multifair.data.fairvision import _child

    candidates = [root]
    for name in ("Glaucoma", "Dataset"):
        child = _child(root, name)
        if child is not None:
            candidates += [child, _child(child, "Dataset")]
    for base in candidates:
        if base is None:
            continue
        for folder in split_folders(base).values():
            for path in subject_files(folder)[:1]:
                try:
                    with NpzReader(path) as z:
                        if z.has("oct_bscans"):
                            return "fairvision"
                        if z.has("note"):
                            return "fairvlmed"
                except BadFile:
                    continue
    raise UserError(
        f"{root}: cannot tell the dataset kind (no readable data_xxxxx.npz with oct_bscans or "
        "note in a split folder); pass --kind"
    )


def _inspect_file(
    path: Path,
    fmt: Any,
    label_key: str,
    deep: bool,
    image_size: int,
    slices: int,
    classes: ClassSpec | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One file's label (a class index with `classes`), codes, array headers; every problem
    found (not only the first)."""
    problems: list[dict[str, Any]] = []
    info: dict[str, Any] = {"label": None, "codes": {}, "arrays": {}, "absent": []}

    def problem(key: str | None, message: str) -> None:
        problems.append({"file": str(path), "key": key, "problem": message})

    try:
        z = NpzReader(path)
    except BadFile as exc:
        problem(None, exc.message)
        return info, problems
    with z:
        if not z.has(label_key):
            problem(label_key, "missing key")
        else:
            try:
                raw = z.scalar(label_key)
                info["label"] = (
                    label_value(raw, label_key) if classes is None else classes.index(raw)
                )
            except (BadFile, BadValue) as exc:
                problem(label_key, exc.message)
            except ValueError as exc:  # a value outside data.classes
                problem(label_key, str(exc))
        for attribute in ATTRIBUTES:
            key = z.first_key(ATTRIBUTE_KEYS[attribute])
            if key is None:
                continue
            try:
                info["codes"][attribute] = attribute_code(attribute, z.scalar(key), key)
            except (BadFile, BadValue) as exc:
                problem(key, exc.message)
        for modality, (kind, key) in fmt.modalities.items():
            if kind == "text":
                if not z.has("note"):
                    problem("note", "missing key")
                    continue
                try:
                    shape, dtype = z.header("note")
                    if dtype.kind not in "US":
                        problem("note", f"expected a string, got dtype {dtype}")
                    else:
                        info["note_len"] = len(str(z.scalar("note")).strip())
                except BadFile as exc:
                    problem("note", exc.message)
                continue
            if not z.has(key):
                # a missing modality (data.missing_modalities: mask, the default), not a
                # problem of the file; counted per split and group below
                info["absent"].append(modality)
                continue
            try:
                shape, dtype = z.header(key)
            except BadFile as exc:
                problem(key, exc.message)
                continue
            info["arrays"][key] = (tuple(shape), str(dtype))
            from multifair.data.subjects import _check_header

            bad = _check_header(kind, shape, dtype)
            if bad:
                problem(key, bad)
                continue
            if deep:
                try:
                    arr = z.array(key)
                    if kind == "image":
                        fundus_uint8(arr, image_size, key)
                    else:
                        oct_uint8(arr, slices, image_size, key)
                except BadFile as exc:
                    problem(key, exc.message)
                except BadValue as exc:
                    problem(key, exc.message)
    return info, problems


def inspect_tree(
    root: Path,
    kind: str | None = None,
    deep: bool = False,
    splits: Sequence[str] = SPLITS,
    disease: str = "Glaucoma",
    label_key: str = "glaucoma",
    image_size: int = 224,
    oct_slices: int = 10,
    progress: bool = True,
    classes: ClassSpec | None = None,
) -> dict[str, Any]:
    """Inspect a FairVision/FairVLMed tree. Returns a JSON-able report. With `classes` (or a
    label_key with a preset, e.g. amd_condition) labels are class indices and "positives"
    counts the files outside the first class."""
    if classes is None and label_key in DEFAULT_CLASSES:
        classes = make_class_spec(DEFAULT_CLASSES[label_key])
    from multifair.data import fairvision, fairvlmed

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    kind = kind or detect_kind(root)
    report: dict[str, Any] = {"kind": kind, "root": str(root), "splits": {}, "problems": []}
    # locate without failing on empty/missing splits: inspect reports them as problems
    if kind == "fairvision":
        disease_dir = fairvision._child(root, disease)
        candidates = [
            fairvision._child(disease_dir, "Dataset") if disease_dir else None,
            disease_dir,
            fairvision._child(root, "Dataset"),
            root,
        ]
        fmt = fairvision.FORMAT
    else:
        candidates = [root, fairvision._child(root, "Dataset")]
        fmt = fairvlmed.FORMAT
    base = next((b for b in candidates if b is not None and split_folders(b)), None)
    if base is None:
        raise UserError(f"{root}: no split folders (Training/Validation/Test or train/val/test)")
    folders = split_folders(base)
    report["base"] = str(base)
    try:
        located = (
            fairvision.locate(root, disease, [s for s in splits if s in folders])
            if kind == "fairvision"
            else fairvlmed.locate(root, [s for s in splits if s in folders])
        )
        report["csvs"] = {k: str(v) for k, v in located.csvs.items()}
    except UserError as exc:
        report["csvs"] = {}
        report["problems"].append({"file": str(base), "key": None, "problem": str(exc)})
    shapes: Counter[str] = Counter()
    labels_by_id: dict[str, int] = {}
    for split in splits:
        if split not in folders:
            report["problems"].append(
                {"file": str(base), "key": None, "problem": f"no {split} split folder"}
            )
            continue
        files = subject_files(folders[split])
        entry: dict[str, Any] = {
            "folder": str(folders[split]),
            "files": len(files),
            "readable": 0,
            "positives": 0,
            "negatives": 0,
            "attributes": {},
        }
        if not files:
            report["problems"].append(
                {"file": str(folders[split]), "key": None, "problem": "empty split folder"}
            )
        groups: dict[str, Counter[tuple[int, int]]] = {a: Counter() for a in ATTRIBUTES}
        absent: dict[str, Counter[str]] = {}  # modality -> race group name -> files lacking it
        notes = Counter()
        for path in tqdm(
            files, desc=f"inspect {split}", disable=not bars_enabled(progress), leave=False
        ):
            info, problems = _inspect_file(
                path, fmt, label_key, deep, image_size, oct_slices, classes
            )
            report["problems"].extend(problems)
            for key, (shape, dtype) in info["arrays"].items():
                shapes[f"{key} {list(shape)} {dtype}"] += 1
            if "note_len" in info:
                notes[
                    "empty (-> fallback)"
                    if info["note_len"] == 0
                    else "short <10 (-> fallback)"
                    if info["note_len"] < 10
                    else "ok"
                ] += 1
            if problems:
                continue
            for modality in info["absent"]:
                race = GROUP_NAMES["race"].get(info["codes"].get("race", -1), "unknown")
                absent.setdefault(modality, Counter())[race] += 1
            entry["readable"] += 1
            y = info["label"]
            labels_by_id[path.stem] = y
            entry["positives" if y >= 1 else "negatives"] += 1
            for a, code in info["codes"].items():
                groups[a][(code, min(y, 1))] += 1  # multi-class: any stage beyond the first
        for a, counts in groups.items():
            if not counts:
                continue
            table = {}
            for code in sorted({c for c, _ in counts}):
                name = GROUP_NAMES[a].get(code, "unknown")
                n_pos, n_neg = counts[(code, 1)], counts[(code, 0)]
                table[name] = {"n": n_pos + n_neg, "positives": n_pos}
            entry["attributes"][a] = table
        if notes:
            entry["notes"] = dict(notes)
        if absent:
            entry["missing_modalities"] = {m: dict(c) for m, c in absent.items()}
        report["splits"][split] = entry
    report["shapes"] = dict(shapes)
    csv_path = report.get("csvs", {}).get("summary")
    if csv_path:
        report["csv"] = _check_csv(Path(csv_path), labels_by_id, kind)
    return report


def _check_csv(path: Path, labels: dict[str, int], kind: str) -> dict[str, Any]:
    frame = read_csv(path)
    out: dict[str, Any] = {"file": str(path), "rows": len(frame)}
    if "filename" not in frame.columns:
        out["problem"] = f"column 'filename' not found (columns: {list(frame.columns)})"
        return out
    stems = [csv_stem(f) for f in frame["filename"]]
    out["npz_without_row"] = len(set(labels) - set(stems))
    if "age" in frame.columns:
        ages = []
        for raw in frame["age"]:
            try:
                ages.append(float(raw))
            except ValueError:
                ages.append(math.nan)
        out["age_missing"] = int(np.isnan(np.asarray(ages)).sum())
    if "glaucoma" in frame.columns:
        disagree = 0
        for stem, raw in zip(stems, frame["glaucoma"]):
            try:
                if stem in labels and label_value(raw, "glaucoma") != labels[stem]:
                    disagree += 1
            except BadValue:
                disagree += 1
        out["label_disagrees_with_npz"] = disagree
    return out


def suggest_transform(values: pd.Series) -> tuple[float | None, str | None]:
    """(sample skewness, suggested transform or None) of a numeric column's observed values:
    |skew| > 2 with no negative value -> log1p, other |skew| > 2 -> rank."""
    x = pd.to_numeric(values, errors="coerce").dropna()
    if len(x) < 3 or x.nunique() < 3:
        return None, None
    skew = float(x.skew())
    if abs(skew) <= SKEW_LIMIT:
        return skew, None
    return skew, "log1p" if skew > 0 and x.min() >= 0 else "rank"


def group_missingness(
    frame: pd.DataFrame, cfg: DataConfig, attributes: Sequence[str]
) -> dict[str, Any]:
    """Per attribute and modality, per group: rows with a missing value (share), missing cells
    (share), and a chi-square test of rows-with-a-missing-value against group. Missingness
    that differs by group is itself a fairness finding (the model sees less of some groups)."""
    from scipy.stats import chi2_contingency

    from multifair.data.table import _attribute_codes, _attribute_spec, _raw_key, fit_attribute

    out: dict[str, Any] = {}
    for a in attributes:
        spec = _attribute_spec(cfg, a)
        values = frame[spec.column].tolist()
        fitted = fit_attribute(values, spec)
        codes, _ = _attribute_codes(values, spec, fitted)
        out[a] = {}
        for m, mod in cfg.columns.items():
            columns = mod.columns if mod.kind == "tabular" else [mod.column]
            cells = np.array([[_raw_key(v) is None for v in frame[c].tolist()] for c in columns]).T
            rows = cells.any(axis=1)
            groups, counts = {}, []
            for code, name in fitted["names"].items():
                sel = codes == int(code)
                if not sel.any():
                    continue
                groups[str(name)] = {
                    "n": int(sel.sum()),
                    "rows": float(rows[sel].mean()),
                    "cells": float(cells[sel].mean()),
                }
                counts.append([int(rows[sel].sum()), int((~rows[sel]).sum())])
            table = np.array(counts)
            p = 1.0
            if len(counts) > 1 and table[:, 0].sum() > 0 and table[:, 1].sum() > 0:
                p = float(chi2_contingency(table).pvalue)
            shares = [g["rows"] for g in groups.values()]
            spread = max(shares) - min(shares) if shares else 0.0
            differs = p < MISSINGNESS_P and spread >= MISSINGNESS_SPREAD
            out[a][m] = {"groups": groups, "p": p, "differs": bool(differs)}
    return out


def inspect_table(cfg: DataConfig) -> dict[str, Any]:
    """Inspect a table config: sentinel cells, columns as read (type, missing, skew and a
    suggested transform), split sizes, label balance, missingness by group, bad rows."""
    from multifair.data import build_data
    from multifair.data.table import _column_type, _frames, apply_missing_values

    frame, _, source, _ = _frames(cfg, SPLITS)
    frame, sentinels = apply_missing_values(frame, cfg)
    report: dict[str, Any] = {
        "kind": "table",
        "root": source,
        "rows": len(frame),
        "missing_values": sentinels,
        "splits": {},
        "columns": {},
        "problems": [],
    }
    for m, mod in cfg.columns.items():
        for c in mod.columns if mod.kind == "tabular" else [mod.column]:
            if c in frame.columns:
                tabular = mod.kind == "tabular"
                kind = _column_type(frame[c], c in mod.categorical) if tabular else mod.kind
                entry = {"modality": m, "type": kind, "missing": int(frame[c].isna().sum())}
                if tabular and kind == "numeric":
                    entry["skew"], suggestion = suggest_transform(frame[c])
                    if c in mod.transforms:
                        entry["transform"] = mod.transforms[c].kind
                    elif suggestion is not None:
                        entry["suggest"] = suggestion
                report["columns"][c] = entry
    bundle = build_data(cfg.model_copy(update={"skip_bad": True}))
    report["problems"] = list(bundle.skipped)
    for split, ds in bundle.datasets.items():
        y = bundle.labels(split)
        entry = {
            "files": len(ds),
            "readable": len(ds),
            "positives": int(y.sum()),
            "negatives": int((y == 0).sum()),
            "attributes": {},
        }
        for a in bundle.attributes:
            codes = bundle.groups(split, a)
            table = {}
            for code in sorted(set(codes.tolist())):
                sel = codes == code
                name = bundle.group_names[a].get(code, "unknown")
                table[name] = {"n": int(sel.sum()), "positives": int(y[sel].sum())}
            entry["attributes"][a] = table
        report["splits"][split] = entry
    report["shapes"] = {m: f"{s.kind} {list(s.shape)}" for m, s in bundle.modalities.items()}
    if any(s.kind in ("image", "volume") for s in bundle.modalities.values()):
        report["image_cache"] = (
            "used (the memory-mapped uint8 cache is valid)"
            if bundle.source == "cache"
            else "not used: files decoded per sample (`multifair data prepare CONFIG` builds it)"
        )
    single = [a for a in bundle.attributes if not is_intersection(a)]  # columns of the table
    report["missingness"] = group_missingness(frame, cfg, single)
    return report


def inspect_path(
    path: str | Path, kind: str | None = None, deep: bool = False, progress: bool = True
) -> dict[str, Any]:
    """A dataset folder, or a YAML data config (any kind)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        cfg = load_data_config(p)
        if cfg.kind == "table":
            return inspect_table(cfg)
        assert cfg.root is not None
        return inspect_tree(
            cfg.root,
            cfg.kind,
            deep,
            disease=cfg.disease,
            label_key=cfg.label_key,
            image_size=cfg.image_size,
            oct_slices=cfg.oct_slices,
            progress=progress,
            classes=cfg.class_spec(),
        )
    return inspect_tree(p, kind, deep, progress=progress)


def format_report(report: dict[str, Any], max_problems: int = 20) -> str:
    """Human-readable lines."""
    lines = [f"{report['kind']}: {report['root']}"]
    if report.get("base"):
        lines.append(f"  split folders under {report['base']}")
    for name, file in report.get("csvs", {}).items():
        lines.append(f"  csv ({name}): {file}")
    for split, e in report["splits"].items():
        total = e["positives"] + e["negatives"]
        rate = e["positives"] / total if total else float("nan")
        lines.append(
            f"{split}: {e['files']} files, {e['readable']} usable, "
            f"{e['positives']} positive ({rate:.1%})"
        )
        for a, table in e["attributes"].items():
            parts = [
                f"{g} {v['n']} ({v['positives'] / v['n']:.0%} pos)" if v["n"] else f"{g} 0"
                for g, v in table.items()
            ]
            lines.append(f"  {a}: " + ", ".join(parts))
        if e.get("notes"):
            lines.append(f"  notes: {e['notes']}")
        race = e["attributes"].get("race", {})
        for modality, by_race in e.get("missing_modalities", {}).items():
            order = [g for g in race if g in by_race] + [g for g in by_race if g not in race]
            parts = [
                f"{g} {by_race[g]} of {race[g]['n']}" if g in race else f"{g} {by_race[g]}"
                for g in order
            ]
            lines.append(
                f"  missing {modality} (no array; a missing modality): "
                f"{sum(by_race.values())} - by race: " + ", ".join(parts)
            )
    if report.get("shapes"):
        lines.append("shapes and dtypes:")
        lines.extend(f"  {k}: {v}" for k, v in report["shapes"].items())
    lines.extend(_table_lines(report))
    if report.get("csv"):
        lines.append(f"csv check: {report['csv']}")
    problems = report["problems"]
    lines.append(f"problems: {len(problems)}")
    for p in problems[:max_problems]:
        key = f" key {p['key']!r}" if p.get("key") else ""
        lines.append(f"  {p['file']}{key}: {p['problem']}")
    if len(problems) > max_problems:
        lines.append(f"  ... {len(problems) - max_problems} more (see --json)")
    return "\n".join(lines)


def _table_lines(report: dict[str, Any]) -> list[str]:
    """The table-only parts of a report: sentinels, columns, suggested transforms, missingness
    by group."""
    from multifair.data.table import describe_sentinel

    lines = [f"image cache: {report['image_cache']}"] if report.get("image_cache") else []
    if report.get("missing_values"):
        lines.append("missing_values:")
        lines.extend(f"  {describe_sentinel(count)}" for count in report["missing_values"])
    if report.get("columns"):
        lines.append("columns:")
        for c, v in report["columns"].items():
            skew = f", skew {v['skew']:.1f}" if v.get("skew") is not None else ""
            done = f" ({v['transform']})" if v.get("transform") else ""
            lines.append(f"  {c}: {v['modality']}, {v['type']}, {v['missing']} missing{skew}{done}")
    suggested: dict[str, list[str]] = {}
    for c, v in report.get("columns", {}).items():
        if v.get("suggest"):
            suggested.setdefault(v["modality"], []).append(f"{c}: {v['suggest']}")
    if suggested:
        lines.append(f"skewed columns (|skew| > {SKEW_LIMIT:g}); suggested config lines:")
        for m, items in suggested.items():
            lines.append(f"  columns.{m}.transforms: {{{', '.join(items)}}}")
    for a, modalities in report.get("missingness", {}).items():
        for m, e in modalities.items():
            if not any(g["rows"] for g in e["groups"].values()):
                continue
            parts = ", ".join(
                f"{g} {v['rows']:.0%} ({v['cells']:.0%} of cells)" for g, v in e["groups"].items()
            )
            flag = f"  <- differs by group (chi-square p={e['p']:.1g})" if e["differs"] else ""
            lines.append(f"missing {m} by {a}: rows {parts}{flag}")
    return lines
