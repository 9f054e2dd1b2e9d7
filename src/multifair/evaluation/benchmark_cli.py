"""`multifair benchmark` and `multifair report`.

multifair benchmark CONFIG               run the matrix (resumable), print + write the tables
multifair benchmark run CONFIG           the same, spelled out
multifair benchmark CONFIG --plan        print one `python -m multifair train ...` line per run
multifair benchmark CONFIG --engine ray  the runs as Ray tasks (local cluster; --address ADDR)
multifair benchmark collect DIR          aggregate whatever has finished under DIR
multifair report RUN_DIR|BENCH_DIR       self-contained HTML report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multifair.errors import UserError
from multifair.evaluation import benchmark as bm
from multifair.evaluation import benchmark_report as br
from multifair.evaluation import benchmark_tables as bt


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "benchmark",
        help="run a methods x seeds x attributes matrix and tabulate it",
        usage="multifair benchmark [run] CONFIG [--plan] [--workers N] [--engine local|ray] "
        "[--address ADDR] [--n-boot N] [--no-report]\n"
        "       multifair benchmark collect DIR [--with DIR2 ...] [--seeds 10-19] [--reference LABEL] [--n-boot N] [--no-report]",
        description="Run a benchmark matrix as separate training processes (resumable), then "
        "write one table per dataset x attribute (Markdown/CSV/JSON) and an HTML report. "
        "Forms: `benchmark CONFIG`, `benchmark run CONFIG`, `benchmark collect DIR`.",
    )
    p.add_argument("target", nargs="+", metavar="ARG", help="CONFIG, `run CONFIG` or `collect DIR`")
    p.add_argument("--plan", action="store_true", help="print one command line per run and exit")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (overrides config)")
    p.add_argument(
        "--launcher",
        choices=["subprocess", "preloaded"],
        default=None,
        help="how each run starts (overrides config): a fresh interpreter, or forked from one "
        "that imported torch once (saves seconds per run on small CPUs)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where the runs execute: this machine (default), or as Ray tasks on a Ray cluster "
        "(a local one unless --address; needs `pip install 'multifair[ray]'`); same run "
        "directories, logs, resuming and failure reports either way",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --engine ray: the cluster to join (`auto` for the one `ray start` runs "
        "here, or ray://HOST:10001); the output directory must be on storage every node sees",
    )
    p.add_argument(
        "--n-boot", type=int, default=None, help="bootstrap resamples (overrides config)"
    )
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument(
        "--seeds",
        default=None,
        help="collect only: these seeds (10-19, 0,3,5), e.g. seeds fixed in advance; tables "
        "go to DIR/results/seeds_<SEEDS>/, the report to DIR/report_seeds_<SEEDS>.html",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="collect only: pair every row with this entry instead of the config's reference; "
        "tables go to DIR/results/vs_<LABEL>/ (with --seeds: seeds_<SEEDS>_vs_<LABEL>)",
    )
    p.add_argument(
        "--with",
        dest="pool",
        action="append",
        default=None,
        metavar="DIR2",
        help="collect only (repeatable): pool another benchmark directory of the same data run "
        "on other seeds (a replication); rows match by label; tables go to "
        "DIR/results/with_<NAME2>/",
    )
    p.set_defaults(func=run)

    r = subparsers.add_parser(
        "report",
        help="self-contained HTML report of a run or a benchmark directory",
        description="Write report.html (figures embedded; no server, no network needed).",
    )
    r.add_argument("path", help="a run directory or a benchmark directory")
    r.add_argument(
        "-o", "--output", default=None, help="where to write (default: PATH/report.html)"
    )
    r.set_defaults(func=run_report)


def _parse_target(target: list[str]) -> tuple[str, str]:
    if target[0] in ("run", "collect"):
        if len(target) != 2:
            raise UserError(f"`benchmark {target[0]}` takes exactly one path, got {target[1:]}")
        return target[0], target[1]
    if len(target) != 1:
        raise UserError(
            f"unexpected arguments {target[1:]} (forms: CONFIG, run CONFIG, collect DIR)"
        )
    return "run", target[0]


def run(args: argparse.Namespace) -> int:
    action, path = _parse_target(args.target)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.n_boot is not None and args.n_boot < 0:
        raise UserError(f"--n-boot must be >= 0, got {args.n_boot}")
    if action == "collect":
        if args.plan:
            raise UserError("--plan goes with a benchmark CONFIG, not with `collect`")
        if args.pool:
            collections = [bm.collect(d) for d in [path, *args.pool]]
            merged = bm.merge_collections(collections, seeds=args.seeds, reference=args.reference)
            for where, labels in bm.left_out_datasets(collections).items():
                print(f"note: {where}: datasets {labels} are not in {path} and are left out")
            return _summarise(merged, args, pooled=[c.config.name for c in collections[1:]])
        return _summarise(bm.collect(path, seeds=args.seeds, reference=args.reference), args)
    if args.seeds is not None or args.reference is not None or args.pool:
        raise UserError("--seeds, --reference and --with go with `collect DIR`, not with a run")
    launcher = args.launcher
    if args.engine == "ray":
        if launcher is not None:
            raise UserError(
                f"--launcher {launcher} starts runs on this machine; with --engine ray every "
                "run is a Ray task (leave --launcher out)"
            )
        launcher = "ray"
    elif args.address is not None:
        raise UserError("--address goes with --engine ray")

    cfg, out_dir = bm.load_benchmark(path)
    runs = bm.plan(cfg, out_dir)
    echo = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    # synthetic data first: the per-run training configs name its files
    bm.prepare_data(cfg, echo)
    bm.write_manifest(cfg, out_dir)
    if args.plan:
        for line in bm.plan_lines(cfg, runs):
            print(line)
        print(
            f"# {len(runs)} runs; then: multifair benchmark collect {out_dir}",
            file=sys.stderr,
        )
        return 0
    if launcher == "ray" or (launcher is None and cfg.launcher == "ray"):
        from multifair.evaluation.launch_ray import connect

        connect(args.address)  # a local cluster unless --address
    try:
        outcomes = bm.execute(
            cfg, runs, out_dir, workers=args.workers, launcher=launcher, echo=echo
        )
    except (bm.Terminated, KeyboardInterrupt) as exc:
        done = sum(bm.is_finished(r) for r in runs)
        echo(f"interrupted: {done} of {len(runs)} runs finished; run the same command to continue")
        return 143 if isinstance(exc, bm.Terminated) else 130
    status = _summarise(bm.collect(out_dir, cfg), args)
    failed = [o for o in outcomes if o.status == "failed"]
    return 1 if failed else status


def _summarise(
    collection: bm.Collection, args: argparse.Namespace, pooled: list[str] | None = None
) -> int:
    """Print the tables, write results/ and the report; say what is missing or failed.
    `pooled`: the names of the benchmarks pooled in with `--with` (they name the folder)."""
    from multifair.evaluation.report import write_report

    tables = bt.build_tables(collection, n_boot=args.n_boot)
    br.print_tables(tables)
    parts = []
    if pooled:
        parts.append("with_" + "_".join(bm.safe_name(name) for name in pooled))
    if args.seeds:
        parts.append(f"seeds_{args.seeds.replace(',', '_')}")
    if args.reference:
        parts.append(f"vs_{bm.safe_name(args.reference)}")
    tag = "_".join(parts) or None
    results_dir = collection.out_dir / "results" / tag if tag else None
    paths = br.write_results(tables, collection, results_dir)
    print(f"{br.status_line(collection)}", file=sys.stderr)
    for run, err in collection.failed:
        print(f"FAILED {run.run_id}:\n{bm.indent(err)}", file=sys.stderr)
    print(f"tables: {paths['markdown']}, {paths['csv']}, {paths['json']}", file=sys.stderr)
    if not args.no_report:
        out = collection.out_dir / f"report_{tag}.html" if tag else None
        report = write_report(collection.out_dir, out, collection=collection, tables=tables)
        print(f"report: {report}", file=sys.stderr)
    return 1 if collection.failed else 0


def run_report(args: argparse.Namespace) -> int:
    from multifair.evaluation.report import write_report

    print(f"report: {write_report(Path(args.path), args.output)}")
    return 0
