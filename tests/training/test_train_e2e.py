"""End to end through `multifair.cli.main`: train on real tabular data (scikit-learn's bundled
diabetes table), the run directory it leaves, evaluate and predict from it, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from multifair.cli import main
from multifair.metrics import summarize
from multifair.training.logging import read_log

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DIABETES = str(CONFIGS / "diabetes.yaml")
# tiny and fast: 3 epochs of 4 steps on 265 training rows
TINY = [
    "train.epochs=3", "train.batch_size=64", "train.log_every=2", "train.progress=false",
    "train.warmup_steps=0", "model.dim=16", "output.n_boot=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("e2e") / "run"
    assert main(["train", DIABETES, *TINY, "--out", str(run)]) == 0
    return run


def test_run_directory_holds_everything_documented(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "env.json", "log.jsonl", "metrics.json", "checkpoints"} <= names
    assert {f"predictions_{s}.csv" for s in ("train", "val", "test")} <= names
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["method"]["name"] == "multifair" and config["train"]["epochs"] == 3
    assert config["output"]["dir"] == str(trained)
    env = json.loads((trained / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__ and "sha" in env["git"]

    log = read_log(trained / "log.jsonl")
    steps = [r for r in log if r["kind"] == "step"]
    epochs = [r for r in log if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    keys = set(steps[0])
    for key in ("lr", "loss/total", "loss/task", "B/vitals", "f/serum", "aux_auc/vitals", "gap", "fair_mode"):  # fmt: skip
        assert key in keys, key
    assert 0.0 <= steps[0]["fair_mode"] <= 1.0  # a rate over the logging window
    assert set(epochs[0]["val"]) >= {"auc", "es_auc", "es_acc", "group_auc", "dpd", "deodds"}

    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["method"] == "multifair" and metrics["attribute"] == "sex"
    assert metrics["select_by"] == "auc" and metrics["tau"] == 0.04
    best = max(range(3), key=lambda e: epochs[e]["val"]["auc"])
    assert metrics["selected_epoch"] == best
    assert metrics["time_per_step_s"] > 0 and metrics["peak_memory_bytes"] > 0
    assert metrics["uses_attribute_at_test"] is False

    # weights_only checkpoints
    for name in ("best.pt", "last.pt"):
        state = torch.load(trained / "checkpoints" / name, weights_only=True)
        assert "model" in state and "method" in state
    assert torch.load(trained / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 3


def test_test_metrics_are_the_summary_of_the_written_predictions(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    frame = pd.read_csv(trained / "predictions_test.csv")
    assert frame["sample_id"].is_unique and set(frame["split"]) == {"test"}
    assert list(frame.columns) == ["sample_id", "split", "label", "score", "sex", "sex_name", "age", "age_name", "aux_score_vitals", "aux_score_serum"]  # fmt: skip
    # the auxiliary heads' scores are those metrics.json's aux_auc was computed from
    for m in ("vitals", "serum"):
        auc = roc_auc_score(frame["label"], frame[f"aux_score_{m}"])
        assert auc == pytest.approx(metrics["aux_auc"]["test"][m], abs=1e-6)
    oracle = summarize(
        frame["label"].to_numpy(), frame["score"].to_numpy(),
        sensitive_features={"sex": frame["sex"].to_numpy(), "age": frame["age"].to_numpy()},
        group_names={"sex": {0: "sex 1", 1: "sex 2"}, "age": {0: "<50", 1: ">=50"}},
    )  # fmt: skip
    assert metrics["test"]["overall"]["auc"] == pytest.approx(oracle["overall"]["auc"], abs=1e-6)
    got, want = metrics["test"]["attributes"]["sex"], oracle["attributes"]["sex"]
    for key in ("es_auc", "dpd", "deodds"):
        assert got[key] == pytest.approx(want[key], abs=1e-6)


def test_evaluate_reproduces_the_test_metrics(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["evaluate", str(trained), "--split", "test", "--n-boot", "0", "--json", str(out)]
    assert main(args) == 0
    assert "ES-AUC" in capsys.readouterr().out
    evaluated = json.loads(out.read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert evaluated["overall"]["auc"] == pytest.approx(metrics["test"]["overall"]["auc"], abs=1e-9)
    assert evaluated["attributes"]["sex"]["es_auc"] == pytest.approx(
        metrics["test"]["attributes"]["sex"]["es_auc"], abs=1e-9
    )


def test_predict_on_a_new_unlabelled_table_reuses_the_fitted_preprocessing(trained, tmp_path):
    from sklearn.datasets import load_diabetes

    table = load_diabetes(scaled=False, as_frame=True).frame.drop(columns=["target"])
    table.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(trained), str(tmp_path / "new.csv"), "--out", str(out)]) == 0
    pred = pd.read_csv(out)
    assert len(pred) == 442 and (pred["label"] == -1).all() and set(pred["split"]) == {"all"}
    # the same rows score the same as in the run: same weights, same fitted standardisation
    test = pd.read_csv(trained / "predictions_test.csv").merge(pred, on="sample_id", suffixes=("", "_new"))  # fmt: skip
    assert len(test) == 89
    np.testing.assert_allclose(test["score"], test["score_new"], rtol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=0.1", "train.learning_rate: unknown key"),
        ("train.epochs=zero", "train.epochs"),
        ("method.name=nosuch", "method 'nosuch' not found. Available"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, override, message):
    assert main(["train", DIABETES, override, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing was started


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "nan"
    one = ["train.epochs=3", "train.stop_after_epoch=1"]
    assert main(["train", DIABETES, *TINY, *one, "method.name=erm", "--out", str(run)]) == 0
    good = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # continue with an absurd learning rate: the weights blow up and the loss turns NaN/inf
    assert main(["train", "--resume", str(run), "train.lr=1e30", "train.aux_lr=1e30"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 2" in err and "last.pt" in err
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert kept["epoch"] == 1
    for name, tensor in kept["model"].items():
        assert torch.equal(tensor, good["model"][name])
    assert not (run / "metrics.json").exists()


def test_resume_needs_no_config_and_refuses_one(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), DIABETES]) == 2
    assert "give only key=value overrides" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "give a CONFIG file" in capsys.readouterr().err


def test_select_from_keeps_the_burn_in_epochs_out_of_the_selection(tmp_path):
    run = tmp_path / "run"
    args = ["train", DIABETES, *TINY, "train.select_from=2", "--out", str(run)]
    assert main(args) == 0
    epochs = [r for r in read_log(run / "log.jsonl") if r["kind"] == "epoch"]
    assert [r["selected"] for r in epochs] == [False, False, True]  # only epoch 2 may win
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selected_epoch"] == 2 and metrics["select_from"] == 2
    # the selected checkpoint is epoch 2's: its validation AUC is the one reported
    assert metrics["val"]["overall"]["auc"] == pytest.approx(epochs[2]["val"]["auc"])
