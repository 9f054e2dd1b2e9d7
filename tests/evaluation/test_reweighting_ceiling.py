"""benchmarks/reweighting_ceiling.py: the ideal-observer curve quoted in docs/results.md.
Oracles: the binormal closed form Phi(d' / sqrt 2), and the ordering a reweighting must give."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reweighting_ceiling.py"
spec = importlib.util.spec_from_file_location("reweighting_ceiling", SCRIPT)
ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ceiling)


def test_effective_dprime_inverts_the_binormal_auc():
    row = {"mean": {"auc/a": 0.76, "auc/b": 0.5, "auc/c": 0.95}}
    d = ceiling.effective_dprime(row, ["a", "b", "c"])
    np.testing.assert_allclose(norm.cdf(d / math.sqrt(2)), [0.76, 0.5, 0.95], atol=1e-12)


def test_one_modality_equal_groups_matches_the_closed_form_and_weights_change_nothing():
    d = np.full((1, 3), 1.2)
    rows = ceiling.simulate(d, np.array([0.1, 0.15, 0.75]), [1, 4], n=60_000, seed=0)
    expected = norm.cdf(1.2 / math.sqrt(2))
    for r in rows:
        assert r["auc"] == pytest.approx(expected, abs=0.01)
        assert all(r[f"auc/{h}"] == pytest.approx(expected, abs=0.02) for h in range(3))
    # no group differs, so the weights leave the score's ranking unchanged
    assert rows[1]["auc"] == pytest.approx(rows[0]["auc"], abs=1e-9)


def test_minority_weights_trade_majority_auc_for_minority_auc():
    d = np.array([[0.4, 0.5, 2.3], [1.0, 0.9, 1.0]])  # easy modality weak for minorities
    rows = ceiling.simulate(d, np.array([0.1, 0.15, 0.75]), [1, 2, 8], n=60_000, seed=1)
    es = [r["es_auc"] for r in rows]
    asian, white = [r["auc/0"] for r in rows], [r["auc/2"] for r in rows]
    assert es[0] < es[1] < es[2]
    assert asian[0] < asian[2] and white[0] > white[2]
    assert rows[2]["auc"] < rows[0]["auc"]


def test_cli_prints_the_curve_and_names_a_missing_row(tmp_path):
    groups = ["Asian", "Black", "White"]

    def row(label, aucs, reference_only=False):
        mean = {"auc": 0.8, "es_auc": 0.7, **{f"auc/{g}": a for g, a in zip(groups, aucs)}}
        return {"label": label, "mean": mean, "reference_only": reference_only}

    table = {
        "groups": groups,
        "rows": [row("a only", [0.6, 0.6, 0.95]), row("b only", [0.75] * 3), row("erm", [0.7] * 3)],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"tables": [table]}))
    cmd = [sys.executable, str(SCRIPT), str(path), "--n", "20000"]
    out = subprocess.run([*cmd, "--unimodal", "a only", "b only"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| 4 |" in out.stdout and "| erm | 0.800 | 0.700 |" in out.stdout
    bad = subprocess.run([*cmd, "--unimodal", "c only"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no row ['c only']" in bad.stderr
    missing = subprocess.run(
        [*cmd[:2], str(tmp_path / "nope.json"), "--unimodal", "a only"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "not a benchmark results.json" in missing.stderr
    table["rows"][0]["mean"]["auc/Asian"] = float("nan")  # a group with one class
    path.write_text(json.dumps({"tables": [table]}))
    nan = subprocess.run([*cmd, "--unimodal", "a only", "b only"], capture_output=True, text=True)
    assert nan.returncode != 0 and "a group AUC is missing" in nan.stderr
