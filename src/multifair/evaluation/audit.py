"""`multifair audit`: fairness metrics with bootstrap CIs for any model's predictions.

    multifair audit PREDICTIONS.csv --label label --score score --attribute race [--attribute gender]
    multifair audit --demo

Reads a CSV with one row per prediction (a label in {0, 1}, a probability score, one column per
attribute holding group names or integer codes; multi-class: no `score` column but one
`score_<class>` column per class, labels as class indices or names), prints the metrics table, and writes
DIR/metrics.json (the `summarize` schema) and DIR/report.html (self-contained: the table and
per-group ROC curves as embedded PNGs). Every input mistake is one `UserError` line.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multifair import __version__
from multifair.csvcheck import PRESENT_PREFIX, SCORE_PREFIX, check_csv_header
from multifair.errors import UserError, writing
from multifair.metrics import (
    SINGLE_CLASS_POLICIES,
    UNKNOWN_POLICIES,
    encode_groups,
    format_missingness,
    format_table,
    intersect,
    summarize,
    summarize_missingness,
)

__all__ = ["Predictions", "add_parser", "demo_predictions", "load_predictions", "run"]


DEMO_ATTRIBUTES = ("race", "gender", "ethnicity")


# ------------------------------------------------------------------------------------ arguments
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `multifair audit`."""
    p = subparsers.add_parser(
        "audit",
        help="fairness metrics with bootstrap CIs for any model's predictions (CSV)",
        description="Audit a classifier's predictions: overall and per-group AUC, ES-AUC, ES-ACC, "
        "DPD and DEOdds with percentile bootstrap CIs; writes metrics.json and report.html.",
    )
    p.add_argument("predictions", nargs="?", help="CSV file, one row per prediction")
    p.add_argument(
        "--label", default="label", help="column of true labels in {0, 1} (default: label)"
    )
    p.add_argument(
        "--score", default="score", help="column of positive-class probabilities (default: score)"
    )
    p.add_argument(
        "--attribute",
        action="append",
        default=None,
        metavar="COL",
        help="attribute column (group names or integer codes, -1/empty = unknown); repeat for several",
    )
    p.add_argument(
        "--intersect",
        action="store_true",
        help="also evaluate the intersection of the attributes (e.g. race*gender, groups like Black|Female)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="decision threshold: positive if score >= it (default: 0.5)",
    )
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples; 0 = no CIs (default: 1000)"
    )
    p.add_argument("--ci", type=float, default=0.95, help="confidence level (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument(
        "--unknown",
        choices=UNKNOWN_POLICIES,
        default="drop",
        help="unknown (-1) codes: drop them per attribute, or keep as a group (default: drop)",
    )
    p.add_argument(
        "--single-class",
        choices=SINGLE_CLASS_POLICIES,
        default="skip",
        help="a group with one class: skip it in ES-AUC, or propagate NaN (default: skip)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: runs/audit/<csv name>, or runs/audit-demo)",
    )
    p.add_argument("--demo", action="store_true", help="audit a generated example (no data needed)")
    p.add_argument(
        "--no-report", action="store_true", help="write metrics.json only (skip the HTML report)"
    )
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------- input
@dataclass
class Predictions:
    """Validated predictions: labels, scores, and integer group codes + names per attribute."""

    y_true: np.ndarray  # (n,) int64 in {0, 1} (multi-class: 0..K-1)
    y_score: np.ndarray  # (n,) float64 in [0, 1] (multi-class: (n, K) class probabilities)
    sensitive_features: dict[str, np.ndarray]  # attribute -> (n,) int64, -1 = unknown
    group_names: dict[str, dict[int, str]]
    classes: list[str] | None = None  # multi-class: the class names, in score column order
    # modality -> (n,) bool, from `present_<modality>` columns (a run on data with missing
    # modalities writes them): the audit then adds metrics per missingness pattern
    present: dict[str, np.ndarray] = field(default_factory=dict)


def _line(i: int) -> int:
    """CSV line of data row i (0-based): the header is line 1."""
    return i + 2


