"""The benchmark's tables as text: terminal (rich), Markdown, CSV and JSON.

`table_blocks` turns a `benchmark_tables.Table` into (title, header, rows, notes) blocks that
the terminal, results.md and the HTML report share, so they show the same cells; `write_results` writes results.md / .csv / .json under the benchmark directory.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multifair.evaluation.benchmark_collect import Collection
from multifair.evaluation.benchmark_tables import (
    ATTRIBUTE_MARK,
    METRIC_NAMES,
    PAIRED_METRICS,
    Paired,
    Row,
    Table,
    column_name,
)


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    text = f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def _fmt_ci(bounds: Sequence[float] | None) -> str:
    if not bounds or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds):
        return "-"
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _fmt_paired(p: Paired | None) -> str:
    if p is None or p.n == 0:
        return "-"
    if not math.isfinite(p.lo):
        return f"{p.mean:+.3f} (n={p.n})"
    return f"{p.mean:+.3f} [{p.lo:+.3f}, {p.hi:+.3f}]"


def _row_name(row: Row) -> str:
    # a label that already carries the mark (e.g. "stacking †") keeps one, not two
    marked = row.uses_attribute_at_test and ATTRIBUTE_MARK not in row.variant
    name = row.variant + (f" {ATTRIBUTE_MARK}" if marked else "")
    return name + (" (reference)" if row.reference_only else "")


def table_blocks(table: Table) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """The table as (title, header, rows, notes) blocks shared by every renderer."""
    ordered = [r for r in table.rows if not r.reference_only] + [
        r for r in table.rows if r.reference_only
    ]
    header = ["method", *[column_name(c) for c in table.columns], "s/step", "peak MB", "sel.", "n"]
    main = []
    for row in ordered:
        cells = [_fmt(row.mean.get(c, math.nan), row.std.get(c)) for c in table.columns]
        main.append(
            [
                _row_name(row),
                *cells,
                _fmt(row.mean.get("time_per_step_s", math.nan), digits=4),
                _fmt(row.mean.get("peak_memory_mb", math.nan), digits=0),
                row.select_by,
                str(len(row.seeds)),
            ]
        )
    for name, values in (table.best_achievable or {}).items():
        cells = [_fmt(values.get(c, math.nan)) if c in values else "" for c in table.columns]
        main.append([name, *cells, "", "", "", ""])
    notes = ["mean ± std over seeds (n = number of seeds); sel. = checkpoint selection criterion"]
    kinds = sorted({r.memory_kind for r in table.rows if r.memory_kind})
    if kinds:
        notes.append(f"s/step: training seconds per optimisation step; peak MB: {', '.join(kinds)}")
    if any(r.uses_attribute_at_test for r in table.rows):
        notes.append(
            f"{ATTRIBUTE_MARK} uses the sensitive attribute at test time (not available to a "
            "deployed model that is blind to it)"
        )
    if any(r.reference_only for r in table.rows):
        notes.append("(reference) rows: single-modality models, shown as reference lines")
    if table.best_achievable:
        notes.append(
            "best achievable: AUC of the generator's latent signals on the test split (an "
            "ideal observer; no model can do better in expectation)"
        )
    blocks = [(f"{table.dataset} / {table.attribute}", header, main, notes)]

    if any(row.ci for row in ordered):
        ci_rows = [
            [_row_name(row), *[_fmt_ci(row.ci.get(c)) for c in table.columns]] for row in ordered
        ]
        blocks.append(
            (
                "pooled-prediction bootstrap CIs",
                ["method", *[column_name(c) for c in table.columns]],
                ci_rows,
                [table.ci_note + "; seed-to-seed spread is the ± std above"],
            )
        )
    modality_block = _modality_block(table, ordered)
    if modality_block is not None:
        blocks.append(modality_block)
    stacking_block = _stacking_block(ordered)
    if stacking_block is not None:
        blocks.append(stacking_block)
    if table.reference is not None and table.comparisons:
        diff_rows = [
            [
                _row_name(row),
                *[_fmt_paired(row.paired.get(m)) for m in PAIRED_METRICS],
                str(max((p.n for p in row.paired.values()), default=0)),
            ]
            for row in ordered
            if row.paired
        ]
        blocks.append(
            (
                f"paired difference to {table.reference} (by seed)",
                ["method", *[f"Δ {METRIC_NAMES[m]}" for m in PAIRED_METRICS], "pairs"],
                diff_rows,
                [
                    "mean of per-seed differences with a 95% t-interval over the seeds both runs "
                    f"have; {table.comparisons} comparisons, intervals not adjusted for "
                    "multiplicity"
                ],
            )
        )
    return blocks


def _modality_block(
    table: Table, ordered: Sequence[Row]
) -> tuple[str, list[str], list[list[str]], list[str]] | None:
    """Per modality: its head's test AUC, its mean step-size factor and its encoder's update size
    relative to the reference row (did the lagging modality's learning actually change?)."""
    modalities = list(
        dict.fromkeys(
            k.split("/", 1)[1] for r in ordered for k in r.mean if k.startswith("head_auc/")
        )
    )
    if not modalities:
        return None
    reference = next((r for r in ordered if r.label == table.reference), None)
    header, rows = ["method"], []
    for m in modalities:
        header += [f"{m} head AUC", f"{m} lr factor", f"{m} update"]
    for row in ordered:
        cells = [_row_name(row)]
        for m in modalities:
            norm = row.mean.get(f"update_norm/{m}", math.nan)
            base = reference.mean.get(f"update_norm/{m}", math.nan) if reference else math.nan
            cells += [
                _fmt(row.mean.get(f"head_auc/{m}", math.nan), row.std.get(f"head_auc/{m}")),
                _fmt(row.mean.get(f"lr_factor/{m}", math.nan), digits=2),
                _fmt(norm / base, digits=2) + "x" if math.isfinite(norm / base) else "-",
            ]
        rows.append(cells)
    notes = [
        "head AUC: the modality's auxiliary head on the test split (mean ± std over seeds); "
        "lr factor: the method's mean step-size factor over the logged steps (- = none set); "
        f"update: the encoder's mean update norm per step relative to {table.reference or '-'}"
    ]
    if reference is not None and not reference.reference_only:
        notes += _head_vs_alone(reference, ordered, modalities)
    return "modalities: what each encoder learned, and how fast it moved", header, rows, notes


def _head_vs_alone(reference: Row, ordered: Sequence[Row], modalities: Sequence[str]) -> list[str]:
    """The reference row's heads against the single-modality rows (one finite head each): a
    head well below its single-modality model is a modality the joint model under-learns."""
    pairs = []
    for m in modalities:
        joint = reference.mean.get(f"head_auc/{m}", math.nan)
        for row in ordered:
            heads = [
                k for k, v in row.mean.items() if k.startswith("head_auc/") and math.isfinite(v)
            ]
            if row.reference_only and heads == [f"head_auc/{m}"] and math.isfinite(joint):
                alone = row.mean[f"head_auc/{m}"]
                pairs.append(
                    f"{m} {joint:.3f} against {row.variant} {alone:.3f} ({joint - alone:+.3f})"
                )
                break
    if not pairs:
        return []
    return [
        f"{reference.variant}'s heads against the single-modality models: {'; '.join(pairs)}. A "
        "head well below its single-modality model is a modality the joint model under-learns "
        "(give it its own loss: `unimodal_weight: 1`); a single-modality model well below the "
        "best achievable points at the encoder"
    ]


def _stacking_block(
    ordered: Sequence[Row],
) -> tuple[str, list[str], list[list[str]], list[str]] | None:
    """Rows with group-aware stacking: each group's fitted weights, mean over the seeds that
    fitted it (a group too small to fit keeps the shared model: fused 1, the rest 0)."""
    rows_out, columns = [], list[str]()
    for row in ordered:
        groups = list(dict.fromkeys(k.split("/")[1] for k in row.mean if k.startswith("stacking/")))
        for group in groups:
            prefix = f"stacking/{group}/"
            cols = [k[len(prefix) :] for k in row.mean if k.startswith(prefix)]
            cols = [c for c in cols if c != "fitted"]
            columns = columns or cols
            fitted = [v.get(prefix + "fitted", 0.0) for v in row.per_seed.values()]
            rows_out.append(
                [
                    _row_name(row),
                    group,
                    *[
                        _fmt(row.mean.get(prefix + c, math.nan), row.std.get(prefix + c), 2)
                        for c in columns
                    ],
                    f"{int(sum(fitted))}/{len(fitted)}",
                ]
            )
    if not rows_out:
        return None
    notes = [
        "each group's prediction: its weights on the fused margin and on each modality head's "
        "margin, plus an intercept, fitted after selection on validation (rows with "
        "`stacking_data: train+validation`: the direction on training + validation, the scale "
        "and intercept on validation; mean ± std over the seeds that fitted the group); the "
        "shared model is fused 1, the rest 0"
    ]
    header = ["method", "group", *columns, "fitted"]
    return "group-aware stacking: the fitted weights per group", header, rows_out, notes


def to_markdown(tables: Sequence[Table], collection: Collection | None = None) -> str:
    out = []
    if collection is not None:
        out.append(f"# Benchmark `{collection.config.name}`\n")
        out.append(status_line(collection) + "\n")
    for table in tables:
        for i, (title, header, rows, notes) in enumerate(table_blocks(table)):
            out.append(f"{'##' if i == 0 else '###'} {title}\n")
            # a "|" inside a cell (intersection groups: "AUC Asian|Female") is escaped
            for row in [header, *rows]:
                out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
                if row is header:
                    out.append("|" + "|".join("---" for _ in header) + "|")
            out.append("")
            out.extend(f"- {note}" for note in notes if note)
            out.append("")
    if collection is not None and collection.failed:
        out.append("## Failed runs\n")
        for run, err in collection.failed:
            out.append(f"- `{run.run_id}`:\n\n```\n{err}\n```\n")
    return "\n".join(out)


def status_line(collection: Collection) -> str:
    text = f"{len(collection.finished)} of {len(collection.runs)} runs finished"
    if collection.missing:
        text += f"; {len(collection.missing)} missing"
    if collection.failed:
        text += f" ({len(collection.failed)} failed)"
    if collection.stale:
        text += (
            f"; WARNING: {len(collection.stale)} finished runs were trained with a different "
            "config than the current one"
        )
    return text


def to_csv(tables: Sequence[Table]) -> str:
    """One line per (dataset, attribute, row): means, stds, CIs, paired differences."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    metrics = ["auc", "es_auc", "es_acc", "worst_auc", "dpd", "deodds"]
    groups = sorted({g for t in tables for g in t.groups})
    columns = metrics[:4] + [f"auc/{g}" for g in groups] + metrics[4:]
    header = ["dataset", "attribute", "row", "label", "method", "sweep_key", "sweep_value"]
    header += ["n_seeds", "select_by", "uses_attribute_at_test", "reference_only"]
    for c in columns:
        header += [f"{c}_mean", f"{c}_std", f"{c}_ci_lo", f"{c}_ci_hi"]
    header += ["time_per_step_s", "peak_memory_mb"]
    for m in PAIRED_METRICS:
        header += [f"d_{m}_mean", f"d_{m}_lo", f"d_{m}_hi", f"d_{m}_n"]
    writer.writerow(header)
    for table in tables:
        for row in table.rows:
            line: list[Any] = [table.dataset, table.attribute, row.variant, row.label, row.method]
            line += [row.sweep_key or "", "" if row.sweep_value is None else row.sweep_value]
            line += [len(row.seeds), row.select_by, row.uses_attribute_at_test, row.reference_only]
            for c in columns:
                ci = row.ci.get(c) or [math.nan, math.nan]
                line += [row.mean.get(c, math.nan), row.std.get(c, math.nan), *ci]
            line += [row.mean.get("time_per_step_s"), row.mean.get("peak_memory_mb")]
            for m in PAIRED_METRICS:
                p = row.paired.get(m)
                line += [p.mean, p.lo, p.hi, p.n] if p else ["", "", "", ""]
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in line])
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(tables: Sequence[Table], collection: Collection | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"tables": []}
    if collection is not None:
        out["benchmark"] = collection.config.name
        out["runs"] = {
            "planned": len(collection.runs),
            "finished": len(collection.finished),
            "missing": [r.run_id for r in collection.missing],
            "failed": [{"run": r.run_id, "stderr_tail": err} for r, err in collection.failed],
            "stale": [r.run_id for r in collection.stale],
        }
    for table in tables:
        out["tables"].append(
            {
                "dataset": table.dataset,
                "attribute": table.attribute,
                "groups": table.groups,
                "reference": table.reference,
                "comparisons": table.comparisons,
                "best_achievable_auc": table.best_achievable,
                "ci_note": table.ci_note,
                "rows": [
                    {
                        "row": r.variant,
                        "label": r.label,
                        "method": r.method,
                        "sweep_key": r.sweep_key,
                        "sweep_value": r.sweep_value,
                        "seeds": r.seeds,
                        "select_by": r.select_by,
                        "uses_attribute_at_test": r.uses_attribute_at_test,
                        "reference_only": r.reference_only,
                        "mean": r.mean,
                        "std": r.std,
                        "ci": r.ci,
                        "per_seed": r.per_seed,
                        "paired": {
                            m: {"mean": p.mean, "lo": p.lo, "hi": p.hi, "n": p.n, "diffs": p.diffs}
                            for m, p in r.paired.items()
                        },
                    }
                    for r in table.rows
                ],
            }
        )
    return _jsonable(out)


def print_tables(tables: Sequence[Table], file: Any = None) -> None:
    """Print the tables in the terminal (rich when available)."""
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:  # pragma: no cover - rich is a dependency
        print(to_markdown(tables), file=file or sys.stdout)
        return
    from rich.markup import escape

    # wide enough that cells never wrap (a table is read across, and copied from logs)
    console = Console(file=file, width=max(400, shutil.get_terminal_size().columns))
    for table in tables:
        for title, header, rows, notes in table_blocks(table):
            rich_table = RichTable(title=escape(title), title_justify="left")
            for i, name in enumerate(header):
                rich_table.add_column(
                    escape(name), justify="left" if i == 0 else "right", no_wrap=True
                )
            for row in rows:
                rich_table.add_row(*(escape(cell) for cell in row))
            console.print(rich_table)
            for note in notes:
                if note:
                    console.print(f"  {escape(note)}", style="dim")


def write_results(
    tables: Sequence[Table], collection: Collection, out_dir: Path | None = None
) -> dict[str, Path]:
    """results.md / results.csv / results.json under `<benchmark dir>/results/`."""
    out_dir = out_dir or collection.out_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "results.md",
        "csv": out_dir / "results.csv",
        "json": out_dir / "results.json",
    }
    paths["markdown"].write_text(to_markdown(tables, collection), encoding="utf-8")
    paths["csv"].write_text(to_csv(tables), encoding="utf-8")
    paths["json"].write_text(
        json.dumps(to_json(tables, collection), indent=2) + "\n", encoding="utf-8"
    )
    return paths
