"""`multifair train | evaluate | predict | demo`.

    multifair train CONFIG [key=value ...] [--out RUN_DIR]
    multifair train --resume RUN_DIR [key=value ...]
    multifair evaluate RUN_DIR [--split test] [--checkpoint best|last] [--n-boot N]
    multifair predict RUN_DIR DATA --out predictions.csv [--split SPLIT]
    multifair demo [--cache DIR] [--out DIR] [--seeds N] [--subjects N]

Under torchrun the same commands run one process per device, e.g.
`torchrun --nproc_per_node 4 -m multifair train CONFIG`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifair.errors import UserError, writing


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `train`, `evaluate`, `predict` and `demo`."""
    t = subparsers.add_parser(
        "train",
        help="train a model from a config (or continue a run with --resume)",
        description="Train a multimodal classifier: defaults -> CONFIG -> key=value overrides "
        "(e.g. method.name=erm train.epochs=3). Writes a run directory with the resolved "
        "config, env.json, log.jsonl, checkpoints, predictions and metrics.json.",
    )
    t.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG [key=value ...]",
        help="a YAML config, then dotted overrides",
    )
    t.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    t.add_argument("--out", metavar="RUN_DIR", help="the run directory (same as output.dir=...)")
    t.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "evaluate",
        help="metrics of a trained run on one split",
        description="Rebuild a run's data and model, load its selected checkpoint and print the "
        "fairness table for one split.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", default="test", help="train | val | test (default: test)")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (0: none)")
    e.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=run_evaluate)

    p = subparsers.add_parser(
        "predict",
        help="scores of a trained run on new data of the same kind",
        description="DATA is a dataset folder (fairvision/fairvlmed), a table file, or a YAML "
        "file with a data section. Preprocessing fitted at training time is reused.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--split", action="append", help="split(s) to predict (default: all present)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_predict)

    d = subparsers.add_parser(
        "demo",
        help="the problem and the best answers on synthetic data: 4 methods x 3 seeds (minutes, CPU)",
        description="Generate a synthetic FairVision-format dataset (once, cached), train plain "
        "joint training (erm), MultiFair as published, the recommended group-blind and "
        "group-aware methods and one single-modality model per modality over 3 seeds, and "
        "print per-group AUCs with paired differences to erm; writes an HTML report.",
    )
    d.add_argument("--cache", metavar="DIR", help="where the synthetic data is kept")
    d.add_argument("--out", metavar="DIR",
                   help="the demo's benchmark folder (default runs/demo; finished runs are reused)")  # fmt: skip
    d.add_argument("--subjects", type=int, default=None, metavar="N",
                   help="patients to generate (default 2000; fewer is faster and noisier)")  # fmt: skip
    d.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="training seeds per method (default 3; at least 2 for intervals)")  # fmt: skip
    d.add_argument("--workers", type=int, default=None, metavar="N",
                   help="runs at a time (default: the number of cores, at most 6)")  # fmt: skip
    d.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=2")
    d.set_defaults(func=run_demo)


# ---------------------------------------------------------------------------------------


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """CONFIG is the first item if it has no '=' or names an existing file (a path may contain
    '='); the rest are key=value overrides."""
    config = None
    overrides = []
    for item in items:
        first = config is None and not overrides
        if first and ("=" not in item or Path(item).is_file()):
            config = item
        else:
            overrides.append(item)
    return config, overrides


def run_train(args: argparse.Namespace) -> int:
    from multifair.metrics import format_table
    from multifair.training import run
    from multifair.training.config import resolve_run_config
    from multifair.training.trainer import train

    config, overrides = _split_items(args.items)
    if args.resume:
        if config is not None:
            raise UserError(
                f"--resume continues {args.resume} with its own config.yaml; give only "
                f"key=value overrides (got the file {config!r})"
            )
        if args.out:
            raise UserError("--out cannot be combined with --resume (the run directory is RUN_DIR)")
        base = run.read_config(args.resume)
        # a stop request was for the interrupted invocation, not for the continuation
        base.setdefault("train", {})["stop_after_epoch"] = None
        cfg = resolve_run_config(None, overrides, base=base, source=run.config_source(args.resume))
        result = train(cfg, resume_dir=args.resume)
    else:
        if config is None:
            raise UserError("give a CONFIG file (e.g. configs/demo.yaml) or --resume RUN_DIR")
        if args.out:
            overrides = [*overrides, f"output.dir={args.out}"]
        cfg = resolve_run_config(config, overrides)
        result = train(cfg)
    if result.metrics is not None and _is_main():
        print()
        print(
            f"selected epoch {result.metrics['selected_epoch'] + 1} by validation "
            f"{result.metrics['select_by']}; test split:"
        )
        print(format_table(result.metrics["test"]))
        _print_missingness(result.metrics["test"], result.metrics.get("attribute"))
        print(f"\nrun directory: {result.run_dir}")
    return 0


def _print_missingness(summary: dict, attribute: str | None) -> None:
    """With missing modalities: the test metrics per missingness pattern, rates by group."""
    if "missingness" not in summary:
        return
    from multifair.metrics import format_missingness

    rates = summary["missingness"]["rates"]
    print("\nby missingness pattern:")
    print(format_missingness(summary["missingness"], attribute if attribute in rates else None))


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def run_evaluate(args: argparse.Namespace) -> int:
    from multifair.evaluation.predict import evaluate_run
    from multifair.metrics import format_table
    from multifair.training.logging import dump_json

    summary, preds, loaded = evaluate_run(
        args.run_dir, args.split, which=args.checkpoint, n_boot=args.n_boot, device=args.device
    )
    print(f"{loaded.checkpoint} on split {args.split!r} ({len(preds)} samples):")
    print(format_table(summary))
    _print_missingness(summary, loaded.cfg.data.attribute)
    if args.json:
        with writing(args.json):
            dump_json(summary, args.json)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from multifair.evaluation.predict import predict_run

    frame = predict_run(
        args.run_dir,
        args.data,
        args.out,
        splits=args.split,
        which=args.checkpoint,
        device=args.device,
    )
    print(f"wrote {len(frame)} predictions to {args.out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from multifair.evaluation.demo import DEMO_KNOBS, DEMO_SEEDS
    from multifair.evaluation.demo import run_demo as demo

    if args.subjects is not None and args.subjects < 100:
        raise UserError(
            f"--subjects {args.subjects}: use at least 100 (every split needs every group)"
        )
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: at least 1 (2 or more for intervals)")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: at least 1")
    knobs = DEMO_KNOBS if args.subjects is None else {**DEMO_KNOBS, "n": args.subjects}
    seeds = DEMO_SEEDS if args.seeds is None else tuple(range(args.seeds))
    return demo(
        cache=args.cache,
        out=args.out,
        overrides=args.overrides,
        knobs=knobs,
        seeds=seeds,
        workers=args.workers,
    )
