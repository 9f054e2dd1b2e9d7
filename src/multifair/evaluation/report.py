"""Self-contained HTML reports for one run and for a benchmark.

Everything is in one file: figures are matplotlib (Agg) PNGs embedded as base64 data URIs, the
style sheet is inline, there is no JavaScript and no reference to any server or network, so
the file opens in a browser anywhere (and can be attached to an e-mail or a paper review).

Run report: test metrics per group, per-group ROC curves, per-modality auxiliary AUC and
modulation factors over training, the group AUC gap against the threshold tau, validation
metrics per epoch, and the diagnostics of `multifair.evaluation.diagnostics`.
Benchmark report: the tables, a fairness-vs-AUC scatter of all methods with error bars, the
paired differences to the reference, sweep plots (each metric vs the swept value), per-group
ROC curves and training curves per method, diagnostics of every run, and failed runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from multifair.errors import UserError
from multifair.evaluation import benchmark as bm
from multifair.evaluation import benchmark_report as br
from multifair.evaluation import benchmark_tables as bt
from multifair.evaluation.diagnostics import SIGNATURES, Finding, RunLog, diagnose, read_log

# Per-modality step signals plotted as "modulation factors" (docs/architecture.md, log.jsonl),
# with each encoder's update norm: what a factor does to the step, which AdamW can undo.
FACTOR_SIGNALS = ("B", "f", "factor", "lr_factor", "level", "update_norm")
SCATTER_Y = (("es_auc", "ES-AUC"), ("worst_auc", "worst-group AUC"), ("deodds", "DEOdds"))

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
.scroll{overflow-x:auto;max-width:100%}
td:first-child{position:sticky;left:0;background:#fff}
th:first-child{position:sticky;left:0}
.note{color:#555;font-size:.85em;margin:.1em 0}
.finding{border-left:4px solid #d9822b;background:#fff8f0;padding:.4em .8em;margin:.6em 0}
.ok{border-left:4px solid #3a9a5b;background:#f2fbf4;padding:.4em .8em}
img{max-width:100%;height:auto}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
.figs{display:flex;flex-wrap:wrap;gap:.5em}.figs img{max-width:48%}
"""


