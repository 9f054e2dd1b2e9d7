"""`multifair benchmark`: a matrix of training runs and the paper-style table it produces.

A benchmark config names a training recipe (`base` + `overrides`) and a matrix:
datasets x attributes x methods x (optional sweep values) x seeds. Every cell is one
`python -m multifair train CONFIG key=value ...` subprocess with its own run directory, named
deterministically from (dataset, attribute, method label, sweep value, seed), so that

- a re-run skips every run whose `metrics.json` is complete (resumable after a kill),
- `--plan` can print the same command lines for a cluster scheduler, and
- `collect` can aggregate whatever has finished, whoever ran it.

This module is the entry: it gathers the public names of the four steps, one module each,
so `from multifair.evaluation import benchmark as bm; bm.plan(...)` reads as the pipeline:

    benchmark_plan     the config (`load_benchmark`) and its runs (`plan`, `write_manifest`)
    benchmark_run      running them (`prepare_data`, `execute`), resumable, logs kept
    benchmark_collect  reading them back (`collect`, `merge_collections`)
    benchmark_tables   one table per dataset x attribute (`build_tables`)
    benchmark_report   the tables for the terminal, Markdown, CSV, JSON (`write_results`)
"""

from __future__ import annotations

from multifair.evaluation.benchmark_collect import (
    Collection,
    RunRecord,
    collect,
    left_out_datasets,
    load_manifest,
    merge_collections,
    parse_seeds,
)
from multifair.evaluation.benchmark_plan import (
    ATTRIBUTE_KEY,
    OUTPUT_KEY,
    SEED_KEY,
    BenchmarkConfig,
    DatasetEntry,
    MethodEntry,
    RunSpec,
    Sweep,
    SynthData,
    data_override,
    dataset_section,
    entry_config,
    entry_config_path,
    execution_order,
    format_value,
    load_benchmark,
    plan,
    plan_lines,
    safe_name,
    write_entry_configs,
    write_manifest,
)
from multifair.evaluation.benchmark_run import (
    RunOutcome,
    Terminated,
    execute,
    fingerprint,
    indent,
    is_finished,
    log_paths,
    oversubscribed,
    prepare_data,
    read_metrics,
    read_status,
    stale_runs,
    tail,
)

__all__ = [
    "ATTRIBUTE_KEY",
    "OUTPUT_KEY",
    "SEED_KEY",
    "BenchmarkConfig",
    "Collection",
    "DatasetEntry",
    "MethodEntry",
    "RunOutcome",
    "RunRecord",
    "RunSpec",
    "Sweep",
    "SynthData",
    "Terminated",
    "collect",
    "data_override",
    "dataset_section",
    "entry_config",
    "entry_config_path",
    "execute",
    "execution_order",
    "fingerprint",
    "format_value",
    "indent",
    "is_finished",
    "left_out_datasets",
    "load_benchmark",
    "load_manifest",
    "log_paths",
    "merge_collections",
    "oversubscribed",
    "parse_seeds",
    "plan",
    "plan_lines",
    "prepare_data",
    "read_metrics",
    "read_status",
    "safe_name",
    "stale_runs",
    "tail",
    "write_entry_configs",
    "write_manifest",
]
