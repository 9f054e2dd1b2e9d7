"""End to end through `multifair.cli.main`: training on an intersectional attribute
(`data.attribute=race*sex`) of the synthetic table, with group weights + selection by ES-AUC
and with stacking; what metrics.json, the printed table and the predictions hold; evaluate
from the run directory; bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from multifair.cli import main
from multifair.data.synthetic import SynthKnobs, generate
from multifair.training.logging import read_log

TINY = [
    "train.epochs=3", "train.batch_size=64", "train.log_every=2", "train.progress=false",
    "train.warmup_steps=0", "train.threads=1", "train.tensorboard=false", "model.preset=small",
    "model.dim=16", "output.n_boot=50", "data.attribute=race*sex",
]  # fmt: skip


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tab")
    generate(SynthKnobs(flavour="table", n=400, seed=0), out, progress=False)
    return out / "table.yaml"


@pytest.fixture(scope="module")
def weighted(table, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("ix") / "run"
    args = ["train", str(table), *TINY, "method.name=multifair_adam"]
    args += ["method.group_weights=validation", "train.select_by=es_auc", "--out", str(run)]
    buffer = io.StringIO()  # a module fixture cannot use capsys
    with contextlib.redirect_stdout(buffer):
        assert main(args) == 0
    return run, buffer.getvalue()


def test_group_weights_and_es_auc_selection_on_the_intersection(weighted):
    run, out = weighted
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["attribute"] == "race*sex" and metrics["select_by"] == "es_auc"
    fitted = metrics["intersections"]["race*sex"]
    assert fitted["parts"] == ["race", "sex"] and fitted["min_group_size"] == 30
    # the size rule printed one line per merged group, before training
    for m in fitted["merged"]:
        assert f"race*sex: {m['group']} has {m['n']} training samples" in out
    assert fitted["merged"], "n=400 leaves some race x sex groups under 30 training samples"
    # selection: the epoch with the best validation ES-AUC of race*sex
    epochs = [r for r in read_log(run / "log.jsonl") if r["kind"] == "epoch"]
    best = max(range(len(epochs)), key=lambda e: epochs[e]["val"]["es_auc"])
    assert metrics["selected_epoch"] == best
    assert set(epochs[0]["val"]["group_auc"]) == set(fitted["names"].values())
    # test summary: the intersection and its single parts, every group AUC with its CI and n
    test = metrics["test"]
    assert list(test["attributes"])[:3] == ["race*sex", "race", "sex"]
    assert test["policy"]["min_group_size"] == 30
    block = test["attributes"]["race*sex"]
    assert {g["name"] for g in block["groups"]} == set(fitted["names"].values())
    for g in block["groups"]:
        assert g["small"] == (g["n"] < 30)
        assert g["name"] in block["ci"]["group_auc"]
    assert any(g["small"] for g in block["groups"])
    # the printed table: a size column flagging the small groups
    table = out[out.index("race*sex: ", out.index("test split:")) :]
    small = next(g for g in block["groups"] if g["small"])
    line = next(x for x in table.splitlines() if x.strip().startswith(small["name"] + " "))
    assert line.rstrip().endswith("small") and f" {small['n']} " in line and "[" in line
    frame = pd.read_csv(run / "predictions_test.csv")
    assert {"race*sex", "race*sex_name", "race", "sex"} <= set(frame.columns)
    assert set(frame["race*sex_name"]) <= set(fitted["names"].values())


def test_evaluate_rebuilds_the_intersection_from_the_saved_state(weighted, tmp_path):
    run, _ = weighted
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--n-boot", "0", "--json", str(out)]) == 0
    evaluated = json.loads(out.read_text())["attributes"]["race*sex"]
    recorded = json.loads((run / "metrics.json").read_text())["test"]["attributes"]["race*sex"]
    assert [g["name"] for g in evaluated["groups"]] == [g["name"] for g in recorded["groups"]]
    assert evaluated["es_auc"] == pytest.approx(recorded["es_auc"], abs=1e-9)


def test_stacking_fits_one_recombination_per_intersection_group(table, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(table), *TINY, "train.epochs=2", "method.name=multifair_adam"]
    args += ["method.group_fusion=stacking", "data.min_group_size=10", "--out", str(run)]
    assert main(args) == 0
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    n_groups = len(metrics["intersections"]["race*sex"]["names"])
    assert n_groups >= 5  # with a limit of 10 most race x sex groups stay groups
    stacked = sorted(k for k in metrics["posthoc"] if k.startswith("stacking/"))
    assert stacked == [f"stacking/{g}" for g in range(n_groups)]
    assert metrics["uses_attribute_at_test"] is True


def test_unknown_attribute_in_the_intersection_is_one_line_exit_2(table, tmp_path, capsys):
    args = ["train", str(table), *TINY, "data.attribute=race*gender", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "multifair train: error: data.attribute: 'gender' in 'race*gender' is not an attribute "
        "of this data (valid: ['race', 'sex', 'age'], or a column of the table)"
    ]