# ============================================================================================
# Small helpers
# ============================================================================================
def _subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure on the Agg canvas (object API: no pyplot, the caller's backend is untouched)."""
    fig = Figure(figsize=kwargs.pop("figsize", None), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _img(png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _png(fig: Figure) -> str:
    """Render a figure as an <img> with a base64 PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return _img(buffer.getvalue())


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    # wide tables scroll inside their box (the page keeps its width); the row labels stay put
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{body}\n</body></html>\n"
    )


def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "-"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


# ============================================================================================
# Figures
# ============================================================================================
def group_roc_figure(predictions: Path, attribute: str, title: str = "") -> str | None:
    """Per-group ROC curves of one attribute from a predictions CSV (plots.roc_curves_png)."""
    import pandas as pd

    from multifair.evaluation.plots import roc_curves_png

    if not predictions.is_file():
        return None
    frame = pd.read_csv(predictions)
    if attribute not in frame.columns or "score" not in frame.columns:
        return None  # multi-class predictions (score_<class>): ROC curves are binary
    names = None
    if f"{attribute}_name" in frame.columns:
        names = {int(c): str(n) for c, n in zip(frame[attribute], frame[f"{attribute}_name"])}
    png = roc_curves_png(
        frame["label"].to_numpy(),
        frame["score"].to_numpy(),
        groups=frame[attribute].to_numpy(),
        group_names=names,
        title=title or attribute,
        dpi=80,
    )
    return _img(png)


def training_figures(
    log: RunLog, tau: float | None, title: str = "", group_names: Mapping[str, str] | None = None
) -> list[str]:
    """Aux AUC per modality, modulation factors, gap vs tau, validation metrics per epoch, and
    per-group loss weights set after each validation (`group_weight/<code>` in the epoch
    records' method stats; `group_names` maps codes to names)."""
    images = []
    modalities = log.modalities("aux_auc")
    if modalities:
        fig, ax = _subplots(figsize=(5.5, 3.2))
        for m in modalities:
            x, y = log.step_series(f"aux_auc/{m}")
            ax.plot(x, y, lw=0.6, alpha=0.35)
            ax.plot(x, _moving(y), lw=1.6, color=ax.lines[-1].get_color(), label=m)
        ax.set(
            xlabel="step", ylabel="batch AUC", title=f"{title} auxiliary AUC per modality".strip()
        )
        ax.legend(fontsize=8)
        images.append(_png(fig))
    signals = [s for s in FACTOR_SIGNALS if log.modalities(s)]
    if signals:
        fig, axes = _subplots(1, len(signals), figsize=(3.3 * len(signals), 3.0), squeeze=False)
        for ax, signal in zip(axes[0], signals):
            for m in log.modalities(signal):
                x, y = log.step_series(f"{signal}/{m}")
                ax.plot(x, y, lw=1, label=m)
            ax.set(xlabel="step", title=f"{signal} per modality")
            ax.legend(fontsize=7)
        fig.suptitle(f"{title} modulation factors and encoder updates".strip(), fontsize=10)
        images.append(_png(fig))
    x, gap = log.step_series("gap")
    epochs, group_gap = _val_gap(log)
    if gap.size or group_gap.size:
        fig, ax = _subplots(figsize=(5.5, 3.2))
        if gap.size:
            ax.plot(x, gap, lw=0.6, alpha=0.4, label="batch gap")
            ax.plot(x, _moving(gap), lw=1.6, label="batch gap (smoothed)")
        if group_gap.size and x.size:
            # place epoch values at the last logged step of that epoch
            ends = _epoch_end_steps(log)
            ax.plot(
                [ends.get(int(e), np.nan) for e in epochs], group_gap, "o-", label="validation gap"
            )
        elif group_gap.size:
            ax.plot(epochs, group_gap, "o-", label="validation gap (x = epoch)")
        if tau is not None:
            ax.axhline(tau, color="red", ls="--", lw=1.2, label=f"tau = {tau:g}")
        ax.set(xlabel="step", ylabel="max - min group AUC", title=f"{title} group AUC gap".strip())
        ax.legend(fontsize=8)
        images.append(_png(fig))
    e, auc = log.epoch_series("auc")
    if auc.size:
        fig, ax = _subplots(figsize=(5.5, 3.2))
        ax.plot(e, auc, "o-", label="AUC")
        e2, es = log.epoch_series("es_auc")
        if es.size:
            ax.plot(e2, es, "s-", label="ES-AUC")
        for name, (ge, ga) in _val_group_aucs(log).items():
            ax.plot(ge, ga, ls=":", marker=".", label=f"AUC {name}")
        ax.set(xlabel="epoch", ylabel="validation", title=f"{title} validation per epoch".strip())
        ax.legend(fontsize=7)
        images.append(_png(fig))
    weights = _method_epoch_series(log, "group_weight/")
    if weights:
        names = group_names or {}
        fig, ax = _subplots(figsize=(5.5, 3.2))
        for code, (ge, gw) in weights.items():
            ax.plot(ge, gw, "o-", label=names.get(code, f"group {code}"))
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set(
            xlabel="epoch (weights set after its validation)",
            ylabel="task-loss weight",
            title=f"{title} group weights".strip(),
        )
        ax.legend(fontsize=7)
        images.append(_png(fig))
    return images


def _method_epoch_series(log: RunLog, prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{suffix: (epochs, values)} of the numeric `<prefix><suffix>` stats that the method's
    epoch hooks wrote into the epoch records (`method`)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(log.epochs):
        for key, value in (rec.get("method") or {}).items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and math.isfinite(value):
                xs, ys = out.setdefault(key[len(prefix) :], ([], []))
                xs.append(rec.get("epoch", i))
                ys.append(float(value))
    return {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in out.items()}


def _group_names(metrics: Mapping[str, Any], attribute: str | None) -> dict[str, str]:
    """Group code (as text) -> name for an attribute, from a metrics.json's test groups."""
    attrs = ((metrics.get("test") or {}).get("attributes") or {}).get(attribute or "") or {}
    return {str(g.get("code")): str(g.get("name")) for g in attrs.get("groups") or []}


def stacking_rows(
    metrics: Mapping[str, Any], names: Mapping[str, str]
) -> tuple[list[str], list[list[Any]]] | None:
    """The `group_fusion: stacking` fit of a run (metrics.json `posthoc`) as table rows."""
    fits = {
        k.split("/", 1)[1]: v
        for k, v in (metrics.get("posthoc") or {}).items()
        if k.startswith("stacking/")
    }
    if not fits:
        return None
    columns = next((list(v) for v in fits.values() if v), ["fused", "bias"])
    rows = []
    for code, fit in fits.items():
        cells = [f"{fit[c]:+.3f}" for c in columns] if fit else ["shared model"] * len(columns)
        rows.append([names.get(code, code), *cells])
    return ["group", *columns], rows


def _moving(y: np.ndarray) -> np.ndarray:
    width = max(1, y.size // 20)
    kernel = np.ones(width)
    return np.convolve(y, kernel, "same") / np.convolve(np.ones_like(y), kernel, "same")


def _val_group_aucs(log: RunLog) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(log.epochs):
        for name, auc in ((rec.get("val") or {}).get("group_auc") or {}).items():
            if isinstance(auc, (int, float)) and math.isfinite(auc):
                xs, ys = out.setdefault(str(name), ([], []))
                xs.append(rec.get("epoch", i))
                ys.append(auc)
    return {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in out.items()}


def _val_gap(log: RunLog) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i, rec in enumerate(log.epochs):
        aucs = [
            v
            for v in ((rec.get("val") or {}).get("group_auc") or {}).values()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        if len(aucs) >= 2:
            xs.append(rec.get("epoch", i))
            ys.append(max(aucs) - min(aucs))
    return np.asarray(xs, float), np.asarray(ys, float)


def _epoch_end_steps(log: RunLog) -> dict[int, float]:
    ends: dict[int, float] = {}
    for i, rec in enumerate(log.steps):
        if "epoch" in rec:
            ends[int(rec["epoch"])] = float(rec.get("step", i))
    return ends


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def _style(i: int) -> dict[str, Any]:
    """A distinct colour + marker for the i-th row (10 colours, then the next marker)."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[(i // 10) % len(_MARKERS)]}


def scatter_figure(table: bt.Table) -> str | None:
    """Fairness vs AUC of every row, mean with ± std error bars over seeds. Reference rows
    (single-modality models) are horizontal dotted lines, so they do not stretch the axes."""
    rows = [r for r in table.rows if math.isfinite(r.mean.get("auc", math.nan))]
    if not rows:
        return None
    fig, axes = _subplots(1, len(SCATTER_Y), figsize=(4.3 * len(SCATTER_Y), 3.8))
    for ax, (key, name) in zip(axes, SCATTER_Y):
        for i, row in enumerate(rows):
            x, y = row.mean["auc"], row.mean.get(key, math.nan)
            if not math.isfinite(y):
                continue
            style = _style(i)
            if row.reference_only:
                ax.axhline(y, ls=":", lw=1.2, color=style["color"], label=f"{row.variant} (ref.)")
                continue
            xerr, yerr = _nan0(row.std.get("auc")), _nan0(row.std.get(key))
            ax.errorbar(
                x, y, xerr=xerr, yerr=yerr, fmt=style["marker"], color=style["color"],
                capsize=3, label=row.variant,
            )  # fmt: skip
        ax.set(xlabel="AUC", ylabel=name, title=f"{name} vs AUC")
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{table.dataset} / {table.attribute} (mean ± std over seeds)", fontsize=10)
    return _png(fig)


def _nan0(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def paired_figure(table: bt.Table) -> str | None:
    """Forest plot of the paired differences to the reference, one panel per metric."""
    rows = [r for r in table.rows if r.paired]
    if not rows:
        return None
    fig, axes = _subplots(
        1, len(bt.PAIRED_METRICS), figsize=(4 * len(bt.PAIRED_METRICS), 0.45 * len(rows) + 1.4)
    )
    for ax, metric in zip(axes, bt.PAIRED_METRICS):
        for i, row in enumerate(rows):
            p = row.paired[metric]
            ax.plot(p.diffs, [i] * len(p.diffs), "|", color="grey", ms=8)
            if math.isfinite(p.lo):
                ax.errorbar(p.mean, i, xerr=[[p.mean - p.lo], [p.hi - p.mean]], fmt="o", capsize=3)
            elif math.isfinite(p.mean):
                ax.plot(p.mean, i, "o")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [r.variant for r in rows] if metric == "auc" else [])
        ax.set(xlabel=f"Δ {bt.METRIC_NAMES[metric]}", title=bt.METRIC_NAMES[metric])
        ax.invert_yaxis()
    fig.suptitle(
        f"paired difference to {table.reference} (mean, 95% t-interval; ticks = seeds)",
        fontsize=10,
    )
    return _png(fig)


def sweep_figures(table: bt.Table) -> list[str]:
    """Each metric against the swept value: one figure per swept key, one line per entry."""
    keys = list(dict.fromkeys(r.sweep_key for r in table.rows if r.sweep_key is not None))
    reference = next(
        (r for r in table.rows if r.label == table.reference and r.sweep_key is None), None
    )
    metrics = ["auc", "es_auc", "es_acc", "worst_auc", "dpd", "deodds"]
    images = []
    for key in keys:
        swept = [r for r in table.rows if r.sweep_key == key]
        fig, axes = _subplots(2, 3, figsize=(12, 6.4))
        for ax, metric in zip(axes.flat, metrics):
            for label in dict.fromkeys(r.label for r in swept):
                rows = [r for r in swept if r.label == label]
                try:
                    rows.sort(key=lambda r: float(r.sweep_value))
                    xs = [float(r.sweep_value) for r in rows]
                except (TypeError, ValueError):  # categorical values: evenly spaced, labelled
                    xs = list(range(len(rows)))
                    ax.set_xticks(xs, [str(r.sweep_value) for r in rows])
                ys = [r.mean.get(metric, math.nan) for r in rows]
                errs = [_nan0(r.std.get(metric)) for r in rows]
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
            if reference is not None and math.isfinite(reference.mean.get(metric, math.nan)):
                ax.axhline(
                    reference.mean[metric], color="grey", ls="--", lw=1, label=reference.label
                )
            ax.set(xlabel=str(key), title=bt.METRIC_NAMES[metric])
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(
            f"{table.dataset} / {table.attribute}: sweep of {key} (mean ± std over seeds)",
            fontsize=10,
        )
        images.append(_png(fig))
    return images


# ============================================================================================
# Diagnostics as HTML
# ============================================================================================
def findings_html(findings: Sequence[Finding], where: str = "") -> str:
    if not findings:
        return '<div class="ok">No known failure signature found in the training log.</div>'
    parts = []
    for f in findings:
        prefix = f"<b>{_esc(where)}</b>: " if where else ""
        parts.append(
            f'<div class="finding">{prefix}<b>{_esc(f.title)}</b> <code>[{_esc(f.rule)}]</code>'
            f"<br>evidence: {_esc(f.evidence)}<br>what to try: {_esc(f.advice)}</div>"
        )
    return "\n".join(parts)


def grouped_findings_html(findings: Sequence[tuple[str, Finding]]) -> str:
    """Findings of many runs: one box per signature (title, what to try), then the runs that
    show it with their evidence - so 100 runs with the same signature read as one finding."""
    if not findings:
        return findings_html([])
    by_rule: dict[str, list[tuple[str, Finding]]] = {}
    for where, finding in findings:
        by_rule.setdefault(finding.rule, []).append((where, finding))
    parts = []
    for rule, items in by_rule.items():
        first = items[0][1]
        parts.append(
            f'<div class="finding"><b>{_esc(SIGNATURES.get(rule, first.title))}</b> '
            f"<code>[{_esc(rule)}]</code> in {len(items)} runs<br>what to try: "
            f"{_esc(first.advice)}</div>"
        )
        parts.append(
            _table(["run", "finding", "evidence"], [[w, f.title, f.evidence] for w, f in items])
        )
    return "\n".join(parts)


# ============================================================================================
# Run report
# ============================================================================================
def _summary_tables(summary: dict[str, Any]) -> str:
    overall = summary.get("overall") or {}
    policy = summary.get("policy") or {}
    parts = [
        '<p class="note">'
        f"n = {summary.get('n')}, positives = {summary.get('positives')}, threshold = "
        f"{summary.get('threshold')}; policy: {_esc(summary.get('policy'))}</p>",
        _table(
            ["overall", "AUC", "ACC"], [["all", _f(overall.get("auc")), _f(overall.get("acc"))]]
        ),
    ]
    for attribute, block in (summary.get("attributes") or {}).items():
        ci = block.get("ci") or {}
        head = ["attribute", "ES-AUC", "ES-ACC", "DPD", "DEOdds", "dropped unknown"]
        row = [
            attribute,
            _f(block.get("es_auc")) + _ci(ci.get("es_auc")),
            _f(block.get("es_acc")) + _ci(ci.get("es_acc")),
            _f(block.get("dpd")) + _ci(ci.get("dpd")),
            _f(block.get("deodds")) + _ci(ci.get("deodds")),
            block.get("dropped_unknown", 0),
        ]
        parts.append(_table(head, [row]))
        group_rows = [
            [
                g.get("name"),
                g.get("n"),
                g.get("positives"),
                _f(g.get("auc")) + _ci((ci.get("group_auc") or {}).get(str(g.get("name")))),
                _f(g.get("acc")),
                _f(g.get("selection_rate")),
                _f(g.get("tpr")),
                _f(g.get("fpr")),
                "; ".join(
                    [g["auc_note"]] * bool(g.get("auc_note"))
                    + [f"small (n < {policy.get('min_group_size')})"] * bool(g.get("small"))
                ),
            ]
            for g in block.get("groups") or []
        ]
        parts.append(
            _table(
                ["group", "n", "pos", "AUC", "ACC", "sel. rate", "TPR", "FPR", "note"], group_rows
            )
        )
    return "\n".join(parts)


def _intersection_section(name: str, fitted: dict[str, Any]) -> str:
    """The groups of an intersectional attribute as trained: training sizes and merges."""
    limit = fitted.get("min_group_size")
    merged: dict[str, list[str]] = {}
    for m in fitted.get("merged") or []:
        merged.setdefault(m["into"], []).append(f"{m['group']} ({m['n']})")
    rows = [
        [group, n, ", ".join(merged.get(group, []))]
        for group, n in (fitted.get("train_counts") or {}).items()
    ]
    return (
        f"<h2>Intersection {_esc(name)}: groups as trained</h2>"
        + _table(["group", "training samples", "merged from (training samples)"], rows)
        + f'<p class="note">data.min_group_size = {_esc(limit)}: a group with fewer training '
        "samples is merged into its first attribute's remainder (<i>value</i>|other), or into "
        "<i>value</i>|* (every group of that value) when the remainder is still too small; "
        "the same groups in every split.</p>"
    )


def _ci(bounds: Any) -> str:
    if (
        isinstance(bounds, (list, tuple))
        and len(bounds) == 2
        and all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds)
    ):
        return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"
    return ""


def _missingness_section(missingness: dict) -> str:
    """Test metrics per missingness pattern and the missing rates by group (missing
    modalities; `metrics.summarize_missingness`)."""
    parts = ["<h2>Test metrics by missingness pattern</h2>"]
    for attribute, rates in missingness["rates"].items():
        modalities = missingness["modalities"]
        parts.append(f"<h3>Share lacking each modality, by {_esc(attribute)}</h3>")
        parts.append(
            _table(
                ["group", "n", *modalities],
                [
                    [r["name"], r["n"], *(f"{100 * r['missing'][m]:.1f}%" for m in modalities)]
                    for r in rates
                ],
            )
        )
        names = [r["name"] for r in rates]
        rows = []
        for p in missingness["patterns"]:
            entry = p["attributes"].get(attribute, {"es_auc": None, "groups": []})
            by_name = {g["name"]: g for g in entry["groups"]}
            rows.append(
                [
                    p["pattern"],
                    p["n"],
                    _f(p["auc"], 3),
                    _f(entry["es_auc"], 3),
                    *(
                        f"{_f(by_name[n]['auc'], 3)} (n={by_name[n]['n']})" if n in by_name else "-"
                        for n in names
                    ),
                ]
            )
        parts.append(f"<h3>By pattern, groups of {_esc(attribute)}</h3>")
        parts.append(_table(["pattern", "n", "AUC", "ES-AUC", *names], rows))
    return "\n".join(parts)


def render_run_report(run_dir: str | Path) -> str:
    """The HTML report of one run directory (docs/architecture.md layout)."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    log_path = run_dir / "log.jsonl"
    if metrics is None and not log_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no metrics.json and no log.jsonl)")
    metrics = metrics or {}
    tau = metrics.get("tau")
    attribute = metrics.get("attribute")
    body = []
    fields = [
        ("method", metrics.get("method")),
        ("variant", metrics.get("variant")),
        ("attribute", attribute),
        ("selected by", bt.selection_label(metrics)),
        ("selected epoch", metrics.get("selected_epoch")),
        ("tau", tau),
        ("time per step (s)", _f(metrics.get("time_per_step_s"), 4)),
        ("peak memory (MB)", _f((metrics.get("peak_memory_bytes") or math.nan) / 2**20, 0)),
    ]
    body.append(_table(["", ""], [[k, "-" if v is None else v] for k, v in fields]))
    if metrics.get("uses_attribute_at_test"):
        body.append('<p class="note">This method uses the sensitive attribute at test time.</p>')
    stacking = stacking_rows(metrics, _group_names(metrics, attribute))
    if stacking:
        header, rows = stacking
        fitted_on = {"train+validation": "training + validation"}.get(
            (metrics.get("posthoc") or {}).get("stacking_data"), "validation"
        )
        body.append(
            f"<h2>Group-aware stacking (fitted on {fitted_on} after selection)</h2>"
            + _table(header, rows)
            + '<p class="note">Each group\'s prediction is the weighted sum of the fused margin '
            "and each modality head's margin plus the intercept; the shared model is fused 1, "
            "modalities 0, intercept 0 (kept for a group too small to fit).</p>"
        )
    for name, fitted in (metrics.get("intersections") or {}).items():
        body.append(_intersection_section(name, fitted))
    if "test" in metrics:
        body.append("<h2>Test metrics</h2>" + _summary_tables(metrics["test"]))
    missingness = (metrics.get("test") or {}).get("missingness")
    if missingness:
        body.append(_missingness_section(missingness))
    if "val" in metrics:
        body.append(
            "<h2>Validation metrics (selected checkpoint)</h2>" + _summary_tables(metrics["val"])
        )
    rocs = []
    attributes = list(
        (metrics.get("test") or {}).get("attributes") or ([attribute] if attribute else [])
    )
    for name in attributes:
        image = group_roc_figure(run_dir / "predictions_test.csv", name, f"test ROC by {name}")
        if image:
            rocs.append(image)
    body.append("<h2>Per-group ROC curves</h2>")
    body.append(
        f'<div class="figs">{"".join(rocs)}</div>' if rocs else "<p>No test predictions.</p>"
    )
    log = read_log(log_path) if log_path.is_file() else RunLog()
    body.append("<h2>Training</h2>")
    images = training_figures(log, tau, group_names=_group_names(metrics, attribute))
    body.append("".join(images) if images else "<p>No training log signals.</p>")
    body.append("<h2>Diagnostics</h2>")
    body.append(findings_html(diagnose(log, tau)))
    title = f"multifair run report: {run_dir.name}"
    return _page(title, "\n".join(body))


# ============================================================================================
# Benchmark report
# ============================================================================================
def _table_html(table: bt.Table) -> str:
    parts = []
    for i, (title, header, rows, notes) in enumerate(br.table_blocks(table)):
        parts.append(f"<h3>{_esc(title)}</h3>" if i else "")
        parts.append(_table(header, rows))
        parts.extend(f'<p class="note">{_esc(n)}</p>' for n in notes if n)
    return "\n".join(parts)


def render_benchmark_report(
    out_dir: str | Path,
    *,
    collection: bm.Collection | None = None,
    tables: Sequence[bt.Table] | None = None,
    n_boot: int | None = None,
) -> str:
    """The HTML report of a benchmark directory (whatever has finished). Pass `collection`
    and `tables` when they are already built, to avoid a second bootstrap."""
    collection = collection or bm.collect(out_dir)
    if tables is None:
        tables = bt.build_tables(collection, n_boot=n_boot)
    body = [f"<p>{_esc(br.status_line(collection))}. Config: <code>benchmark.yaml</code>.</p>"]
    if not tables:
        body.append("<p>No finished runs yet.</p>")
    for table in tables:
        body.append(f"<h2>{_esc(table.dataset)} / {_esc(table.attribute)}</h2>")
        body.append(_table_html(table))
        body.append("<h3>Fairness vs AUC</h3>")
        body.append(scatter_figure(table) or "")
        paired = paired_figure(table)
        if paired:
            body.append(f"<h3>Paired differences to {_esc(table.reference)}</h3>{paired}")
        sweeps = sweep_figures(table)
        if sweeps:
            body.append("<h3>Sweep</h3>" + "".join(sweeps))
        records = [
            r
            for r in collection.finished
            if r.run.dataset == table.dataset and r.run.attribute == table.attribute
        ]
        body.append("<h3>Per-group ROC curves (first seed of each row)</h3>")
        rocs, curves, findings = [], [], []
        seen: set[str] = set()
        for record in records:
            run, metrics = record.run, record.metrics
            log_path = run.run_dir / "log.jsonl"
            log = read_log(log_path) if log_path.is_file() else RunLog()
            for finding in diagnose(log, metrics.get("tau")):
                findings.append((run.run_id, finding))
            if run.variant in seen:
                continue
            seen.add(run.variant)
            image = group_roc_figure(
                record.predictions, table.attribute, f"{run.variant} (seed {run.seed})"
            )
            if image:
                rocs.append(image)
            curves.append(
                f"<h4>{_esc(run.variant)} (seed {run.seed})</h4>"
                + "".join(
                    training_figures(
                        log, metrics.get("tau"), group_names=_group_names(metrics, table.attribute)
                    )
                )
            )
        body.append(f'<div class="figs">{"".join(rocs)}</div>')
        body.append("<h3>Training curves (first seed of each row)</h3>" + "".join(curves))
        body.append("<h3>Diagnostics (every run)</h3>")
        body.append(grouped_findings_html(findings))
    if collection.failed:
        body.append("<h2>Failed runs</h2>")
        for run, err in collection.failed:
            body.append(f"<p><code>{_esc(run.run_id)}</code></p><pre>{_esc(err)}</pre>")
    if collection.missing:
        body.append(
            f"<h2>Missing runs</h2><p>{len(collection.missing)} runs have no complete metrics.json: "
            + ", ".join(f"<code>{_esc(r.run_id)}</code>" for r in collection.missing[:50])
            + ("..." if len(collection.missing) > 50 else "")
            + "</p>"
        )
    return _page(f"multifair benchmark report: {collection.config.name}", "\n".join(body))


def is_benchmark_dir(path: Path) -> bool:
    return (path / "benchmark.yaml").is_file()


def write_report(
    path: str | Path,
    out: str | Path | None = None,
    *,
    collection: bm.Collection | None = None,
    tables: Sequence[bt.Table] | None = None,
    n_boot: int | None = None,
) -> Path:
    """Write `report.html` for a run directory or a benchmark directory; returns its path."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"not a directory: {path}")
    if is_benchmark_dir(path):
        text = render_benchmark_report(path, collection=collection, tables=tables, n_boot=n_boot)
    else:
        text = render_run_report(path)
    target = Path(out) if out is not None else path / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target
