"""`multifair audit` end to end through `multifair.cli.main([...])`: the table, metrics.json and
the HTML report; every bad input is one clear line and exit status 2."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import roc_auc_score

from multifair.cli import main
from multifair.evaluation.audit import demo_predictions


def write_predictions(path, n=300, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    race = rng.choice(["White", "Black", "Asian"], size=n, p=[0.5, 0.3, 0.2])
    gender = rng.choice(["Female", "Male"], size=n)
    y = (rng.random(n) < 0.4).astype(int)
    score = np.round(np.clip(0.35 * y + 0.6 * rng.random(n), 0, 1), 3)
    frame = pd.DataFrame({"y": y, "p": score, "race": race, "gender": gender})
    frame.loc[rng.random(n) < 0.05, "gender"] = ""  # unknown
    for key, value in overrides.items():
        frame[key] = value
    frame.to_csv(path, index=False)
    return frame


def audit(*argv, capsys):
    rc = main(["audit", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_end_to_end_writes_metrics_json_and_report(tmp_path, capsys):
    csv = tmp_path / "preds.csv"
    frame = write_predictions(csv)
    out_dir = tmp_path / "out"
    rc, out, err = audit(
        csv, "--label", "y", "--score", "p", "--attribute", "race", "--attribute", "gender",
        "--intersect", "--n-boot", "30", "--seed", "5", "--out", out_dir, capsys=capsys,
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert list(summary["attributes"]) == ["race", "gender", "race*gender"]
    # The numbers are the oracles' on the same rows (unknown gender dropped for gender only).
    y, p = frame["y"].to_numpy(), frame["p"].to_numpy()
    assert summary["overall"]["auc"] == pytest.approx(roc_auc_score(y, p))
    race = summary["attributes"]["race"]
    assert [g["name"] for g in race["groups"]] == ["Asian", "Black", "White"]
    for g in race["groups"]:
        m = (frame["race"] == g["name"]).to_numpy()
        assert g["auc"] == pytest.approx(roc_auc_score(y[m], p[m]))
        assert (g["n"], g["positives"]) == (int(m.sum()), int(y[m].sum()))
    known = frame["gender"].fillna("").to_numpy() != ""
    gender = summary["attributes"]["gender"]
    assert gender["dropped_unknown"] == int((~known).sum()) > 0
    y_pred = (p >= 0.5).astype(int)
    assert gender["dpd"] == pytest.approx(
        demographic_parity_difference(
            y[known], y_pred[known], sensitive_features=frame["gender"][known]
        )
    )
    assert race["deodds"] == pytest.approx(
        equalized_odds_difference(y, y_pred, sensitive_features=frame["race"])
    )
    inter = [g["name"] for g in summary["attributes"]["race*gender"]["groups"]]
    assert "White|Female" in inter and len(inter) == 6
    assert race["ci"]["n_boot"] == 30 and race["ci"]["seed"] == 5
    # The printed table and the report.
    assert "race: 3 groups" in out and "ES-AUC" in out and "DEOdds" in out
    assert "with unknown gender dropped" in out
    report = (out_dir / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report)
    assert len(pngs) == 3
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in pngs)
    assert "single_class=skip" in report and "--intersect" in report


def test_demo_runs_without_data(tmp_path, capsys):
    rc, out, err = audit("--demo", "--n-boot", "20", "--out", tmp_path / "demo", capsys=capsys)
    assert rc == 0, err
    assert (tmp_path / "demo" / "metrics.json").is_file()
    assert (tmp_path / "demo" / "report.html").is_file()
    assert "race: 3 groups" in out and "with unknown ethnicity dropped" in out
    # The demo's data is reproducible and has the features it is meant to show.
    frame = demo_predictions()
    assert frame.equals(demo_predictions())
    assert (frame["ethnicity"] == "").sum() > 0 and set(frame["race"]) == {
        "Asian",
        "Black",
        "White",
    }


def test_integer_codes_take_names_from_the_name_column(tmp_path, capsys):
    # The layout of a run's predictions_{split}.csv: codes plus <attribute>_name.
    csv = tmp_path / "predictions_test.csv"
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2, 200)
    codes[:5] = -1
    pd.DataFrame(
        {
            "label": rng.integers(0, 2, 200),
            "score": rng.random(200).round(3),
            "gender": codes,
            "gender_name": np.where(codes == 0, "Female", np.where(codes == 1, "Male", "unknown")),
        }
    ).to_csv(csv, index=False)
    rc, _, err = audit(
        csv, "--attribute", "gender", "--n-boot", "0", "--out", tmp_path / "o", capsys=capsys
    )
    assert rc == 0, err
    summary = json.loads((tmp_path / "o" / "metrics.json").read_text())
    groups = summary["attributes"]["gender"]["groups"]
    assert [(g["code"], g["name"]) for g in groups] == [(0, "Female"), (1, "Male")]
    assert summary["attributes"]["gender"]["dropped_unknown"] == 5
    assert "ci" not in summary["attributes"]["gender"]


def test_single_class_group_is_reported_not_dropped_silently(tmp_path, capsys):
    csv = tmp_path / "p.csv"
    frame = write_predictions(csv)
    frame.loc[frame["race"] == "Asian", "y"] = 0
    frame.to_csv(csv, index=False)
    rc, out, err = audit(csv, "--label", "y", "--score", "p", "--attribute", "race", "--n-boot", "10",
                         "--out", tmp_path / "o", capsys=capsys)  # fmt: skip
    assert rc == 0, err
    assert re.search(r"Asian\s+\d+\s+0\s+undefined \(single class\)", out)
    assert "note: Asian: single class (no positives): AUC undefined; left out of ES-AUC" in out
    summary = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert summary["attributes"]["race"]["skipped_groups"] == ["Asian"]
    rc, out, _ = audit(csv, "--label", "y", "--score", "p", "--attribute", "race", "--n-boot", "0",
                       "--single-class", "propagate", "--out", tmp_path / "o2", capsys=capsys)  # fmt: skip
    assert rc == 0 and "ES-AUC undefined" in out


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (None, ["{dir}/missing.csv", "--attribute", "race"], r"predictions file not found: .*missing\.csv"),
        ({}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "age"],
         r"no column 'age' \(given by --attribute\); available columns: \['y', 'p', 'race', 'gender'\]"),
        ({}, ["{csv}", "--attribute", "race"], r"no column 'label' \(given by --label\)"),
        ({"row": 6, "col": "y", "value": 2}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race"],
         r"p\.csv line 8: 'y' = 2; labels must be 0 or 1"),
        ({"row": 9, "col": "p", "value": np.nan}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race"],
         r"p\.csv line 11: 'p' is empty or NaN; scores must be probabilities in \[0, 1\]"),
        ({"row": 0, "col": "p", "value": 1.2}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race"],
         r"line 2: 'p' = 1\.2; scores must be probabilities in \[0, 1\]"),
        ({"col": "race", "value": "White"}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race"],
         r"attribute 'race' has a single group \('White'\)"),
        ({"col": "y", "value": 1}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race"],
         r"'y' holds only 1s; AUC is undefined"),
        ({}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race", "--intersect"],
         r"--intersect needs at least two --attribute"),
        ({}, ["{csv}", "--label", "y", "--score", "p"], r"give at least one --attribute"),
        ({}, ["{csv}", "--demo"], r"give either PREDICTIONS\.csv or --demo"),
        ({}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race", "--threshold", "2"],
         r"--threshold 2.0: must be in \[0, 1\]"),
        ({}, ["{csv}", "--label", "y", "--score", "p", "--attribute", "race", "--n-boot", "-5"],
         r"--n-boot -5: must be >= 0"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(tmp_path, capsys, setup, argv, message):
    csv = tmp_path / "p.csv"
    if setup is not None:
        frame = write_predictions(csv, n=40)
        if "col" in setup:
            frame[setup["col"]] = frame[setup["col"]].astype(object)
            if "row" in setup:
                frame.loc[setup["row"], setup["col"]] = setup["value"]
            else:
                frame[setup["col"]] = setup["value"]
            frame.to_csv(csv, index=False)
    argv = [a.format(csv=csv, dir=tmp_path) for a in argv] + ["--out", str(tmp_path / "o")]
    rc, _, err = audit(*argv, capsys=capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("multifair audit: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "metrics.json").exists()
