"""`multifair diagnose`, the analysis: is a modality under-trained, do groups differ by more
than noise, and which method do the results notes recommend for what was found.

Inputs are the predictions of `erm` and of one `unimodal` model per modality on one split
(the same patients in every run; several training seeds averaged). Every interval is a
percentile bootstrap over patients, with the SAME resamples for every run and seed, so a
difference between two runs is paired patient by patient (`metrics.weighted_auc` over
`metrics.resample_counts`).

The rules (docs/diagnose.md), decided on the validation split:

- (a) modality M is **under-trained** when the whole 95% CI of `alone - head` lies above
  MIN_EFFECT (a lag of at least 0.02 AUC, with confidence: the neutral synthetic twin shows
  lags of 0.01 to 0.03, and a modality's own loss buys nothing there). `head` is erm's auxiliary head of M (a linear probe on
  erm's detached M features: what joint training made M's encoder extract), `alone` the
  `unimodal` model of M (the same encoder trained on M only).
- (b) an attribute's group gap (largest minus smallest group AUC of erm) is **above noise**
  when it exceeds the noise floor's median by more than MIN_EFFECT and a permutation test
  says it is not noise: p < ALPHA / k over the k attributes tested (Bonferroni). The noise
  floor is the gap the same predictions show when the group labels are shuffled among the
  patients (same group sizes, no group effect); p is the share of shuffles whose gap reaches
  the observed one. Groups with fewer than MIN_CLASS patients of some class are left out.
- (c) the recommendation follows README "Methods" / docs/results.md "Summary" (`recommend`).

Multi-class labels (K > 2 classes; scores (S, n, K) of class probabilities): every AUC above is
the macro one-vs-rest AUC (the mean over classes k of the AUC of class k against the rest,
scored by column k: `weighted_auc` on (n, K) scores), the rules are unchanged, a group is
compared when it has MIN_CLASS patients of every class (so of each class and of its rest), and
only methods that train K classes are recommended (`MC_GROUP_WEIGHTS`, `REWEIGHT`,
`UNIMODAL`; the stacking rows need a binary label).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multifair.errors import UserError
from multifair.metrics import (
    bootstrap_indices,
    percentile_interval,
    resample_counts,
    weighted_auc,
)

MIN_EFFECT = 0.02  # AUC: smaller differences are not worth a method, whatever the CI says
ALPHA = 0.05  # family-wise level of the group-gap tests; also 1 - the CI level
# a group needs this many patients of EVERY class in the split to be compared (binary: positives
# and negatives; K classes: each class, hence also each class's rest in one-vs-rest terms)
MIN_CLASS = 5
N_PERM = 1000  # group-label shuffles of the noise floor


@dataclass
class SplitScores:
    """One split's predictions, aligned by patient: labels, attribute codes and every run's
    scores (one row per training seed)."""

    y: np.ndarray  # (n,) 0/1; K classes: class indices 0..K-1
    attributes: dict[str, np.ndarray]  # name -> (n,) codes, -1 unknown
    group_names: dict[str, dict[int, str]]  # name -> code -> display name
    # scores: (S, n) positive-class scores; K classes: (S, n, K) class probabilities
    fused: np.ndarray  # (S, n) erm's fused score
    heads: dict[str, np.ndarray]  # modality -> (S, n) erm's auxiliary head
    alone: dict[str, np.ndarray]  # modality -> (S', n) the unimodal model's score
    # data with missing modalities: modality -> (n,) bool, whether the patient has it; a head's
    # and the unimodal model's score are NaN where the patient lacks the modality
    present: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return 2 if self.fused.ndim == 2 else int(self.fused.shape[2])


def _mean_auc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC under each row of weights (r, n), averaged over the score rows (seeds): (r,).
    Scores (S, n, K): the macro one-vs-rest AUC of each seed's (n, K) probabilities."""
    return np.mean([weighted_auc(y, s, weights) for s in scores], axis=0)


def _finite(scores: np.ndarray) -> np.ndarray:
    """(S, n) or (S, n, K) -> (n,) whether every seed (and class) scored the patient."""
    return np.isfinite(scores.reshape(scores.shape[0], scores.shape[1], -1)).all(axis=(0, 2))


