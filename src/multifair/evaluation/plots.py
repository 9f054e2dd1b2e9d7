"""Pictures for reports: per-group ROC curves as PNG bytes.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it
works on headless machines and never changes the caller's matplotlib state."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from multifair.metrics.fairness import UNKNOWN, auc_note, roc_auc
from multifair.metrics.groups import group_name

__all__ = ["roc_curves_png"]


def roc_curves_png(
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    groups: np.ndarray,
    group_names: Mapping[int, str] | None = None,
    title: str = "",
    unknown: str = "drop",
    dpi: int = 110,
) -> bytes:
    """ROC curve of every group of one attribute (and of all evaluated samples, dashed) as PNG.

    Groups follow `unknown` like the metrics do; a single-class group has no curve and says so
    in the legend."""
    y_true, y_score, groups = np.asarray(y_true), np.asarray(y_score), np.asarray(groups)
    keep = groups != UNKNOWN if unknown == "drop" else np.ones(len(groups), dtype=bool)
    y_true, y_score, groups = y_true[keep], y_score[keep], groups[keep]

    fig = Figure(figsize=(5.2, 4.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.8", lw=1, zorder=0)
    for code in np.unique(groups):
        m = groups == code
        name = group_name(code, group_names)
        note = auc_note(int(m.sum()), int(y_true[m].sum()))
        if note is not None:
            ax.plot([], [], " ", label=f"{name} (n={int(m.sum())}): no ROC, single class")
            continue
        fpr, tpr, _ = roc_curve(y_true[m], y_score[m])
        auc = roc_auc(y_true[m], y_score[m])
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (n={int(m.sum())}) AUC {auc:.3f}")
    if 0 < y_true.sum() < len(y_true):
        fpr, tpr, _ = roc_curve(y_true, y_score)
        auc = roc_auc(y_true, y_score)
        ax.plot(fpr, tpr, "k--", lw=1.2, label=f"all evaluated AUC {auc:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
