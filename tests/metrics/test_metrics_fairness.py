"""Every metric against independent oracles: scikit-learn, fairlearn, and float64 loops written
from the formulas (metric_oracles.py), on random and hand-built inputs and the edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from metric_oracles import all_metrics, auc_pairs, fairlearn_rates, per_group
from sklearn.metrics import roc_auc_score

from multifair.errors import UserError
from multifair.metrics import (
    accuracy,
    between_group_disparity,
    demographic_parity_difference,
    disaggregate,
    equalized_odds_difference,
    es_acc,
    es_auc,
    false_positive_rate_by_group,
    group_auc,
    roc_auc,
    selection_rate_by_group,
    true_positive_rate_by_group,
)


def random_case(seed: int, n: int = 240, n_groups: int = 3, unknown_frac: float = 0.0):
    """Labels, scores with many ties (2 decimals), unequal groups, some unknown codes."""
    rng = np.random.default_rng(seed)
    g = rng.choice(
        n_groups, size=n, p=np.arange(1, n_groups + 1) / np.arange(1, n_groups + 1).sum()
    )
    y = (rng.random(n) < 0.3 + 0.15 * g).astype(int)
    s = np.round(np.clip(0.35 * y + 0.08 * g + rng.random(n) * 0.6, 0, 1), 2)
    g = np.where(rng.random(n) < unknown_frac, -1, g)
    return y, s, g


# A hand-built case small enough to check on paper:
#   group 0: positives .4 .9 vs negatives .1 .6 -> 3 of 4 pairs -> AUC 0.75
#   group 1: positives .3 .8 .7 vs negative .2 -> AUC 1.0; all: 13 of 15 pairs -> 13/15
#   ES-AUC = (13/15) / (1 + 7/60 + 8/60) = 0.69333...; at 0.5: acc 0.5, 0.75, all 0.625
#   -> ES-ACC = 0.625 / 1.25 = 0.5; selection 0.5 and 0.5 -> DPD 0
#   TPR 0.5 vs 2/3, FPR 0.5 vs 0 -> DEOdds 0.5; std(0.75, 1) = 0.125
HAND_Y = np.array([0, 0, 1, 1, 0, 1, 1, 1])
HAND_S = np.array([0.1, 0.6, 0.4, 0.9, 0.2, 0.3, 0.8, 0.7])
HAND_G = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_hand_built_case_matches_paper_arithmetic():
    kw = {"groups": HAND_G}
    assert roc_auc(HAND_Y, HAND_S) == pytest.approx(13 / 15)
    assert group_auc(HAND_Y, HAND_S, **kw) == pytest.approx({0: 0.75, 1: 1.0})
    assert es_auc(HAND_Y, HAND_S, **kw) == pytest.approx((13 / 15) / 1.25)
    assert es_acc(HAND_Y, HAND_S, **kw) == pytest.approx(0.5)
    assert demographic_parity_difference(HAND_Y, HAND_S, **kw) == pytest.approx(0.0)
    assert equalized_odds_difference(HAND_Y, HAND_S, **kw) == pytest.approx(0.5)
    assert true_positive_rate_by_group(HAND_Y, HAND_S, **kw) == pytest.approx({0: 0.5, 1: 2 / 3})
    assert false_positive_rate_by_group(HAND_Y, HAND_S, **kw) == pytest.approx({0: 0.5, 1: 0.0})
    std_ratio, range_ratio = between_group_disparity(HAND_Y, HAND_S, **kw)
    assert std_ratio == pytest.approx(0.125 / (13 / 15))
    assert range_ratio == pytest.approx(0.25 / (13 / 15))


def test_threshold_is_inclusive_like_fairvision():
    # score == threshold counts as a positive decision (FairVision uses >= 0.5).
    y, s, g = np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.2, 0.1]), np.array([0, 0, 1, 1])
    assert selection_rate_by_group(y, s, groups=g) == {0: 1.0, 1: 0.0}
    assert accuracy(y, s) == 0.5
    assert selection_rate_by_group(y, s, groups=g, threshold=0.6) == {0: 0.0, 1: 0.0}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("unknown", ["drop", "keep"])
def test_random_inputs_match_sklearn_fairlearn_and_formulas(seed, unknown):
    y, s, g = random_case(seed, unknown_frac=0.1)
    threshold = [0.5, 0.3, 0.62][seed % 3]
    want = all_metrics(y, s, g, threshold=threshold, unknown=unknown)
    kw = {"groups": g, "unknown": unknown}
    table = disaggregate(y, s, threshold=threshold, **kw)
    assert table.dropped_unknown == (int((g == -1).sum()) if unknown == "drop" else 0)
    assert list(table.codes) == sorted(want["groups"])
    ye, se, ge = (y[g != -1], s[g != -1], g[g != -1]) if unknown == "drop" else (y, s, g)
    # AUC: both the pairwise float64 oracle and scikit-learn.
    assert table.overall_auc == pytest.approx(want["overall_auc"], abs=1e-12)
    assert table.overall_auc == pytest.approx(roc_auc_score(ye, se), abs=1e-12)
    got_auc = group_auc(y, s, **kw)
    for code, v in want["groups"].items():
        m = ge == code
        assert got_auc[code] == pytest.approx(v["auc"], abs=1e-12)
        assert got_auc[code] == pytest.approx(roc_auc_score(ye[m], se[m]), abs=1e-12)
    # Per-group rates against fairlearn's MetricFrame and the loop oracle.
    rates = fairlearn_rates(ye, se, ge, threshold)
    assert selection_rate_by_group(y, s, threshold=threshold, **kw) == pytest.approx(rates["sel"])
    assert true_positive_rate_by_group(y, s, threshold=threshold, **kw) == pytest.approx(
        rates["tpr"]
    )
    assert false_positive_rate_by_group(y, s, threshold=threshold, **kw) == pytest.approx(
        rates["fpr"]
    )
    assert list(table.acc) == pytest.approx([v["acc"] for v in want["groups"].values()])
    # Cross-group metrics: fairlearn for DPD/DEOdds, the formulas for the rest.
    assert es_auc(y, s, **kw) == pytest.approx(want["es_auc"], abs=1e-12)
    assert es_acc(y, s, threshold=threshold, **kw) == pytest.approx(want["es_acc"], abs=1e-12)
    assert demographic_parity_difference(y, s, threshold=threshold, **kw) == pytest.approx(
        want["dpd"]
    )
    assert equalized_odds_difference(y, s, threshold=threshold, **kw) == pytest.approx(
        want["deodds"]
    )
    assert between_group_disparity(y, s, **kw) == pytest.approx(
        (want["auc_std_ratio"], want["auc_range_ratio"])
    )


def test_unknown_keep_makes_minus_one_a_group_like_fairlearn():
    y, s, g = random_case(3, unknown_frac=0.2)
    got = selection_rate_by_group(y, s, groups=g, unknown="keep")
    assert -1 in got
    assert got == pytest.approx(fairlearn_rates(y, s, g)["sel"])
    assert demographic_parity_difference(y, s, groups=g, unknown="keep") == pytest.approx(
        all_metrics(y, s, g, unknown="keep")["dpd"]
    )


def test_single_class_group_skip_vs_propagate():
    y, s, g = random_case(1)
    y = np.where(g == 0, 0, y)  # group 0: negatives only -> no AUC
    table = disaggregate(y, s, groups=g)
    assert math.isnan(table.auc[0])
    assert table.auc_notes[0] == "single class (no positives): AUC undefined"
    assert table.auc_notes[1] is None
    skip = all_metrics(y, s, g, single_class="skip")
    assert es_auc(y, s, groups=g, single_class="skip") == pytest.approx(skip["es_auc"])
    assert not math.isnan(skip["es_auc"])
    assert math.isnan(es_auc(y, s, groups=g, single_class="propagate"))
    assert between_group_disparity(y, s, groups=g) == pytest.approx(
        (skip["auc_std_ratio"], skip["auc_range_ratio"])
    )
    assert all(
        math.isnan(v) for v in between_group_disparity(y, s, groups=g, single_class="propagate")
    )


def test_es_auc_is_undefined_when_every_group_is_single_class():
    # Each group is single-class but the pooled set is not: nothing is left to compare.
    y, s, g = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.6, 0.9]), np.array([0, 0, 1, 1])
    assert roc_auc(y, s) == 1.0
    assert math.isnan(es_auc(y, s, groups=g))
    assert all(math.isnan(v) for v in between_group_disparity(y, s, groups=g))


def test_group_without_positives_has_tpr_zero_like_fairlearn():
    y, s, g = random_case(2)
    y = np.where(g == 2, 0, y)
    tpr = true_positive_rate_by_group(y, s, groups=g)
    assert tpr[2] == 0.0
    assert tpr == pytest.approx(fairlearn_rates(y, s, g)["tpr"])
    assert equalized_odds_difference(y, s, groups=g) == pytest.approx(
        all_metrics(y, s, g)["deodds"]
    )
    # ...and symmetrically a group without negatives has FPR 0.
    y = np.where(g == 1, 1, y)
    assert false_positive_rate_by_group(y, s, groups=g)[1] == 0.0
    assert false_positive_rate_by_group(y, s, groups=g) == pytest.approx(
        fairlearn_rates(y, s, g)["fpr"]
    )


def test_single_class_auc_is_nan_without_asking_sklearn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # newer sklearn warns, older raises: we do neither
        assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
        assert math.isnan(roc_auc([0, 0], [0.2, 0.5]))


def test_all_tied_scores_give_half():
    assert roc_auc([0, 1, 0, 1], [0.3] * 4) == 0.5
    assert auc_pairs(np.array([0, 1, 0, 1]), np.array([0.3] * 4)) == 0.5


@pytest.mark.parametrize(
    ("y_true", "y_score", "groups", "match"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], [0, 0, 1], r"y_true\[1\] = .*2.*labels must be 0 or 1"),
        ([0, 1, 1], [0.1, 1.5, 0.3], [0, 0, 1], r"y_score\[1\] = 1.5.*\[0, 1\]"),
        ([0, 1, 1], [0.1, np.nan, 0.3], [0, 0, 1], r"y_score\[1\] = nan.*not NaN"),
        ([0, 1, 1], [0.1, 0.3], [0, 0, 1], r"y_true has 3 entries but y_score has 2"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [0, 1], r"groups has 2 entries but y_true has 3"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [0, -2, 1], r"groups\[1\] = -2"),
        (
            [0, 1, 1],
            [0.1, 0.2, 0.3],
            ["a", "b", "a"],
            r"integer codes \(-1 = unknown\).*encode_groups",
        ),
        ([0, 1, 1], [0.1, 0.2, 0.3], [-1, -1, -1], r"every sample has an unknown"),
        ([], [], [], r"no predictions"),
    ],
)
def test_bad_inputs_name_the_problem(y_true, y_score, groups, match):
    with pytest.raises(UserError, match=match):
        disaggregate(y_true, y_score, groups=groups)


def test_bad_policy_names_the_allowed_values():
    with pytest.raises(UserError, match=r"unknown='ignore' is not one of \['drop', 'keep'\]"):
        disaggregate([0, 1], [0.1, 0.9], groups=[0, 1], unknown="ignore")
    with pytest.raises(
        UserError, match=r"single_class='nan' is not one of \['skip', 'propagate'\]"
    ):
        es_auc([0, 1], [0.1, 0.9], groups=[0, 1], single_class="nan")
    with pytest.raises(UserError, match=r"threshold=1.5 must be in \[0, 1\]"):
        es_acc([0, 1], [0.1, 0.9], groups=[0, 1], threshold=1.5)


def test_per_group_oracle_agrees_with_itself_on_hand_case():
    # Guards the oracle: its loop gives the paper arithmetic too.
    groups = per_group(HAND_Y, HAND_S, HAND_G)
    assert groups[0]["auc"] == 0.75 and groups[1]["auc"] == 1.0
    assert groups[1]["fpr"] == 0.0 and groups[0]["tpr"] == 0.5
