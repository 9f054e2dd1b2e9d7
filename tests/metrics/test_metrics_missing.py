"""Metrics per missingness pattern and missingness rates by group, against sklearn on the
subsets and plain counts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from multifair.metrics import es_auc, format_missingness, summarize_missingness


def _data(seed: int = 0, n: int = 600):
    rng = np.random.default_rng(seed)
    group = rng.choice([0, 1, 2], n, p=[0.2, 0.2, 0.6])
    group[:5] = -1  # unknown
    y = rng.integers(0, 2, n)
    score = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.3, n), 0, 1)
    rate = np.array([0.4, 0.3, 0.05])[np.maximum(group, 0)]
    present = {"fundus": rng.random(n) > rate, "oct": rng.random(n) > 0.1}
    present["oct"] |= ~present["fundus"]  # nobody lacks both
    return y, score, group, present


def test_patterns_match_sklearn_on_subsets():
    y, score, group, present = _data()
    names = {0: "Asian", 1: "Black", 2: "White"}
    out = summarize_missingness(
        y, score, present, sensitive_features={"race": group}, group_names={"race": names}
    )
    patterns = {p["pattern"]: p for p in out["patterns"]}
    assert out["patterns"][0]["pattern"] == "all present"
    subsets = {
        "all present": present["fundus"] & present["oct"],
        "fundus missing": ~present["fundus"] & present["oct"],
        "oct missing": present["fundus"] & ~present["oct"],
    }
    assert set(patterns) == set(subsets)
    assert sum(p["n"] for p in out["patterns"]) == len(y)
    for name, rows in subsets.items():
        p = patterns[name]
        assert p["n"] == int(rows.sum())
        assert p["positives"] == int(y[rows].sum())
        assert p["auc"] == pytest.approx(roc_auc_score(y[rows], score[rows]), abs=1e-12)
        race = p["attributes"]["race"]
        for entry in race["groups"]:
            member = rows & (group == entry["code"])
            assert entry["n"] == int(member.sum())
            assert entry["name"] == names[entry["code"]]
            if len(set(y[member])) == 2:
                assert entry["auc"] == pytest.approx(roc_auc_score(y[member], score[member]))
        assert race["es_auc"] == pytest.approx(es_auc(y[rows], score[rows], groups=group[rows]))


def test_rates_by_group():
    y, score, group, present = _data(seed=1)
    out = summarize_missingness(y, score, present, sensitive_features={"race": group})
    rates = {r["code"]: r for r in out["rates"]["race"]}
    assert set(rates) == {0, 1, 2}  # unknown (-1) is not a group
    for code, r in rates.items():
        member = group == code
        assert r["n"] == int(member.sum())
        assert r["missing"]["fundus"] == pytest.approx(float(np.mean(~present["fundus"][member])))
        assert r["missing"]["oct"] == pytest.approx(float(np.mean(~present["oct"][member])))
    assert rates[0]["missing"]["fundus"] > rates[2]["missing"]["fundus"]


def test_single_class_pattern_has_no_auc_and_the_table_prints():
    y = np.array([0, 1, 0, 1, 1, 1])
    score = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.6])
    present = {"a": np.array([1, 1, 1, 1, 0, 0], bool), "b": np.ones(6, bool)}
    group = np.array([0, 0, 1, 1, 0, 1])
    out = summarize_missingness(y, score, present, sensitive_features={"g": group})
    lacking = next(p for p in out["patterns"] if p["pattern"] == "a missing")
    assert lacking["auc"] is None and lacking["attributes"]["g"]["es_auc"] is None
    # one group with an AUC: ES-AUC would compare the group with itself, so there is none
    one_group = summarize_missingness(
        y, score, {"a": np.ones(6, bool)}, sensitive_features={"g": np.array([0, 0, 0, 0, 1, 1])}
    )
    assert one_group["patterns"][0]["auc"] is not None
    assert one_group["patterns"][0]["attributes"]["g"]["es_auc"] is None
    text = format_missingness(out)
    assert "a missing" in text and "all present" in text and "missing modalities by g" in text


def test_a_pattern_whose_samples_all_have_an_unknown_group():
    """Only unknown-group samples lack the fundus: that pattern has no group table (it used
    to raise 'every sample has an unknown group' and stop the audit or the training run)."""
    y, score, group, present = _data()
    present["fundus"] = group != -1
    present["oct"] = np.ones(len(y), dtype=bool)
    out = summarize_missingness(y, score, present, sensitive_features={"race": group})
    patterns = {p["pattern"]: p for p in out["patterns"]}
    assert patterns["fundus missing"]["n"] == 5
    assert patterns["fundus missing"]["attributes"]["race"] == {"es_auc": None, "groups": []}
    assert len(patterns["all present"]["attributes"]["race"]["groups"]) == 3


def test_inputs_of_another_length_are_one_clear_error():
    from multifair.errors import UserError

    y, score, group, present = _data()
    present["oct"] = present["oct"][:-1]
    with pytest.raises(UserError, match=r"y_true has 600 entries but .*present\['oct'\].*599"):
        summarize_missingness(y, score, present, sensitive_features={"race": group})