def _missing_classes(y: np.ndarray, n_classes: int) -> list[int]:
    """The classes 0..n_classes-1 with no patient in y."""
    return [c for c in range(n_classes) if not np.any(y == c)]


def _ci(replicates: np.ndarray) -> list[float]:
    lo, hi = percentile_interval(replicates, 1.0 - ALPHA)
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------
# (a) modality imbalance


def modality_imbalance(
    scores: SplitScores, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per modality: erm's head AUC, the single-modality model's AUC, `alone - head` with its
    paired bootstrap CI, and whether the modality is under-trained (rule (a)). With missing
    modalities, both AUCs are over the patients that have the modality (`n`: how many; the
    head of an absent modality read a placeholder, the unimodal model has nothing to read),
    with the same patient resamples restricted to them."""
    y = scores.y
    n = len(y)
    counts = resample_counts(bootstrap_indices(n, n_boot, seed), n)  # (R, n), shared by all runs
    out: dict[str, dict[str, Any]] = {}
    for modality, head_scores in scores.heads.items():
        if modality not in scores.alone:
            continue
        alone_scores = scores.alone[modality]
        have = _finite(head_scores) & _finite(alone_scores)
        if modality in scores.present:
            have &= scores.present[modality]
        yh, head_h, alone_h, counts_h = y[have], head_scores[:, have], alone_scores[:, have], counts[:, have]  # fmt: skip
        if len(np.unique(yh)) < 2:
            raise UserError(
                f"modality {modality}: the patients that have it are of a single class "
                "(AUCs are undefined)"
            )
        if scores.n_classes > 2 and _missing_classes(yh, scores.n_classes):
            raise UserError(
                f"modality {modality}: no patient that has it is of class(es) "
                f"{_missing_classes(yh, scores.n_classes)} (macro one-vs-rest AUCs are undefined)"
            )
        everyone = np.ones((1, int(have.sum())))
        head = float(_mean_auc(yh, head_h, everyone)[0])
        alone = float(_mean_auc(yh, alone_h, everyone)[0])
        diff = _mean_auc(yh, alone_h, counts_h) - _mean_auc(yh, head_h, counts_h)
        ci = _ci(diff)
        out[modality] = {
            "head_auc": head,
            "alone_auc": alone,
            "alone_minus_head": alone - head,
            "ci": ci,
            "under_trained": bool(ci[0] > MIN_EFFECT),
            "n": int(have.sum()),
        }
    return out


# ---------------------------------------------------------------------------------------
# (b) group gaps against the noise floor


def _gap(group_aucs: np.ndarray) -> np.ndarray:
    """(r, G) group AUCs -> (r,) largest minus smallest (NaN groups ignored; NaN if < 2)."""
    valid = np.isfinite(group_aucs).sum(axis=1) >= 2
    out = np.full(group_aucs.shape[0], np.nan)
    if valid.any():
        g = group_aucs[valid]
        out[valid] = np.nanmax(g, axis=1) - np.nanmin(g, axis=1)
    return out


def group_gap(
    scores: SplitScores,
    attribute: str,
    *,
    n_tests: int = 1,
    n_boot: int = 1000,
    n_perm: int = N_PERM,
    seed: int = 0,
) -> dict[str, Any]:
    """erm's AUC per group of `attribute` with bootstrap CIs, the max-min gap with its CI, the
    noise floor (the gap under shuffled group labels) and the verdict of rule (b) with
    `n_tests` attributes tested."""
    codes_all = scores.attributes[attribute]
    known = codes_all >= 0
    y, fused, codes = scores.y[known], scores.fused[:, known], codes_all[known]
    names = scores.group_names.get(attribute, {})
    groups = []
    compared = []
    k = scores.n_classes
    for code in np.unique(codes):
        member = codes == code
        per_class = np.bincount(y[member], minlength=k)  # binary: negatives, positives
        entry: dict[str, Any] = {
            "code": int(code),
            "name": names.get(int(code), str(int(code))),
            "n": int(member.sum()),
            **(
                {"positives": int(per_class[1])}
                if k == 2
                else {"class_counts": [int(c) for c in per_class]}
            ),
            "auc": None,
            "ci": None,
        }
        if int(per_class.min()) < MIN_CLASS:
            entry["note"] = f"fewer than {MIN_CLASS} of a class"
        else:
            compared.append(int(code))
        groups.append(entry)
    result: dict[str, Any] = {"attribute": attribute, "groups": groups, "n": int(known.sum())}
    if len(compared) < 2:
        result.update(gap=None, above_noise=False, note="fewer than two groups to compare")
        return result

    n = len(y)
    counts = resample_counts(bootstrap_indices(n, n_boot, seed), n)  # (R, n)
    member = np.stack([codes == c for c in compared]).astype(np.float64)  # (G, n)
    point = np.array([_mean_auc(y, fused, m[None, :])[0] for m in member])  # (G,)
    boot = np.stack([_mean_auc(y, fused, counts * m) for m in member], axis=1)  # (R, G)
    # the noise floor: the same predictions, group labels shuffled among the patients
    rng = np.random.default_rng([seed, 1])
    kept = np.isin(codes, compared)
    shuffled = rng.permuted(np.tile(codes[kept], (n_perm, 1)), axis=1)  # (P, n_kept)
    null = np.stack(
        [_mean_auc(y[kept], fused[:, kept], (shuffled == c).astype(np.float64)) for c in compared],
        axis=1,
    )  # (P, G)
    gap = float(point.max() - point.min())
    null_gap = _gap(null)
    null_gap = null_gap[np.isfinite(null_gap)]
    p_value = (1 + int(np.sum(null_gap >= gap - 1e-12))) / (1 + len(null_gap))
    floor = float(np.median(null_gap))
    level = ALPHA / max(1, n_tests)
    by_code = {entry["code"]: entry for entry in groups}
    for k, code in enumerate(compared):
        by_code[code]["auc"], by_code[code]["ci"] = float(point[k]), _ci(boot[:, k])
    result.update(
        gap=gap,
        gap_ci=_ci(_gap(boot)),
        noise_median=floor,
        noise_q=float(np.quantile(null_gap, 1.0 - level)),
        p_value=p_value,
        level=level,
        worst_group=by_code[compared[int(point.argmin())]]["name"],
        above_noise=bool(gap - floor > MIN_EFFECT and p_value < level),
    )
    return result


# ---------------------------------------------------------------------------------------
# (c) the recommendation


@dataclass
class Recommendation:
    kind: str  # "none" | "imbalance" | "groups" | "both"
    lines: list[tuple[str, dict[str, Any] | None]]  # (what it is for, method block); None: erm
    why: str
    attribute: str | None  # the attribute a group method should train on (data.attribute)


def flow(block: Mapping[str, Any]) -> str:
    """A method block as a YAML flow mapping, copy-pasteable into a config (`.inf` spelt as
    YAML spells it)."""

    def value(v: Any) -> str:
        if isinstance(v, float) and math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in block.items()) + "}"


UNIMODAL = {"name": "multifair_adam", "unimodal_weight": 1}
GROUP_WEIGHTS = {"name": "multifair_adam", "group_weights": "validation"}
STACKING = {
    "name": "multifair_adam",
    "temperature": math.inf,
    "group_fusion": "stacking",
    "stacking_data": "train+validation",
}
# group-blind on images: one recombination of the heads for everyone, fitted with group weights
# (docs/results.md, "a group-blind model that keeps most of the stacking's gain")
BLIND_STACKING = {
    "name": "multifair_adam",
    "temperature": math.inf,
    "group_fusion": "blind_stacking",
    "stacking_data": "train+validation",
    "blind_power": 0.7,
}
UNIMODAL_STACKING = {
    "name": "multifair_adam",
    "unimodal_weight": 1,
    "group_fusion": "stacking",
    "stacking_data": "train+validation",
}
TOLD = "if the model may be told the group at test time (†)"
# K-class labels (the stacking rows above refuse K > 2): what docs/results.md measured on the
# 4-class main table scenario, 10 new data draws ("Multi-class labels")
MC_GROUP_WEIGHTS = {"name": "multifair_adam", "levels": "validation", "group_weights": "validation"}
REWEIGHT = {"name": "reweight", "power": 1}
LARGER_GAIN = "a larger ES-AUC gain at a larger AUC cost"


def label(block: Mapping[str, Any]) -> str:
    """A recommended block's row label, as docs/results.md names that row."""
    parts = ["erm" if block.get("temperature") == math.inf else str(block["name"])]
    if block["name"] == "reweight":
        parts.append(f"p={block.get('power', 1.0):g}")
    if block.get("unimodal_weight"):
        parts.append("+unimodal")
    if block.get("levels") == "validation":
        parts.append("val-levels")
    if block.get("group_weights") == "validation":
        parts.append("val-groups")
    if block.get("group_fusion") == "stacking":
        parts.append("stacking")
        if block.get("stacking_data") == "train+validation":
            parts.append("train+val")
    if block.get("group_fusion") == "blind_stacking":
        parts.append(f"blind_stacking p={block.get('blind_power', 1.0):g}")
    return " ".join(parts)


def recommend(
    imbalance: Mapping[str, Mapping[str, Any]],
    gaps: Mapping[str, Mapping[str, Any]],
    *,
    train_attribute: str,
    image_encoders: bool,
    missing: Mapping[str, float] | None = None,
    n_classes: int = 2,
) -> Recommendation:
    """What the results notes recommend for the failures found (README "Methods").
    `missing`: the share of patients lacking each modality (data with missing modalities):
    every recommended method handles them (`missing_note`), which the reason then says.
    `n_classes` > 2: only methods that train K classes (`_recommend_multiclass`)."""
    if n_classes > 2:
        rec = _recommend_multiclass(imbalance, gaps, train_attribute=train_attribute, image_encoders=image_encoders)  # fmt: skip
    else:
        rec = _recommend(imbalance, gaps, train_attribute=train_attribute, image_encoders=image_encoders)  # fmt: skip
    note = missing_note(missing or {}, rec.kind, stacking=n_classes <= 2)
    if note:
        rec.why = f"{rec.why} {note}"
    return rec


def missing_note(missing: Mapping[str, float], kind: str, stacking: bool = True) -> str:
    """What the recommendation means for patients lacking a modality ("" when none do).
    `stacking`: whether the lines may include a stacking row (not on a K-class label)."""
    lacking = {m: share for m, share in missing.items() if share > 0}
    if not lacking:
        return ""
    shares = ", ".join(f"{m} {100 * share:.0f}%" for m, share in lacking.items())
    if kind == "none":
        return (
            f"Some patients lack a modality ({shares} of validation); erm masks it (learned "
            "missing token) - keep `data.missing_modalities: mask`."
        )
    return (
        f"Some patients lack a modality ({shares} of validation): every line above trains on "
        "them with `data.missing_modalities: mask` (the default; an absent modality is left "
        + ("out, and the stacking reads its head as no evidence). " if stacking else "out). ")
        + MISSING_EVIDENCE
    )


# docs/results.md, "Missing modalities that differ by group (issue 17)"
MISSING_EVIDENCE = (
    "On the synthetic table where B is missing for 30% of the minorities the methods gained "
    "on the patients who have every modality only (group-blind weights +0.024 ES-AUC, "
    "group-aware stacking +0.028 at +0.014 AUC); for those lacking B no method helped "
    "(stacking -0.008 [-0.024, +0.009]): measuring the modality is the lever "
    "(docs/results.md, Missing modalities)."
)


def _findings(
    imbalance: Mapping[str, Mapping[str, Any]],
    gaps: Mapping[str, Mapping[str, Any]],
    train_attribute: str,
    image_encoders: bool,
) -> tuple[list[str], list[str], str | None, str, str, str]:
    """(lagging modalities, flagged attributes, the attribute a group method trains on, the
    image caution, the lag sentence, the gap sentence) shared by binary and K-class advice."""
    lagging = [m for m, r in imbalance.items() if r["under_trained"]]
    flagged = [a for a, g in gaps.items() if g["above_noise"]]
    attribute = None
    if flagged:  # the training attribute if it is flagged, else the largest excess
        attribute = (
            train_attribute
            if train_attribute in flagged
            else max(flagged, key=lambda a: gaps[a]["gap"] - gaps[a]["noise_median"])
        )
    # the one place the results notes found the modality fix did not help: small image data
    caution = (
        " With image encoders on small data (500 training subjects) no method beat plain "
        "training in our benchmarks (the weak encoder overfits): confirm it before adopting it."
        if image_encoders
        else ""
    )
    lag_text = "; ".join(
        f"{m}'s head {imbalance[m]['head_auc']:.3f} against {m} alone "
        f"{imbalance[m]['alone_auc']:.3f} ({-imbalance[m]['alone_minus_head']:+.3f}, "
        f"95% CI of alone - head [{imbalance[m]['ci'][0]:+.3f}, {imbalance[m]['ci'][1]:+.3f}])"
        for m in lagging
    )
    gap_text = ""
    if attribute is not None:
        g = gaps[attribute]
        gap_text = (
            f"the {attribute} groups' AUCs differ by {g['gap']:.3f} (worst: {g['worst_group']}) "
            f"where shuffled groups give {g['noise_median']:.3f} (p = {g['p_value']:.3f})"
        )
    return lagging, flagged, attribute, caution, lag_text, gap_text


def _recommend(
    imbalance: Mapping[str, Mapping[str, Any]],
    gaps: Mapping[str, Mapping[str, Any]],
    *,
    train_attribute: str,
    image_encoders: bool,
) -> Recommendation:
    lagging, flagged, attribute, caution, lag_text, gap_text = _findings(
        imbalance, gaps, train_attribute, image_encoders
    )
    if lagging and flagged:
        return Recommendation(
            "both",
            [("one model for everyone", UNIMODAL), (TOLD, UNIMODAL_STACKING)],
            f"Joint training under-learns a modality ({lag_text}) and {gap_text}. Fix the "
            "modality first: group weights cost ES-AUC where the modality that serves the "
            "minorities is not learnt. In the hard synthetic scenario (both failures) "
            "`+unimodal` gave ES-AUC +0.046 [+0.028, +0.063] and, told the group, "
            "`+unimodal stacking` +0.051 (docs/results.md, Summary)." + caution,
            attribute,
        )
    if lagging:
        return Recommendation(
            "imbalance",
            [("one model for everyone", UNIMODAL)],
            f"Joint training under-learns a modality ({lag_text}). Giving each modality its own "
            "loss brought it to what it reaches alone in the hard synthetic scenario: ES-AUC "
            "+0.046 [+0.028, +0.063], no AUC cost, over 10 new data draws (docs/results.md, "
            "Summary)." + caution,
            None,
        )
    if flagged:
        if image_encoders:
            blind, blind_text = (
                BLIND_STACKING,
                (
                    "On images, one recombination of the modality heads for everyone, fitted with "
                    "group weights (`blind_stacking`), gave ES-AUC +0.023 [+0.018, +0.028] at "
                    "-0.005 AUC over 20 new synthetic image draws"
                ),
            )
        else:
            blind, blind_text = (
                GROUP_WEIGHTS,
                (
                    "Group weights from the validation gaps gave ES-AUC +0.016 [+0.010, +0.023] at "
                    "-0.005 AUC over 20 synthetic table draws"
                ),
            )
        return Recommendation(
            "groups",
            [("one model for everyone", blind), (TOLD, STACKING)],
            f"Every modality is learnt, but {gap_text}. {blind_text}; group-aware stacking, "
            "which needs the attribute at inference, +0.023 [+0.017, +0.030] at +0.010 AUC "
            "over 50 table draws, +0.039 on images (docs/results.md, Summary).",
            attribute,
        )
    return Recommendation(
        "none",
        [("plain joint training", None)],
        "No modality is under-trained and no group gap is above the noise floor: plain joint "
        "training (`erm`) is fine here; the methods tie with it where there is nothing to fix "
        "(neutral twin and diabetes, docs/results.md, Summary).",
        None,
    )


# docs/results.md, "Multi-class labels" and its "10 new data draws" section (4-class table)
MC_EVIDENCE = (
    "On the 4-class synthetic table (10 new data draws, macro one-vs-rest AUC) "
    "`multifair_adam` with validation levels and group weights gave ES-AUC +0.015 [+0.006, "
    "+0.023] at AUC -0.0055 [-0.0081, -0.0028], reweighting (p=1) +0.021 [+0.011, +0.031] at "
    "AUC -0.015 [-0.020, -0.010] (docs/results.md, Multi-class labels)"
)
MC_NO_STACKING = (
    "The group-aware and group-blind stacking rows of the binary advice recombine binary "
    "margins and refuse a K-class label, so none is offered."
)


def _recommend_multiclass(
    imbalance: Mapping[str, Mapping[str, Any]],
    gaps: Mapping[str, Mapping[str, Any]],
    *,
    train_attribute: str,
    image_encoders: bool,
) -> Recommendation:
    """`_recommend` for a K-class label (K > 2): the same findings, only methods that train K
    classes (every line builds with `n_classes=K`), with the K-class evidence."""
    lagging, flagged, attribute, caution, lag_text, gap_text = _findings(
        imbalance, gaps, train_attribute, image_encoders
    )
    unimodal_evidence = (
        "Giving each modality its own loss brought an under-trained modality to what it "
        "reaches alone in the hard (binary) synthetic scenario: ES-AUC +0.046 [+0.028, +0.063] "
        "over 10 new data draws; on the 4-class table, where no modality was under-trained, it "
        "cost nothing (AUC +0.003 [+0.002, +0.004], ES-AUC +0.009 [+0.004, +0.014], "
        "docs/results.md)."
    )
    if lagging and flagged:
        return Recommendation(
            "both",
            [("one model for everyone", UNIMODAL)],
            f"Joint training under-learns a modality ({lag_text}) and {gap_text}. Fix the "
            "modality first: group weights cost ES-AUC where the modality that serves the "
            f"minorities is not learnt. {unimodal_evidence} {MC_NO_STACKING}" + caution,
            attribute,
        )
    if lagging:
        return Recommendation(
            "imbalance",
            [("one model for everyone", UNIMODAL)],
            f"Joint training under-learns a modality ({lag_text}). {unimodal_evidence}" + caution,
            None,
        )
    if flagged:
        images = (
            " Measured on a table only: with image encoders no K-class benchmark was run."
            if image_encoders
            else ""
        )
        return Recommendation(
            "groups",
            [("one model for everyone", MC_GROUP_WEIGHTS), (LARGER_GAIN, REWEIGHT)],
            f"Every modality is learnt, but {gap_text}. {MC_EVIDENCE}. {MC_NO_STACKING}" + images,
            attribute,
        )
    return _recommend(
        imbalance, gaps, train_attribute=train_attribute, image_encoders=image_encoders
    )


def diagnose_split(
    scores: SplitScores, *, n_boot: int = 1000, n_perm: int = N_PERM, seed: int = 0
) -> dict[str, Any]:
    """(a) and (b) on one split: every modality, every attribute."""
    if len(np.unique(scores.y)) < 2:
        raise UserError("the split has a single class: AUCs are undefined")
    absent = _missing_classes(scores.y, scores.n_classes)
    if scores.n_classes > 2 and absent:
        raise UserError(
            f"the split has no patient of class(es) {absent}: macro one-vs-rest AUCs are undefined"
        )
    attributes = list(scores.attributes)
    return {
        "n": len(scores.y),
        # data with missing modalities: the share of the split's patients lacking each
        "missing": {m: float(1 - p.mean()) for m, p in scores.present.items()},
        "modalities": modality_imbalance(scores, n_boot=n_boot, seed=seed),
        "groups": {
            a: group_gap(
                scores, a, n_tests=len(attributes), n_boot=n_boot, n_perm=n_perm, seed=seed
            )
            for a in attributes
        },
    }


# ---------------------------------------------------------------------------------------
# the terminal report


def _f(x: float | None, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "  n/a"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _interval(ci: Sequence[float] | None, sign: bool = False) -> str:
    return "" if ci is None else f"[{_f(ci[0], sign)}, {_f(ci[1], sign)}]"


def format_report(diagnosis: Mapping[str, Any]) -> str:
    """Sections (a), (b), (c) as plain text (decisions on validation, test alongside)."""
    val, test = diagnosis["splits"]["val"], diagnosis["splits"].get("test")
    classes = diagnosis.get("classes")  # a K-class label: macro one-vs-rest AUCs
    auc = (
        "AUC"
        if not classes
        else f"macro one-vs-rest AUC over the {len(classes)} classes {', '.join(classes)}"
    )
    lines = [
        f"(a) modality imbalance: erm's auxiliary head of each modality against a model of that "
        f"modality alone ({auc}; validation n={val['n']}, decides; test alongside)"
    ]
    if not val["modalities"]:
        lines.append("  one modality: nothing to balance")
    else:
        lines.append(
            f"  {'modality':<12} {'head':>6} {'alone':>6} {'alone-head [95% CI]':>28}"
            f"   {'test head':>9} {'alone':>6}   verdict"
        )
    for m, r in val["modalities"].items():
        t = (test or {}).get("modalities", {}).get(m, {})
        verdict = (
            "UNDER-TRAINED"
            if r["under_trained"]
            else "slightly behind (CI reaches below 0.02)"
            if r["ci"][0] > 0
            else "learnt"
        )
        lines.append(
            f"  {m:<12} {_f(r['head_auc']):>6} {_f(r['alone_auc']):>6} "
            f"{_f(r['alone_minus_head'], True):>7} {_interval(r['ci'], True):>20}"
            f"   {_f(t.get('head_auc')):>9} {_f(t.get('alone_auc')):>6}   {verdict}"
        )
        if r.get("n", val["n"]) < val["n"]:  # missing modalities: AUCs on those who have it
            lines.append(f"  {'':<12} (the {r['n']} of {val['n']} patients that have {m})")
    lines.append("")
    lines.append(
        f"(b) group gaps: erm's {'AUC' if not classes else 'macro one-vs-rest AUC'} per group, "
        "largest minus smallest, against the noise floor (the gap with group labels shuffled; "
        "validation decides)"
        + ("" if not classes else f"; a group needs {MIN_CLASS} patients of every class")
    )
    for attribute, g in val["groups"].items():
        groups = ", ".join(
            f"{e['name']} {_f(e['auc'])} {_interval(e['ci'])} (n {e['n']})"
            if e["auc"] is not None
            else f"{e['name']} - (n {e['n']}, {e.get('note', 'not compared')})"
            for e in g["groups"]
        )
        lines.append(f"  {attribute}: {groups}")
        if g["gap"] is None:
            lines.append(f"    {g['note']}")
            continue
        t = (test or {}).get("groups", {}).get(attribute, {})
        test_gap = f"; test gap {_f(t.get('gap'))}" if t.get("gap") is not None else ""
        verdict = "ABOVE NOISE" if g["above_noise"] else "within noise"
        lines.append(
            f"    gap {_f(g['gap'])} {_interval(g['gap_ci'])}; noise floor: median "
            f"{_f(g['noise_median'])}, q{100 * (1 - g['level']):.4g} {_f(g['noise_q'])}; "
            f"p = {g['p_value']:.3f}{test_gap}: {verdict}"
        )
    lines.append("")
    lines.append("(c) recommendation")
    rec = diagnosis["recommendation"]
    for what, line in rec["lines"]:  # (what it is for, "method: {...}")
        lines.append(f"  {what}:")
        lines.append(f"    {line}")
    if rec["attribute"] is not None and rec["attribute"] != diagnosis["train_attribute"]:
        lines.append(f"    with data.attribute: {rec['attribute']} (the attribute with the gap)")
    lines.append(f"  why: {rec['why']}")
    for command in diagnosis.get("commands", []):
        lines.append(f"  {command}")
    return "\n".join(lines)
