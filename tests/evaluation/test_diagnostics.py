"""Each diagnostic rule on a hand-made log that triggers it and one that does not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from multifair.errors import UserError
from multifair.evaluation.diagnostics import (
    RULES,
    SIGNATURES,
    RunLog,
    auc_drop_on_fair_mode,
    aux_auc_plateau,
    diagnose,
    es_auc_oscillation,
    gap_above_tau,
    read_log,
)


def steps(n: int, **series: list[float] | np.ndarray) -> list[dict]:
    """n step records in one epoch per 10 steps; `series` maps a log key to n values."""
    records = []
    for i in range(n):
        rec = {"kind": "step", "step": i, "epoch": i // 10}
        for key, values in series.items():
            rec[key] = values[i]
        records.append(rec)
    return records


def epochs(**series: list[float]) -> list[dict]:
    n = len(next(iter(series.values())))
    return [
        {"kind": "epoch", "epoch": e, "val": {k: v[e] for k, v in series.items()}} for e in range(n)
    ]


# ---- aux AUC plateau ------------------------------------------------------------------------
def test_plateau_fires_when_one_modality_is_flat_and_the_other_climbs():
    n = 60
    climbing = np.linspace(0.6, 0.9, n)
    flat = np.concatenate([np.linspace(0.5, 0.62, n // 2), np.full(n - n // 2, 0.62)])
    log = RunLog(steps=steps(n, **{"aux_auc/fundus": climbing, "aux_auc/oct": flat}))
    finding = aux_auc_plateau(log)
    assert finding is not None
    assert finding.title.startswith("oct auxiliary AUC plateaus while fundus")
    assert "rho" in finding.advice


def test_plateau_silent_when_both_climb_or_the_flat_one_is_at_the_ceiling():
    n = 60
    both = RunLog(
        steps=steps(
            n,
            **{"aux_auc/fundus": np.linspace(0.6, 0.9, n), "aux_auc/oct": np.linspace(0.5, 0.7, n)},
        )
    )
    assert aux_auc_plateau(both) is None
    saturated = RunLog(
        steps=steps(
            n, **{"aux_auc/fundus": np.full(n, 0.99), "aux_auc/oct": np.linspace(0.5, 0.7, n)}
        )
    )
    assert aux_auc_plateau(saturated) is None
    # one modality only: nothing to compare
    assert aux_auc_plateau(RunLog(steps=steps(n, **{"aux_auc/oct": np.full(n, 0.6)}))) is None


# ---- gap above tau ----------------------------------------------------------------------------
def test_gap_fires_when_above_tau_for_most_steps():
    gap = [0.10] * 40 + [0.02] * 10  # 80% above
    finding = gap_above_tau(RunLog(steps=steps(50, gap=gap)), tau=0.04)
    assert finding is not None
    assert "80%" in finding.evidence
    assert "delta" in finding.advice and "tau" in finding.advice


def test_gap_silent_when_mostly_below_tau():
    gap = [0.10] * 20 + [0.02] * 30  # 40% above
    assert gap_above_tau(RunLog(steps=steps(50, gap=gap)), tau=0.04) is None
    # exactly half is not "most"
    assert gap_above_tau(RunLog(steps=steps(50, gap=[0.1, 0.0] * 25)), tau=0.04) is None


def test_gap_falls_back_to_fair_mode_without_tau():
    on = RunLog(steps=steps(20, fair_mode=[True] * 15 + [False] * 5))
    assert gap_above_tau(on, tau=None) is not None
    off = RunLog(steps=steps(20, fair_mode=[True] * 5 + [False] * 15))
    assert gap_above_tau(off, tau=None) is None


# ---- AUC drop when fairness switches on -------------------------------------------------------
def test_auc_drop_fires_when_val_auc_falls_in_the_switch_epoch():
    mode = [False] * 20 + [True] * 10  # epochs 0, 1 off; epoch 2 on
    log = RunLog(steps=steps(30, fair_mode=mode), epochs=epochs(auc=[0.75, 0.78, 0.72]))
    finding = auc_drop_on_fair_mode(log)
    assert finding is not None
    assert "epoch 2: val AUC 0.780 -> 0.720" in finding.evidence
    assert "lambda_f" in finding.advice


def test_auc_drop_silent_when_auc_holds_or_mode_never_switches():
    mode = [False] * 20 + [True] * 10
    holds = RunLog(steps=steps(30, fair_mode=mode), epochs=epochs(auc=[0.75, 0.78, 0.79]))
    assert auc_drop_on_fair_mode(holds) is None
    # a drop without a switch is not this signature
    never = RunLog(steps=steps(30, fair_mode=[False] * 30), epochs=epochs(auc=[0.75, 0.78, 0.70]))
    assert auc_drop_on_fair_mode(never) is None


# ---- ES-AUC oscillation -----------------------------------------------------------------------
def test_oscillation_fires_on_zigzag_es_auc():
    log = RunLog(epochs=epochs(es_auc=[0.70, 0.75, 0.69, 0.76, 0.68, 0.74]))
    finding = es_auc_oscillation(log)
    assert finding is not None
    assert "batch size" in finding.advice


def test_oscillation_silent_on_steady_or_tiny_changes():
    assert es_auc_oscillation(RunLog(epochs=epochs(es_auc=[0.70, 0.71, 0.72, 0.73, 0.74]))) is None
    tiny = [0.700, 0.702, 0.699, 0.701, 0.700, 0.702]  # zigzag below the amplitude threshold
    assert es_auc_oscillation(RunLog(epochs=epochs(es_auc=tiny))) is None
    assert es_auc_oscillation(RunLog(epochs=epochs(es_auc=[0.7, 0.8, 0.7]))) is None  # too short


# ---- reading and the whole set ------------------------------------------------------------------
def test_read_log_skips_a_truncated_last_line_but_rejects_a_bad_middle_line(tmp_path):
    path = tmp_path / "log.jsonl"
    good = json.dumps({"kind": "step", "step": 0, "gap": 0.1})
    path.write_text(good + "\n" + json.dumps({"kind": "epoch", "epoch": 0}) + '\n{"kind": "st')
    log = read_log(path)
    assert len(log.steps) == 1 and len(log.epochs) == 1
    path.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(UserError, match=r"log.jsonl:2"):
        read_log(path)
    with pytest.raises(UserError, match="not found"):
        read_log(tmp_path / "missing.jsonl")


def test_diagnose_runs_every_rule():
    gap = [0.10] * 50
    log = RunLog(steps=steps(50, gap=gap), epochs=epochs(es_auc=[0.70, 0.75, 0.69, 0.76, 0.68]))
    assert [f.rule for f in diagnose(log, tau=0.04)] == ["gap_above_tau", "es_auc_oscillation"]
    assert diagnose(RunLog(), tau=0.04) == []


def test_every_rule_has_a_signature_line():
    assert [rule.__name__ for rule in RULES] == list(SIGNATURES)
