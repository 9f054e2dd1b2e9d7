"""The run report shows the test metrics per missingness pattern when metrics.json has them."""

from __future__ import annotations

import json

import numpy as np

from multifair.evaluation.report import render_run_report
from multifair.metrics import summarize, summarize_missingness


def test_run_report_has_the_pattern_tables(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    score = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.3, n), 0, 1)
    group = rng.integers(0, 2, n)
    present = {"a": np.ones(n, bool), "b": rng.random(n) > 0.3}
    names = {"sex": {0: "Female", 1: "Male"}}
    test = summarize(y, score, sensitive_features={"sex": group}, group_names=names)
    test["missingness"] = summarize_missingness(
        y, score, present, sensitive_features={"sex": group}, group_names=names
    )
    (tmp_path / "metrics.json").write_text(
        json.dumps({"method": "erm", "attribute": "sex", "test": test})
    )
    html = render_run_report(tmp_path)
    assert "Test metrics by missingness pattern" in html
    lacking = test["missingness"]["patterns"][1]
    assert lacking["pattern"] == "b missing"
    assert f"{lacking['auc']:.3f}" in html and "all present" in html
    share = float(np.mean(~present["b"][group == 0]))
    assert f"{100 * share:.1f}%" in html
