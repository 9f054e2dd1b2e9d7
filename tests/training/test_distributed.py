"""Two processes under torchrun (gloo, CPU): the replicas stay identical, only rank 0 writes,
and the metrics are those of the gathered whole-split predictions (padding removed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from multifair.cli import main
from multifair.metrics import summarize
from multifair.training.logging import read_log

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def digest(state: dict) -> str:
    """An independent sha256 of a model state (same recipe as the trainer's)."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def torchrun_train(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Train the diabetes config for 2 epochs in two gloo processes on CPU; must succeed."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "multifair", "train", str(CONFIGS / "diabetes.yaml"), *overrides,
        "train.epochs=2", "train.batch_size=32", "train.progress=false",
        "train.device=cpu", "train.threads=1", "model.dim=16", "output.n_boot=0",
        "output.predictions=[test]", "--out", str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
def test_two_process_torchrun_gloo(tmp_path):
    run = tmp_path / "ddp"
    proc = torchrun_train(run, "train.log_every=2")
    assert proc.stdout.count("training multifair") == 1  # rank 0 alone talks

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # both ranks ended with the same weights, and they are the ones rank 0 checkpointed
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert metrics["replica_digests"] == [digest(last["model"])] * 2

    # rank 0 alone wrote the log: one record per logged step, no duplicates
    steps = [r["step"] for r in read_log(run / "log.jsonl") if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and len(steps) > 0

    # the whole test split exactly once (89 rows: one rank got a padded duplicate) ...
    frame = pd.read_csv(run / "predictions_test.csv")
    assert len(frame) == 89 and frame["sample_id"].is_unique
    # ... and the metrics are those of the gathered predictions
    oracle = summarize(
        frame["label"].to_numpy(), frame["score"].to_numpy(),
        sensitive_features={"sex": frame["sex"].to_numpy(), "age": frame["age"].to_numpy()},
        group_names={"sex": {0: "sex 1", 1: "sex 2"}, "age": {0: "<50", 1: ">=50"}},
    )  # fmt: skip
    assert metrics["test"]["overall"]["auc"] == pytest.approx(oracle["overall"]["auc"], abs=1e-9)
    for key in ("es_auc", "es_acc", "dpd", "deodds"):
        assert metrics["test"]["attributes"]["sex"][key] == pytest.approx(
            oracle["attributes"]["sex"][key], abs=1e-9
        )
    # one process predicting the same checkpoint gets the same scores
    out = tmp_path / "single.json"
    assert main(["evaluate", str(run), "--n-boot", "0", "--device", "cpu", "--json", str(out)]) == 0
    single = json.loads(out.read_text())
    assert single["overall"]["auc"] == pytest.approx(metrics["test"]["overall"]["auc"], abs=1e-6)


@pytest.mark.distributed
def test_two_process_group_stacking_fits_the_same_on_both_ranks(tmp_path):
    """`group_fusion: stacking` fits after selection on the gathered validation predictions
    (with `stacking_data: train+validation`, the gathered training ones too): both ranks must
    fit the same weights, so the test scores predicted half by each rank equal a single
    process's predictions from the checkpoint (which carries the fit)."""
    run = tmp_path / "ddp"
    torchrun_train(
        run,
        "method.name=multifair_adam",
        "method.group_fusion=stacking",
        "method.stacking_data=train+validation",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["uses_attribute_at_test"] is True
    assert all(v is not None for v in metrics["posthoc"].values())
    frame = pd.read_csv(run / "predictions_test.csv").set_index("sample_id")
    out = tmp_path / "single.csv"
    args = ["predict", str(run), str(CONFIGS / "diabetes.yaml"), "--split", "test"]
    assert main([*args, "--device", "cpu", "--out", str(out)]) == 0
    single = pd.read_csv(out).set_index("sample_id")
    assert single.loc[frame.index, "score"].to_numpy() == pytest.approx(
        frame["score"].to_numpy(), abs=1e-6
    )
