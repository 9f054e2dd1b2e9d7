"""Multi-class end to end through `multifair.cli.main`: a 3-class table and a 4-class
FairVision tree (AMD-style `amd_condition` strings) from the generator, train, the predictions
CSV (`score_<class>`, `pred`), `evaluate`, `predict` and `audit` reading it back, and a
binary-only method refusing in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from multifair.cli import main

CLASSES = ["none", "moderate", "severe"]
TINY = [
    "train.epochs=4", "train.lr=3e-3", "train.batch_size=64", "train.log_every=2", "train.progress=false",
    "train.warmup_steps=0", "train.tensorboard=false", "model.preset=small", "model.dim=16",
    "output.n_boot=20", "output.predictions=[test]", "method.name=erm",
]  # fmt: skip


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mc") / "t3"
    assert main(["data", "synth", "table", str(out), "--classes", "3", "--n", "600"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(table, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mc") / "run"
    assert main(["train", str(table / "table.yaml"), *TINY, "--out", str(run)]) == 0
    return run


def test_predictions_csv_has_a_score_per_class_and_the_argmax(trained):
    frame = pd.read_csv(trained / "predictions_test.csv")
    cols = [f"score_{c}" for c in CLASSES]
    assert list(frame.columns[:8]) == ["sample_id", "split", "label", "label_name", "pred", *cols]
    assert "score" not in frame.columns
    probs = frame[cols].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert (frame["pred"] == probs.argmax(axis=1)).all()
    assert (np.asarray(CLASSES)[frame["label"]] == frame["label_name"]).all()
    assert {f"aux_score_A_{c}" for c in CLASSES} <= set(frame.columns)
    metrics = json.loads((trained / "metrics.json").read_text())
    test = metrics["test"]
    assert test["classes"] == CLASSES
    expected = roc_auc_score(frame["label"], probs, multi_class="ovr", average="macro")
    assert test["overall"]["auc"] == pytest.approx(expected, abs=1e-6)
    assert test["overall"]["auc"] > 0.6  # the generator's stages are learnable
    race = test["attributes"]["race"]
    for g in race["groups"]:
        rows = frame["race_name"] == g["name"]
        sk = roc_auc_score(frame["label"][rows], probs[rows], multi_class="ovr")
        assert g["auc"] == pytest.approx(sk, abs=1e-6)
    assert race["ci"]["es_auc"][0] <= race["es_auc"] <= race["ci"]["es_auc"][1]
    epochs = [json.loads(x) for x in (trained / "log.jsonl").read_text().splitlines()]
    assert all(e["val"]["auc"] is not None for e in epochs if e["kind"] == "epoch")


def test_evaluate_predict_and_audit_read_multiclass_back(trained, table, tmp_path, capsys):
    metrics = json.loads((trained / "metrics.json").read_text())["test"]
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(trained), "--n-boot", "0", "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    summary = again.get("summary", again)
    assert summary["overall"]["auc"] == pytest.approx(metrics["overall"]["auc"], abs=1e-6)

    predicted = tmp_path / "pred.csv"
    assert main(["predict", str(trained), str(table / "table.yaml"), "--out", str(predicted)]) == 0
    assert {f"score_{c}" for c in CLASSES} | {"pred"} <= set(pd.read_csv(predicted).columns)

    capsys.readouterr()
    audit_dir = tmp_path / "audit"
    args = ["audit", str(trained / "predictions_test.csv"), "--attribute", "race"]
    assert main([*args, "--n-boot", "0", "--out", str(audit_dir)]) == 0
    audited = json.loads((audit_dir / "metrics.json").read_text())
    assert audited["classes"] == CLASSES
    assert audited["attributes"]["race"]["es_auc"] == pytest.approx(
        metrics["attributes"]["race"]["es_auc"], abs=1e-6
    )
    # labels given by name (label_name) are read as the same classes
    by_name = tmp_path / "audit_names"
    assert main([*args, "--label", "label_name", "--n-boot", "0", "--out", str(by_name)]) == 0
    named = json.loads((by_name / "metrics.json").read_text())
    assert named["overall"] == audited["overall"]
    assert "macro one-vs-rest AUC" in capsys.readouterr().out


def test_a_binary_only_method_refuses_a_multiclass_run_in_one_line(table, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", str(table / "table.yaml"), *TINY, "method.name=multifair", "--out", str(run)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'multifair' needs a binary label (data has 3 classes)" in err[0]


def test_four_class_fairvision_amd_trains(tmp_path):
    root = tmp_path / "fv"
    knobs = [
        "--n",
        "80",
        "--group-mix",
        "0.3,0.3,0.4",
        "--classes",
        "4",
        "--fundus-shape",
        "16,16",
        "--oct-shape",
        "3,16,16",
    ]
    assert main(["data", "synth", "fairvision", str(root), *knobs]) == 0
    config = {
        "data": {
            "kind": "fairvision",
            "root": str(root),
            "label_key": "amd_condition",  # the fairvision_amd preset by default
            "image_size": 16,
            "oct_slices": 2,
            "num_workers": 0,
        },
        "model": {
            "encoders": {
                "fundus": {"width": 4, "depth": 1},
                "oct": {"slice_options": {"width": 4, "depth": 1}},
            }
        },
    }
    path = tmp_path / "amd.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    one = ["train.epochs=1", "train.batch_size=16", "output.n_boot=0", "data.min_group_size=0"]
    assert main(["train", str(path), *TINY, *one, "--out", str(run)]) == 0
    frame = pd.read_csv(run / "predictions_test.csv")
    names = ["normal", "early", "intermediate", "late"]
    assert [c for c in frame.columns if c.startswith("score_")] == [f"score_{c}" for c in names]
    assert json.loads((run / "metrics.json").read_text())["test"]["classes"] == names


@pytest.mark.parametrize(
    "block",
    [
        ["method.levels=validation", "method.group_weights=validation"],  # one model for everyone
        ["method.unimodal_weight=1"],  # an under-learnt modality
    ],
    ids=["val-levels-val-groups", "unimodal"],
)
def test_multifair_adam_readme_blocks_train_three_classes(table, tmp_path, block):
    run = tmp_path / "run"
    args = [*TINY, "method.name=multifair_adam", *block, "--out", str(run)]
    assert main(["train", str(table / "table.yaml"), *args]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(np.isfinite(r["loss/total"]) for r in steps)
    assert all(0 <= r["aux_auc/A"] <= 1 and r["lr_factor/A"] > 0 for r in steps)
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert test["classes"] == CLASSES and test["overall"]["auc"] > 0.6
    if "method.levels=validation" in block:
        for epoch in (r for r in records if r["kind"] == "epoch"):
            # the levels are the validation macro one-vs-rest AUCs the trainer reports
            for m in ("A", "B"):
                assert epoch["method"][f"val_level/{m}"] == pytest.approx(
                    epoch["val"]["aux_auc"][m], abs=1e-9
                )
            weights = [v for k, v in epoch["method"].items() if k.startswith("group_weight/")]
            assert len(weights) == 3 and all(np.isfinite(w) and w > 0 for w in weights)


@pytest.mark.parametrize("name", ["multifair_adam", "fin"])
@pytest.mark.parametrize("fusion", ["stacking", "blind_stacking"])
def test_group_stacking_refuses_three_classes_in_one_line(table, tmp_path, capsys, name, fusion):
    args = [*TINY, f"method.name={name}", f"method.group_fusion={fusion}"]
    assert main(["train", str(table / "table.yaml"), *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and f"method {name!r}: group_fusion: {fusion} needs a binary label" in err[0]
    )
    assert "data has 3 classes" in err[0]
    # refused when the method is built: no model was built, no checkpoint written
    assert not list(tmp_path.rglob("*.pt"))
