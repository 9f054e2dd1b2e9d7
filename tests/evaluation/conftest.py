"""Write real run directories in the documented layout (docs/architecture.md, "A run
directory") so the benchmark tables and the reports can be tested without training.

The summaries are computed here with scikit-learn from the written predictions (an oracle
independent of `multifair.metrics`), so a table's numbers can be checked against them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

GROUP_NAMES = {0: "white", 1: "black", 2: "asian"}


def oracle_summary(y: np.ndarray, score: np.ndarray, codes: np.ndarray, attribute: str) -> dict:
    """The metrics summary schema, computed directly (threshold 0.5, unknown dropped)."""
    pred = (score >= 0.5).astype(int)
    auc = float(roc_auc_score(y, score))
    acc = float(np.mean(pred == y))
    keep = codes >= 0
    groups = []
    for code in sorted(set(codes[keep].tolist())):
        m = codes == code
        yg, sg, pg = y[m], score[m], pred[m]
        groups.append(
            {
                "code": int(code),
                "name": GROUP_NAMES.get(int(code), str(code)),
                "n": int(m.sum()),
                "positives": int(yg.sum()),
                "auc": float(roc_auc_score(yg, sg)) if len(set(yg.tolist())) == 2 else None,
                "auc_note": None,
                "acc": float(np.mean(pg == yg)),
                "selection_rate": float(pg.mean()),
                "tpr": float(pg[yg == 1].mean()) if (yg == 1).any() else 0.0,
                "fpr": float(pg[yg == 0].mean()) if (yg == 0).any() else 0.0,
            }
        )
    aucs = [g["auc"] for g in groups if g["auc"] is not None]
    es_auc = auc / (1 + sum(abs(a - auc) for a in aucs))
    es_acc = acc / (1 + sum(abs(g["acc"] - acc) for g in groups))
    rates = [g["selection_rate"] for g in groups]
    tprs, fprs = [g["tpr"] for g in groups], [g["fpr"] for g in groups]
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "threshold": 0.5,
        "overall": {"auc": auc, "acc": acc},
        "policy": {"unknown": "drop", "single_class": "skip"},
        "attributes": {
            attribute: {
                "groups": groups,
                "es_auc": es_auc,
                "es_acc": es_acc,
                "dpd": max(rates) - min(rates),
                "deodds": max(max(tprs) - min(tprs), max(fprs) - min(fprs)),
                "auc_std_ratio": float(np.std(aucs) / auc),
                "auc_range_ratio": float((max(aucs) - min(aucs)) / auc),
                "dropped_unknown": int((~keep).sum()),
                "skipped_groups": [],
            }
        },
    }


def synthetic_log(
    epochs: int = 4,
    steps_per_epoch: int = 10,
    modalities: tuple[str, ...] = ("fundus", "oct"),
    tau: float = 0.04,
) -> list[dict[str, Any]]:
    """A plausible log.jsonl: both aux AUCs climb, gap below tau, steady validation."""
    records: list[dict[str, Any]] = []
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            rec: dict[str, Any] = {"kind": "step", "step": step, "epoch": epoch, "lr": 1e-3}
            rec["loss/task"] = 0.7 - 0.01 * step
            for i, m in enumerate(modalities):
                rec[f"aux_auc/{m}"] = 0.55 + 0.01 * step / (1 + i)
                rec[f"B/{m}"] = 0.5
                rec[f"f/{m}"] = 1.0
            rec["gap"] = tau / 2
            rec["fair_mode"] = False
            records.append(rec)
            step += 1
        records.append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "train_loss": 0.6,
                "val": {
                    "auc": 0.7 + 0.02 * epoch,
                    "es_auc": 0.65 + 0.02 * epoch,
                    "es_acc": 0.6,
                    "group_auc": {"white": 0.72 + 0.02 * epoch, "black": 0.68 + 0.02 * epoch},
                    "dpd": 0.1,
                    "deodds": 0.1,
                },
                "seconds": 1.0,
            }
        )
    return records


def write_run_dir(
    run_dir: Path,
    *,
    method: str = "erm",
    seed: int = 0,
    attribute: str = "race",
    n: int = 300,
    signal: float = 1.0,
    minority_signal: float | None = None,
    uses_attribute_at_test: bool = False,
    select_by: str = "auc",
    tau: float | None = 0.04,
    log: list[dict[str, Any]] | None = None,
    time_per_step_s: float = 0.01,
    peak_memory_bytes: int = 50 * 2**20,
) -> dict[str, Any]:
    """Write one finished run directory; returns its metrics.json content."""
    rng = np.random.default_rng(1000 + seed)
    y = np.tile([0, 1], n // 2)
    codes = rng.choice([0, 1, 2], size=n, p=[0.7, 0.2, 0.1])
    codes[:3] = [0, 1, 2]
    codes[3:9] = [1, 1, 2, 2, 1, 2]  # both classes in every group
    strength = np.where(codes == 0, signal, signal if minority_signal is None else minority_signal)
    logit = strength * (2 * y - 1) + rng.normal(size=n)
    score = 1 / (1 + np.exp(-logit))
    summary = oracle_summary(y, score, codes, attribute)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"attribute": attribute},
        "method": {"name": method},
        "train": {"seed": seed, "select_by": select_by},
        "output": {"dir": str(run_dir)},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (run_dir / "env.json").write_text(json.dumps({"python": "3"}), encoding="utf-8")
    records = log if log is not None else synthetic_log(tau=tau or 0.04)
    (run_dir / "log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )
    lines = [f"sample_id,split,label,score,{attribute},{attribute}_name"]
    for i in range(n):
        name = GROUP_NAMES[int(codes[i])]
        lines.append(f"data_{i:05d},test,{y[i]},{score[i]:.6f},{codes[i]},{name}")
    (run_dir / "predictions_test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics = {
        "method": method,
        "variant": method,
        "select_by": select_by,
        "selected_epoch": 3,
        "attribute": attribute,
        "val": summary,
        "test": summary,
        "time_per_step_s": time_per_step_s,
        "peak_memory_bytes": peak_memory_bytes,
        "uses_attribute_at_test": uses_attribute_at_test,
        "tau": tau,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return metrics


@pytest.fixture
def make_run_dir() -> Callable[..., dict[str, Any]]:
    return write_run_dir


@pytest.fixture
def make_log() -> Callable[..., list[dict[str, Any]]]:
    return synthetic_log
