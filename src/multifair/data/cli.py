"""`multifair data synth | inspect | prepare`.

    multifair data synth fairvision|fairvlmed|table OUT [--size small|full] [--scenario ...] [knobs]
    multifair data inspect ROOT|CONFIG.yaml [--kind ...] [--deep] [--json FILE]
    multifair data prepare ROOT|CONFIG.yaml [CACHE] [--image-size 224] [--oct-slices 10] [--workers 2]

`inspect` exits 1 when it found problems (0 when clean), so scripts can gate on it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from multifair.errors import UserError


def _per_modality(items: list[str], flag: str, letter: str) -> dict[str, list[float]]:
    """`MODALITY=X` or `MODALITY=X,X,X` items (one value, or one per race group) -> a dict."""
    out = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep:
            raise UserError(
                f"{flag} {item!r}: expected MODALITY={letter} or MODALITY={letter},{letter},{letter}"
            )
        try:
            out[name.strip()] = _floats(values)
        except argparse.ArgumentTypeError as exc:
            raise UserError(f"{flag} {item!r}: {exc}") from None
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data",
        help="make synthetic data, inspect a dataset, prepare the preprocessing cache",
        description="Synthetic data in the real formats, dataset inspection, and the uint8 cache.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=run)

    synth = sub.add_parser("synth", help="write a synthetic dataset in a real on-disk format")
    synth.add_argument("flavour", choices=["fairvision", "fairvlmed", "table"])
    synth.add_argument("out", type=Path)
    synth.add_argument(
        "--size",
        choices=["small", "full"],
        default="small",
        help="small: ~1,500 subjects, 64 px fundus, 16x64x64 OCT; full: the real sizes",
    )
    synth.add_argument(
        "--scenario", choices=["main", "neutral", "minority_pattern"], default="main"
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n", type=int, help="number of subjects (default by --size)")
    synth.add_argument(
        "--group-mix", type=_floats, help="race shares Asian,Black,White (default 0.10,0.15,0.75)"
    )
    synth.add_argument("--pos-rate", type=float, help="share of positives (default 0.5)")
    synth.add_argument(
        "--classes",
        dest="n_classes",
        type=int,
        help="K > 2: a K-class (ordered stage) label instead of 0/1 (default 2)",
    )
    synth.add_argument(
        "--signal",
        action="append",
        default=[],
        metavar="MODALITY=D[,D,D]",
        help="label signal d' of a modality, one value or per race group (repeatable)",
    )
    synth.add_argument(
        "--missing",
        action="append",
        default=[],
        metavar="MODALITY=R[,R,R]",
        help="share of samples lacking a modality, one rate or per race group Asian,Black,White "
        "(repeatable); the files really lack it",
    )
    synth.add_argument(
        "--unknown-rate", type=float, help="-1 rate of ethnicity/language/maritalstatus"
    )
    synth.add_argument("--race-unknown-rate", type=float)
    synth.add_argument(
        "--degenerate", metavar="ATTR=CODE", help="make one group single-class (label 0)"
    )
    synth.add_argument("--fundus-dtype", choices=["uint8", "float32", "float64"])
    synth.add_argument(
        "--race-codes", choices=["int", "legacy"], help="legacy: race stored as strings"
    )
    synth.add_argument(
        "--layout", choices=["readme", "renamed", "dataset"], help="fairvision folders"
    )
    synth.add_argument("--test-name", help="test folder spelling (Test, Testing, test)")
    synth.add_argument("--split", type=_floats, help="train,val,test fractions")
    synth.add_argument(
        "--compress", action="store_true", help="np.savez_compressed instead of np.savez"
    )
    synth.add_argument("--csv-bom", action="store_true", help="write the CSVs as UTF-8 with BOM")
    synth.add_argument(
        "--slo-jpg", action="store_true", help="fairvision: slo_xxxxx.jpg beside each npz"
    )
    synth.add_argument("--empty-note-rate", type=float)
    synth.add_argument(
        "--table-order",
        type=int,
        choices=[2, 3],
        help="table B: XOR over column pairs (2, learnt fast) or triples (3, default)",
    )
    synth.add_argument(
        "--oct-region",
        choices=["band", "slice"],
        help="OCT signal in the retina band (default; for 64 px, 10 slices) or the whole slice",
    )
    synth.add_argument(
        "--oct-tilt", type=float, help="max OCT texture tilt in radians (default 0.45)"
    )
    synth.add_argument("--fundus-shape", type=_ints, help="H,W")
    synth.add_argument("--oct-shape", type=_ints, help="D,H,W")
    synth.add_argument("--force", action="store_true", help="replace OUT if it is not empty")

    insp = sub.add_parser("inspect", help="counts, label balance per group, shapes, problems")
    insp.add_argument("root", type=Path, help="dataset folder, or a YAML data config (any kind)")
    insp.add_argument("--kind", choices=["fairvision", "fairvlmed"], help="default: detected")
    insp.add_argument("--deep", action="store_true", help="also decode every array (slower)")
    insp.add_argument("--json", type=Path, help="write the full report here")
    insp.add_argument(
        "--max-problems", type=int, default=20, help="problems printed (all go to --json)"
    )

    prep = sub.add_parser("prepare", help="write the memory-mapped uint8 preprocessing cache")
    prep.add_argument("root", type=Path, help="dataset folder, or a YAML data config")
    prep.add_argument(
        "cache",
        type=Path,
        nargs="?",
        help="cache folder (default ROOT/.multifair_cache; a table: beside the table file)",
    )
    prep.add_argument("--kind", choices=["fairvision", "fairvlmed"], help="default: detected")
    prep.add_argument("--image-size", type=int, help="default 224 (or the config's)")
    prep.add_argument("--oct-slices", type=int, help="default 10 (or the config's)")
    prep.add_argument("--splits", default="train,val,test")
    prep.add_argument("--workers", type=int, default=2, help="reader processes")
    prep.add_argument("--skip-bad", action="store_true", help="record bad files and go on")
    prep.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    action = getattr(args, "data_command", None)
    if action == "synth":
        return _synth(args)
    if action == "inspect":
        return _inspect(args)
    if action == "prepare":
        return _prepare(args)
    raise UserError("data: give an action: synth, inspect or prepare (see multifair data --help)")


def _synth(args: argparse.Namespace) -> int:
    from multifair.config import validate
    from multifair.data.synthetic import SynthKnobs, generate

    knobs: dict[str, Any] = {
        "flavour": args.flavour,
        "size": args.size,
        "scenario": args.scenario,
        "seed": args.seed,
    }
    for name in (
        "n",
        "group_mix",
        "pos_rate",
        "n_classes",
        "unknown_rate",
        "race_unknown_rate",
        "degenerate",
        "fundus_dtype",
        "race_codes",
        "layout",
        "test_name",
        "split",
        "empty_note_rate",
        "table_order",
        "oct_region",
        "oct_tilt",
        "fundus_shape",
        "oct_shape",
    ):
        value = getattr(args, name)
        if value is not None:
            knobs[name] = value
    for flag in ("compress", "csv_bom", "slo_jpg"):
        knobs[flag] = getattr(args, flag)
    knobs["signal"] = _per_modality(args.signal, "--signal", "D")
    knobs["missing"] = _per_modality(args.missing, "--missing", "R")
    k = validate(SynthKnobs, knobs, source="data synth")
    meta = generate(k, args.out, force=args.force)
    print(f"wrote {meta['n']} {args.flavour} subjects ({k.scenario}, {k.size}) to {args.out}")
    best = meta["best_auc"]["test"]
    for group, entry in best.items():
        if isinstance(entry, dict):
            parts = ", ".join(f"{m} {entry[m]}" for m in [*meta["modalities"], "joint"])
            print(f"  best test AUC from the latents, {group} (n={entry['n']}): {parts}")
    if args.flavour == "table":
        print(f"  data config: {args.out / 'table.yaml'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from multifair.data.inspect import format_report, inspect_path

    report = inspect_path(args.root, args.kind, args.deep)
    print(format_report(report, args.max_problems))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 1 if report["problems"] else 0


def _prepare(args: argparse.Namespace) -> int:
    from multifair.data import prepare_cache
    from multifair.data.config import DataConfig, load_data_config
    from multifair.data.inspect import detect_kind

    if args.root.is_file():
        cfg = load_data_config(args.root)
    else:
        if not args.root.is_dir():
            raise UserError(f"data prepare: {args.root} is not a folder or a config file")
        cfg = DataConfig(kind=args.kind or detect_kind(args.root), root=args.root)
    update: dict[str, Any] = {"skip_bad": args.skip_bad or cfg.skip_bad}
    if args.image_size is not None:
        update["image_size"] = args.image_size
    if args.oct_slices is not None:
        update["oct_slices"] = args.oct_slices
    cfg = DataConfig.model_validate({**cfg.model_dump(), **update})
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad:
        raise UserError(f"--splits: unknown split(s) {bad}; use train,val,test")
    summary = prepare_cache(
        cfg, args.cache, splits, workers=args.workers, progress=not args.no_progress
    )
    # a table caches each file its path columns name, per modality; a tree, samples per split
    parts, unit = (summary["stores"], "files") if cfg.kind == "table" else (summary["splits"], "samples")  # fmt: skip
    print(
        f"cache: {summary['directory']} ({summary['bytes'] / 2**20:.1f} MiB, {summary['seconds']:.1f} s)"
    )
    for name, s in parts.items():
        print(f"  {name}: {s['n']} {unit} ({s['written']} written now, {s['bad']} bad)")
    where = args.cache if args.cache is not None else "(default: found automatically)"
    print(f"use it with data.cache: {where}")
    return 0