def _cell(frame: pd.DataFrame, column: str, i: int) -> str:
    """A CSV cell for an error message: "= 2", "= 'yes'" or "is empty or NaN"."""
    value = frame[column].iloc[i]
    if pd.isna(value):
        return "is empty or NaN"
    return f"= {value.item() if isinstance(value, np.generic) else value!r}"


def load_predictions(
    path: str | Path, *, label: str, score: str, attributes: Sequence[str]
) -> Predictions:
    """Read and validate a predictions CSV; every problem is a UserError naming file, column
    and line. An integer-coded attribute takes its group names from a `<attribute>_name`
    column when there is one (as in a run's predictions_{split}.csv)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file not found: {path}")
    check_csv_header(path)
    try:
        frame = pd.read_csv(path, skip_blank_lines=False, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{path}: cannot read as CSV ({str(exc).strip().splitlines()[0]})"
        ) from None
    columns = [str(c) for c in frame.columns]
    class_cols = [c for c in columns if c.startswith(SCORE_PREFIX)]
    if score not in frame.columns and len(class_cols) >= 2:
        return _load_multiclass(path, frame, label, class_cols, attributes)
    for option, col in [("--label", label), ("--score", score)] + [
        ("--attribute", a) for a in attributes
    ]:
        if col not in frame.columns:
            raise UserError(
                f"{path}: no column {col!r} (given by {option}); available columns: {columns}"
            )
    if len(frame) == 0:
        raise UserError(f"{path}: no rows of predictions")

    labels = pd.to_numeric(frame[label], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{path} line {_line(i)}: {label!r} {_cell(frame, label, i)}; labels must be 0 or 1"
        )
    scores = pd.to_numeric(frame[score], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(scores) | (scores < 0) | (scores > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{path} line {_line(i)}: {score!r} {_cell(frame, score, i)}; scores must be "
            "probabilities in [0, 1]"
        )
    y_true = labels.astype(np.int64)
    if y_true.min() == y_true.max():
        raise UserError(
            f"{path}: {label!r} holds only {y_true[0]}s; AUC is undefined without both classes"
        )
    features, names = _attribute_codes(path, frame, attributes)
    return Predictions(y_true, scores, features, names, present=_presence(path, frame))


def _load_multiclass(
    path: Path, frame: pd.DataFrame, label: str, class_cols: list[str], attributes: Sequence[str]
) -> Predictions:
    """A multi-class predictions CSV: `score_<class>` columns (class order = column order),
    labels as class indices 0..K-1 or class names."""
    columns = [str(c) for c in frame.columns]
    for option, col in [("--label", label)] + [("--attribute", a) for a in attributes]:
        if col not in frame.columns:
            raise UserError(
                f"{path}: no column {col!r} (given by {option}); available columns: {columns}"
            )
    if len(frame) == 0:
        raise UserError(f"{path}: no rows of predictions")
    classes = [c[len(SCORE_PREFIX) :] for c in class_cols]
    k = len(classes)
    by_name = {name: i for i, name in enumerate(classes)}
    raw = frame[label]
    numeric = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    y_true = np.full(len(frame), -1, dtype=np.int64)
    for i, (value, number) in enumerate(zip(raw.tolist(), numeric)):
        if np.isfinite(number) and number == int(number) and 0 <= number < k:
            y_true[i] = int(number)
        elif str(value).strip() in by_name:
            y_true[i] = by_name[str(value).strip()]
        else:
            raise UserError(
                f"{path} line {_line(i)}: {label!r} {_cell(frame, label, i)}; labels must be a "
                f"class index 0..{k - 1} or a class name {classes} (from the "
                f"{SCORE_PREFIX}<class> columns)"
            )
    scores = frame[class_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = (~np.isfinite(scores) | (scores < 0) | (scores > 1)).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{path} line {_line(i)}: {SCORE_PREFIX}<class> columns hold {scores[i].tolist()}; "
            "scores must be probabilities in [0, 1]"
        )
    if len(np.unique(y_true)) < 2:
        raise UserError(f"{path}: {label!r} holds a single class; AUC is undefined")
    features, names = _attribute_codes(path, frame, attributes)
    return Predictions(
        y_true, scores, features, names, classes=classes, present=_presence(path, frame)
    )


def _attribute_codes(
    path: Path, frame: pd.DataFrame, attributes: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, dict[int, str]]]:
    features: dict[str, np.ndarray] = {}
    names: dict[str, dict[int, str]] = {}
    for attribute in attributes:
        codes, code_names = encode_groups(frame[attribute], label=f"{path} column {attribute!r}")
        name_col = f"{attribute}_name"
        if name_col in frame.columns and pd.api.types.is_numeric_dtype(frame[attribute]):
            code_names = code_names | _names_from_column(frame, codes, name_col, path)
        features[attribute], names[attribute] = codes, code_names
    return features, names


def _presence(path: Path, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """modality -> (n,) bool from the `present_<modality>` columns (0/1); {} without any."""
    present = {}
    for column in frame.columns:
        if str(column).startswith(PRESENT_PREFIX):
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isin(values, (0.0, 1.0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UserError(
                    f"{path} line {_line(i)}: {column!r} {_cell(frame, str(column), i)}; "
                    "presence columns must be 0 or 1"
                )
            present[str(column)[len(PRESENT_PREFIX) :]] = values.astype(bool)
    return present


def _names_from_column(
    frame: pd.DataFrame, codes: np.ndarray, name_col: str, path: Path
) -> dict[int, str]:
    """{code: name} from a `<attribute>_name` column; one name per code."""
    pairs = pd.DataFrame({"code": codes, "name": frame[name_col].astype(str)}).drop_duplicates()
    clash = pairs[pairs["code"].duplicated(keep=False)]
    if len(clash):
        code = int(clash["code"].iloc[0])
        raise UserError(
            f"{path}: column {name_col!r} gives code {code} several names: {sorted(clash['name'])}"
        )
    return {int(c): n for c, n in zip(pairs["code"], pairs["name"]) if c >= 0}


# ----------------------------------------------------------------------------------------- demo
def demo_predictions(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A synthetic but realistic predictions table: three race groups with different base rates
    and different separability (so group AUCs, selection rates and TPRs differ), two genders, and
    an ethnicity column with ~4% unknown (empty) values."""
    rng = np.random.default_rng(seed)
    race = rng.choice(["Asian", "Black", "White"], size=n, p=[0.2, 0.15, 0.65])
    gender = rng.choice(["Female", "Male"], size=n, p=[0.55, 0.45])
    ethnicity = rng.choice(["Hispanic", "Non-Hispanic", ""], size=n, p=[0.1, 0.86, 0.04])
    base_rate = {"Asian": 0.45, "Black": 0.55, "White": 0.40}
    separation = {"Asian": 1.9, "Black": 1.3, "White": 2.2}  # the model is weaker for one group
    y = (rng.random(n) < np.vectorize(base_rate.get)(race)).astype(int)
    sep = np.vectorize(separation.get)(race) - 0.2 * (gender == "Male")
    logit = sep * (y - 0.5) + rng.normal(0.0, 1.0, n) - 0.1
    score = np.round(1.0 / (1.0 + np.exp(-logit)), 4)
    return pd.DataFrame(
        {
            "sample_id": [f"demo_{i:05d}" for i in range(n)],
            "label": y,
            "score": score,
            "race": race,
            "gender": gender,
            "ethnicity": ethnicity,
        }
    )


