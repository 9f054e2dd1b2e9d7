"""benchmarks/blind_fusion_ceiling.py: the group-blind fronts quoted in docs/results.md (issue 17
part 4). Oracles: the binormal closed form, equal groups (nothing to trade), and the orderings
the fronts must show where one modality is weak for the minorities."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "blind_fusion_ceiling.py"
spec = importlib.util.spec_from_file_location("blind_fusion_ceiling", SCRIPT)
ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ceiling)
MIX = np.array([0.1, 0.15, 0.75])


def test_equal_groups_every_score_is_the_closed_form():
    d = np.full((2, 3), 1.0)  # two modalities, d' 1 each, every group alike: total d' sqrt 2
    rows = dict(ceiling.fronts(d, MIX, [4], [0, 1], n=40_000, seed=0))
    expected = norm.cdf(math.sqrt(2) / math.sqrt(2))
    for r in rows.values():
        assert r["auc"] == pytest.approx(expected, abs=0.01)
    base = rows["reweighted k = 1"]["auc"]
    assert rows["reweighted k = 4"]["auc"] == pytest.approx(base, abs=1e-9)  # same ranking
    assert rows["distilled: E[aware | s]"]["auc"] == pytest.approx(base, abs=1e-9)


def test_where_fundus_is_weak_for_the_minorities_the_fronts_are_ordered():
    d = np.array([[0.7, 0.6, 2.2], [1.1, 1.1, 1.1]])
    rows = ceiling.fronts(d, MIX, [4], [0, 0.5, 1], n=60_000, seed=1)
    by = dict(rows)
    base = by["reweighted k = 1"]
    aware = next(r for label, r in rows if label.startswith("aware"))
    blind = [r for label, r in rows if label.startswith("blind stacking")]
    assert aware["auc"] > base["auc"] + 0.005 and aware["es_auc"] > base["es_auc"] + 0.015
    # a student of the aware teacher, without the group, gains nothing over plain training
    assert by["distilled: E[aware | s]"]["es_auc"] < base["es_auc"] + 0.002
    # the group weights buy ES-AUC with the majority's AUC, monotonically
    assert blind[0]["es_auc"] == pytest.approx(base["es_auc"], abs=0.003)
    assert blind[0]["es_auc"] < blind[1]["es_auc"] < blind[2]["es_auc"]
    assert blind[2]["auc/2"] < blind[0]["auc/2"] and blind[2]["auc/0"] > blind[0]["auc/0"]


def test_cli_prints_the_fronts_from_dprime():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dprime", "0.7", "0.6", "2.2", "--dprime", "1.1", "1.1",
         "1.1", "--n", "20000", "--weights", "2", "--powers", "0", "1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "distilled" in out and "blind stacking p = 1" in out and "reweighted k = 2" in out
