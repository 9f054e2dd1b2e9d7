"""The generator: real formats and keys, knobs that do what they say, signals where they
should be (linear for the easy modality, pattern-only for the hard one)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datahelpers import make_tree
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from multifair.data.synthetic import (
    SynthKnobs,
    fundus_statistic,
    generate,
    oct_statistic,
    render_fundus,
    render_oct,
)

FV_KEYS = {
    "slo_fundus",
    "oct_bscans",
    "glaucoma",
    "race",
    "male",
    "hispanic",
    "maritalstatus",
    "language",
}
VLM_KEYS = {
    "slo_fundus",
    "glaucoma",
    "gender",
    "race",
    "ethnicity",
    "language",
    "maritalstatus",
    "age",
    "md",
    "tds",
    "note",
    "note_extra",
}


def test_fairvision_keys_dtypes_and_csv(tmp_path: Path):
    meta = make_tree(tmp_path, race_codes="legacy", fundus_dtype="float32", csv_bom=True, seed=1)
    files = sorted((tmp_path / "Glaucoma").rglob("data_*.npz"))
    assert len(files) == meta["n"] == 40
    with np.load(files[0], allow_pickle=False) as z:
        assert set(z.files) == FV_KEYS
        assert z["oct_bscans"].dtype == np.uint8 and z["oct_bscans"].shape == (5, 16, 16)
        assert z["slo_fundus"].dtype == np.float32 and z["slo_fundus"].shape == (16, 16)
        assert z["race"].dtype.kind == "U" and z["race"].ndim == 0
        assert str(z["race"]) in {"Asian", "Black or African American", "White or Caucasian"}
        assert z["glaucoma"].ndim == 0
    csv = tmp_path / "data_summary_glaucoma.csv"
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    frame = pd.read_csv(csv, encoding="utf-8-sig")
    assert list(frame.columns) == [
        "filename",
        "use",
        "glaucoma",
        "age",
        "gender",
        "race",
        "ethnicity",
        "language",
        "maritalstatus",
        "md",
    ]
    assert set(frame["use"]) == {"training", "validation", "test"}
    assert set(frame["glaucoma"]) <= {"yes", "no"}


def test_fairvlmed_keys_and_csvs(tmp_path: Path):
    make_tree(tmp_path, "fairvlmed", test_name="Testing")
    files = sorted((tmp_path / "Testing").glob("data_*.npz"))
    with np.load(files[0], allow_pickle=False) as z:
        assert set(z.files) == VLM_KEYS
        assert z["note"].dtype.kind == "U" and z["note"].ndim == 0
        assert z["tds"].shape == (52,)
    for name in ("data_summary.csv", "gpt-4_summarized_notes.csv", "original_notes.csv"):
        assert (tmp_path / name).is_file()
    summaries = pd.read_csv(tmp_path / "gpt-4_summarized_notes.csv", keep_default_na=False)[
        "summary"
    ]
    assert summaries.str.len().max() <= 180


def test_knobs_mix_unknowns_degenerate_and_reproducibility(tmp_path: Path):
    knobs = {
        "n": 2000,
        "group_mix": [0.1, 0.2, 0.7],
        "pos_rate": 0.3,
        "unknown_rate": 0.2,
        "degenerate": "language=2",
        "seed": 7,
    }
    meta = make_tree(tmp_path / "a", "table", **knobs)
    frame = pd.read_csv(tmp_path / "a" / "table.csv")
    shares = frame["race"].value_counts(normalize=True)
    assert shares["Asian"] == pytest.approx(0.1, abs=0.03) and shares["White"] == pytest.approx(
        0.7, abs=0.03
    )
    y = (frame["glaucoma"] == "yes").to_numpy()
    assert y.mean() == pytest.approx(0.3, abs=0.04)
    # the generator's own samples agree with the table
    assert [s["label"] for s in meta["samples"]] == y.astype(int).tolist()
    again = make_tree(tmp_path / "b", "table", **knobs)
    assert (tmp_path / "a" / "table.csv").read_bytes() == (
        tmp_path / "b" / "table.csv"
    ).read_bytes()
    assert again["best_auc"] == meta["best_auc"]


def test_unknown_rate_and_degenerate_group_in_npz(tmp_path: Path):
    make_tree(tmp_path, n=200, unknown_rate=0.3, degenerate="gender=0", seed=2)
    languages, labels, genders = [], [], []
    for path in (tmp_path / "Glaucoma").rglob("data_*.npz"):
        with np.load(path) as z:
            languages.append(int(z["language"]))
            labels.append(int(z["glaucoma"]))
            genders.append(int(z["male"]))
    assert np.mean(np.array(languages) == -1) == pytest.approx(0.3, abs=0.08)
    labels, genders = np.array(labels), np.array(genders)
    assert labels[genders == 0].max() == 0 and labels[genders == 1].mean() > 0.3


def test_best_auc_theory_is_phi_of_half_dprime(tmp_path: Path):
    meta = make_tree(tmp_path, "table", n=200, signal={"A": [0.5, 1.0, 2.0], "B": [1.5]})
    best = meta["best_auc"]["all"]
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    assert best["Asian"]["A_theory"] == pytest.approx(phi(0.5 / math.sqrt(2)), abs=1e-4)
    assert best["White"]["A_theory"] == pytest.approx(phi(2.0 / math.sqrt(2)), abs=1e-4)
    assert best["Black"]["joint_theory"] == pytest.approx(
        phi(math.hypot(1.0, 1.5) / math.sqrt(2)), abs=1e-4
    )
    assert len(meta["samples"]) == 200 and set(meta["samples"][0]["latent"]) == {"A", "B"}


def test_table_A_is_linear_and_B_is_a_pattern_without_mean_shift(tmp_path: Path):
    make_tree(tmp_path, "table", n=3000, seed=0)
    frame = pd.read_csv(tmp_path / "table.csv")
    y = (frame["glaucoma"] == "yes").to_numpy().astype(int)
    train, test = (frame["use"] == "training").to_numpy(), (frame["use"] == "test").to_numpy()
    white = (frame["race"] == "White").to_numpy()
    a = frame[[f"a{j:02d}" for j in range(1, 11)]].fillna(frame.mean(numeric_only=True)).to_numpy()
    b = frame[[f"b{j:02d}" for j in range(1, 13)]].fillna(0).to_numpy()
    lr_a = LogisticRegression(max_iter=1000).fit(a[train], y[train])
    score = lr_a.decision_function(a)
    assert roc_auc_score(y[test & white], score[test & white]) > 0.9  # strong for the majority
    assert roc_auc_score(y[test & ~white], score[test & ~white]) < 0.8  # weak for minorities
    lr_b = LogisticRegression(max_iter=1000).fit(b[train], y[train])
    assert (
        abs(roc_auc_score(y[test], lr_b.decision_function(b[test])) - 0.5) < 0.08
    )  # no linear signal
    triple = np.prod(b.reshape(len(b), 4, 3), axis=2).mean(axis=1)  # the 3-way sign product
    assert roc_auc_score(y[test], triple[test]) > 0.7


def test_image_renderers_put_the_signal_where_documented():
    n = 120
    s = np.linspace(-2.5, 2.5, n)
    fundus = [
        render_fundus((32, 32), v, False, np.random.default_rng([0, i])) for i, v in enumerate(s)
    ]
    disc = [fundus_statistic(f, False) for f in fundus]
    assert np.corrcoef(s, disc)[0, 1] > 0.9  # brightness-like, monotone in s
    alt = [render_fundus((32, 32), v, True, np.random.default_rng([1, i])) for i, v in enumerate(s)]
    assert np.corrcoef(s, [fundus_statistic(f, True) for f in alt])[0, 1] > 0.9
    assert abs(np.corrcoef(s, [fundus_statistic(f, False) for f in alt])[0, 1]) < 0.35
    vols = [render_oct((6, 32, 32), v, np.random.default_rng([2, i])) for i, v in enumerate(s)]
    means = np.array([v.mean() for v in vols])
    stds = np.array([v.astype(float).std() for v in vols])
    # no mean shift; the global contrast moves by < 2% of its value across the whole range
    assert abs(np.corrcoef(s, means)[0, 1]) < 0.3
    assert abs(np.polyfit(s, stds, 1)[0]) * 5 < 0.02 * stds.mean()
    band = np.corrcoef(s, [oct_statistic(v) for v in vols])[0, 1]
    assert band > 0.8  # orientation follows s
    whole = [
        render_oct((6, 32, 32), v, np.random.default_rng([2, i]), "slice") for i, v in enumerate(s)
    ]
    assert np.corrcoef(s, [oct_statistic(v) for v in whole])[0, 1] > band  # more textured area


def test_note_signal_needs_word_pairs(tmp_path: Path):
    from sklearn.feature_extraction.text import CountVectorizer

    make_tree(tmp_path, "fairvlmed", n=1200, empty_note_rate=0.0, fundus_shape=[8, 8], seed=4)
    frame = pd.read_csv(tmp_path / "data_summary.csv", keep_default_na=False)
    y = (frame["glaucoma"] == "yes").to_numpy().astype(int)
    train, test = (frame["use"] != "test").to_numpy(), (frame["use"] == "test").to_numpy()
    aucs = {}
    for ngram in ((1, 1), (2, 2)):
        vec = CountVectorizer(ngram_range=ngram).fit(frame["note"][train])
        lr = LogisticRegression(max_iter=2000).fit(vec.transform(frame["note"][train]), y[train])
        aucs[ngram] = roc_auc_score(
            y[test], lr.decision_function(vec.transform(frame["note"][test]))
        )
    assert aucs[(1, 1)] < 0.62 < 0.68 < aucs[(2, 2)]


def test_bad_knobs_are_user_errors(tmp_path: Path):
    from multifair.cli import main

    assert main(["data", "synth", "table", str(tmp_path / "x"), "--signal", "C=1"]) == 2
    assert main(["data", "synth", "fairvision", str(tmp_path / "x"), "--degenerate", "race=9"]) == 2
    assert main(["data", "synth", "fairvision", str(tmp_path / "x"), "--split", "0.5,0.5,0.5"]) == 2
    with pytest.raises(ValueError, match="group_mix"):
        SynthKnobs(flavour="table", group_mix=[1, 2])
    generate(SynthKnobs(flavour="table", n=30), tmp_path / "y", progress=False)
    from multifair.errors import UserError

    with pytest.raises(UserError, match="not empty"):
        generate(SynthKnobs(flavour="table", n=30), tmp_path / "y", progress=False)