# --------------------------------------------------------------------------------------- report
def render_html(
    summary: dict[str, Any], table: str, figures: dict[str, bytes], *, source: str, command: str
) -> str:
    """A self-contained HTML report: the table, the per-attribute ROC pictures (base64 PNG)."""
    images = "\n".join(
        f'<figure><img alt="ROC curves by {html.escape(a)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>ROC curves by '
        f"{html.escape(a)}</figcaption></figure>"
        for a, png in figures.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>multifair audit: {html.escape(source)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
figure {{ display: inline-block; margin: 0.5em; }} code {{ background: #f0f0f0; }}
</style></head><body>
<h1>Fairness audit</h1>
<p>Predictions: <code>{html.escape(source)}</code> &middot; multifair {__version__} &middot;
command: <code>{html.escape(command)}</code></p>
<p>Definitions follow FairVision (ES-AUC, ES-ACC, between-group disparity), fairlearn (DPD,
DEOdds) and scikit-learn (AUC); see docs/metrics.md. These numbers describe measured disparities
of this model on these data; they do not certify a model as fair.</p>
<h2>Metrics</h2>
<pre>{html.escape(table)}</pre>
<h2>ROC curves by group</h2>
{images}
<h2>metrics.json</h2>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>
</body></html>
"""


# ------------------------------------------------------------------------------------------ run
def _command(args: argparse.Namespace) -> str:
    """The audit as a command line (for the report), rebuilt from the parsed arguments."""
    parts = ["multifair", "audit"]
    parts += ["--demo"] if args.demo else [args.predictions]
    parts += ["--label", args.label, "--score", args.score]
    for a in args.attribute or []:
        parts += ["--attribute", a]
    parts += ["--intersect"] if args.intersect else []
    parts += ["--threshold", f"{args.threshold:g}", "--n-boot", str(args.n_boot)]
    parts += ["--ci", f"{args.ci:g}", "--seed", str(args.seed)]
    parts += ["--unknown", args.unknown, "--single-class", args.single_class]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    """Audit the predictions named by `args`; returns the exit status."""
    if args.n_boot < 0:
        raise UserError(f"--n-boot {args.n_boot}: must be >= 0")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold {args.threshold}: must be in [0, 1]")
    if not 0.0 < args.ci < 1.0:
        raise UserError(f"--ci {args.ci}: must be strictly between 0 and 1 (e.g. 0.95)")
    attributes = list(args.attribute or [])
    if args.demo:
        if args.predictions:
            raise UserError("give either PREDICTIONS.csv or --demo, not both")
        out = Path(args.out or "runs/audit-demo")
        source = out / "demo_predictions.csv"
        with writing(source):
            out.mkdir(parents=True, exist_ok=True)
            demo_predictions().to_csv(source, index=False)
        print(f"demo: generated {source} (3000 synthetic predictions)")
        attributes = attributes or list(DEMO_ATTRIBUTES)
    else:
        if not args.predictions:
            raise UserError(
                "give a predictions CSV (multifair audit FILE.csv --attribute COL ...) or --demo"
            )
        if not attributes:
            raise UserError("give at least one --attribute COLUMN (e.g. --attribute race)")
        source = Path(args.predictions)
        out = Path(args.out or Path("runs/audit") / source.stem)
    if len(set(attributes)) != len(attributes):
        raise UserError(f"--attribute given twice: {attributes}")
    if args.intersect and len(attributes) < 2:
        raise UserError("--intersect needs at least two --attribute columns")

    preds = load_predictions(source, label=args.label, score=args.score, attributes=attributes)
    features, names = dict(preds.sensitive_features), dict(preds.group_names)
    if args.intersect:
        combined, codes, combo_names = intersect(features, attributes, names)
        features[combined], names[combined] = codes, combo_names
    summary = summarize(
        preds.y_true,
        preds.y_score,
        sensitive_features=features,
        group_names=names,
        threshold=args.threshold,
        n_boot=args.n_boot,
        ci=args.ci,
        seed=args.seed,
        unknown=args.unknown,
        single_class=args.single_class,
        class_names=preds.classes,
    )
    table = format_table(summary)
    if preds.present:  # per missingness pattern, and missingness rates by group
        summary["missingness"] = summarize_missingness(
            preds.y_true,
            preds.y_score,
            preds.present,
            sensitive_features=features,
            group_names=names,
            threshold=args.threshold,
        )
        table += "\n\n" + format_missingness(summary["missingness"])
    print(table)

    with writing(out / "metrics.json"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written = [out / "metrics.json"]
    if not args.no_report:
        from multifair.evaluation.plots import roc_curves_png  # matplotlib only when needed

        figures = {
            a: roc_curves_png(
                preds.y_true,
                preds.y_score,
                groups=codes,
                group_names=names[a],
                title=f"ROC by {a}",
                unknown=args.unknown,
            )
            for a, codes in features.items()
            if preds.classes is None  # ROC curves are binary; multi-class: the table only
        }
        report = render_html(summary, table, figures, source=str(source), command=_command(args))
        with writing(out / "report.html"):
            (out / "report.html").write_text(report, encoding="utf-8")
        written.append(out / "report.html")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
