"""`summarize` returns exactly the schema of docs/architecture.md with oracle-checked values;
`format_table` says what was computed and which edge cases were met; group encoding helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from metric_oracles import all_metrics, auc_pairs

from multifair.errors import UserError
from multifair.metrics import encode_groups, format_table, intersect, summarize

GROUP_KEYS = {
    "code",
    "name",
    "n",
    "positives",
    "auc",
    "auc_note",
    "acc",
    "selection_rate",
    "tpr",
    "fpr",
}
ATTRIBUTE_KEYS = {
    "auc",
    "acc",
    "groups",
    "es_auc",
    "es_acc",
    "dpd",
    "deodds",
    "auc_std_ratio",
    "auc_range_ratio",
    "dropped_unknown",
    "skipped_groups",
}
CI_KEYS = {"level", "n_boot", "seed", "auc", "es_auc", "es_acc", "dpd", "deodds", "group_auc"}


def case(seed=0, n=400):
    rng = np.random.default_rng(seed)
    race = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    gender = rng.choice(2, size=n)
    y = (rng.random(n) < 0.4).astype(int)
    s = np.round(np.clip(0.3 * y + 0.1 * race + rng.random(n) * 0.6, 0, 1), 3)
    gender = np.where(rng.random(n) < 0.05, -1, gender)
    return y, s, {"race": race, "gender": gender}


def test_schema_is_exactly_the_documented_one_and_json_clean():
    y, s, features = case()
    names = {"race": {0: "White", 1: "Black", 2: "Asian"}, "gender": {0: "Female", 1: "Male"}}
    out = summarize(y, s, sensitive_features=features, group_names=names, n_boot=30, seed=3)
    json.dumps(out, allow_nan=False)  # NaN must have become null
    assert set(out) == {"n", "positives", "threshold", "overall", "policy", "attributes"}
    assert set(out["overall"]) == {"auc", "acc"}
    assert out["policy"] == {"unknown": "drop", "single_class": "skip"}
    assert (out["n"], out["positives"], out["threshold"]) == (len(y), int(y.sum()), 0.5)
    assert list(out["attributes"]) == ["race", "gender"]
    for entry in out["attributes"].values():
        assert set(entry) == ATTRIBUTE_KEYS | {"ci"}
        assert set(entry["ci"]) == CI_KEYS
        assert all(set(g) == GROUP_KEYS for g in entry["groups"])
        assert set(entry["ci"]["group_auc"]) == {g["name"] for g in entry["groups"]}
        lo, hi = entry["ci"]["es_auc"]
        assert lo <= entry["es_auc"] <= hi
    assert [g["name"] for g in out["attributes"]["race"]["groups"]] == ["White", "Black", "Asian"]
    assert out["attributes"]["gender"]["dropped_unknown"] == int((features["gender"] == -1).sum())
    assert "ci" not in summarize(y, s, sensitive_features=features)["attributes"]["race"]


@pytest.mark.parametrize("unknown", ["drop", "keep"])
@pytest.mark.parametrize("single_class", ["skip", "propagate"])
def test_values_match_the_oracles(unknown, single_class):
    y, s, features = case(1)
    y = np.where(features["race"] == 2, 1, y)  # race group 2: positives only -> no AUC
    out = summarize(y, s, sensitive_features=features, unknown=unknown, single_class=single_class)
    assert out["overall"]["auc"] == pytest.approx(auc_pairs(y, s))
    assert out["overall"]["acc"] == pytest.approx(np.mean((s >= 0.5) == y))
    for attribute, g in features.items():
        want = all_metrics(y, s, g, unknown=unknown, single_class=single_class)
        got = out["attributes"][attribute]
        known = np.ones(len(y), bool) if unknown == "keep" else g != -1
        assert got["auc"] == pytest.approx(auc_pairs(y[known], s[known]))
        assert got["acc"] == pytest.approx(np.mean((s[known] >= 0.5) == y[known]))
        for key in ("es_auc", "es_acc", "dpd", "deodds", "auc_std_ratio", "auc_range_ratio"):
            expected = None if math.isnan(want[key]) else pytest.approx(want[key], abs=1e-12)
            assert got[key] == expected, (attribute, key)
        for group in got["groups"]:
            w = want["groups"][group["code"]]
            assert (group["n"], group["positives"]) == (w["n"], w["pos"])
            assert group["auc"] == (None if math.isnan(w["auc"]) else pytest.approx(w["auc"]))
            for key, wkey in [
                ("acc", "acc"),
                ("selection_rate", "sel"),
                ("tpr", "tpr"),
                ("fpr", "fpr"),
            ]:
                assert group[key] == pytest.approx(w[wkey])
    race = out["attributes"]["race"]
    assert race["groups"][2]["auc_note"] == "single class (no negatives): AUC undefined"
    assert race["skipped_groups"] == (["2"] if single_class == "skip" else [])
    assert (race["es_auc"] is None) == (single_class == "propagate")


def test_single_class_group_gets_null_interval_and_the_table_says_so():
    y, s, features = case(2)
    y = np.where(features["race"] == 1, 0, y)
    out = summarize(y, s, sensitive_features={"race": features["race"]}, n_boot=20)
    assert out["attributes"]["race"]["ci"]["group_auc"]["1"] == [None, None]
    text = format_table(out)
    assert "undefined (single class)" in text
    assert "note: 1: single class (no positives): AUC undefined; left out of ES-AUC" in text
    assert "note: 1: no positives, so its TPR is 0 in DEOdds" in text
    text = format_table(
        summarize(y, s, sensitive_features={"race": features["race"]}, single_class="propagate")
    )
    assert "ES-AUC undefined" in text
    assert "so ES-AUC and the disparity ratios are undefined (single_class=propagate)" in text


def test_table_reports_policies_counts_and_intervals():
    y, s, features = case(3)
    out = summarize(
        y,
        s,
        sensitive_features=features,
        group_names={"gender": {0: "Female", 1: "Male"}},
        n_boot=25,
    )
    text = format_table(out)
    assert "95% percentile bootstrap CIs (25 resamples, seed 0)" in text
    assert "policy: unknown=drop" in text and "policy: single_class=skip" in text
    assert f"{int((features['gender'] == -1).sum())} with unknown gender dropped" in text
    lo, hi = out["attributes"]["race"]["ci"]["es_auc"]
    assert f"ES-AUC {out['attributes']['race']['es_auc']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    female = out["attributes"]["gender"]["groups"][0]
    assert any(
        line.split()[:3] == ["Female", str(female["n"]), str(female["positives"])]
        for line in text.splitlines()
    )


def test_attribute_with_a_single_group_is_a_user_error():
    y, s, _ = case()
    g = np.where(np.arange(len(y)) % 7 == 0, -1, 0)
    with pytest.raises(
        UserError, match=r"attribute 'site' has a single group \('0', after dropping unknown"
    ):
        summarize(y, s, sensitive_features={"site": g})
    # Keeping unknowns makes -1 a second group, which is then fine.
    out = summarize(y, s, sensitive_features={"site": g}, unknown="keep")
    assert [gr["name"] for gr in out["attributes"]["site"]["groups"]] == ["unknown", "0"]


def test_duplicate_group_names_and_bad_options_are_user_errors():
    y, s, features = case()
    with pytest.raises(UserError, match="share the name 'x'"):
        summarize(
            y,
            s,
            sensitive_features={"race": features["race"]},
            group_names={"race": {0: "x", 1: "x"}},
        )
    with pytest.raises(UserError, match="n_boot=-1"):
        summarize(y, s, sensitive_features=features, n_boot=-1)
    with pytest.raises(UserError, match=r"ci=95 must be strictly between 0 and 1"):
        summarize(y, s, sensitive_features=features, ci=95)


def test_encode_groups_strings_integers_and_missing():
    codes, names = encode_groups(["White", "Black", None, "Asian", "", "White"])
    assert list(codes) == [2, 1, -1, 0, -1, 2]
    assert names == {0: "Asian", 1: "Black", 2: "White"}
    codes, names = encode_groups([3, 0, -1, 3])
    assert list(codes) == [3, 0, -1, 3] and names == {0: "0", 3: "3"}
    codes, _ = encode_groups([1.0, np.nan, 0.0])
    assert list(codes) == [1, -1, 0]
    with pytest.raises(UserError, match=r"col: value 1.5 is neither an integer code"):
        encode_groups([1.0, 1.5], label="col")
    with pytest.raises(UserError, match=r"col: code -3 is invalid"):
        encode_groups([0, -3], label="col")


def test_intersect_names_and_unknowns():
    race = np.array([0, 1, 1, 0, -1, 1])
    gender = np.array([1, 0, 1, 1, 0, -1])
    name, codes, names = intersect(
        {"race": race, "gender": gender},
        ["race", "gender"],
        {"race": {0: "White", 1: "Black"}, "gender": {0: "Female", 1: "Male"}},
    )
    assert name == "race*gender"
    assert [names.get(c, "?") if c >= 0 else "unknown" for c in codes] == [
        "White|Male",
        "Black|Female",
        "Black|Male",
        "White|Male",
        "unknown",
        "unknown",
    ]
    with pytest.raises(UserError, match="at least two attributes"):
        intersect({"race": race}, ["race"])
    with pytest.raises(UserError, match=r"no attribute 'age'; available: \['gender', 'race'\]"):
        intersect({"race": race, "gender": gender}, ["race", "age"])
