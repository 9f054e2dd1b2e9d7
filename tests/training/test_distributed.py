"""Two processes under torchrun (gloo, CPU): the replicas stay identical, only rank 0 writes,
and the metrics are those of the gathered whole-split predictions (padding removed)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_resume import assert_same_state

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


# the diabetes config, 2 epochs, small and quick; a test's own overrides come after these
COMMON = [
    "train.epochs=2", "train.batch_size=32", "train.progress=false", "train.device=cpu",
    "train.threads=1", "model.dim=16", "output.n_boot=0", "output.predictions=[test]",
]  # fmt: skip


# what libstdc++ prints when native code calls std::terminate outside any exception: CI saw
# rank 0 of one launch die of it (SIGABRT) near the end of epoch 1, in torch's native code
# (no Python error); 170 launches of the same test under heavy load did not reproduce it
NATIVE_ABORT = "terminate called without an active exception"


def torchrun_train(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Train the diabetes config for 2 epochs in two gloo processes on CPU; must succeed.

    A launch in which a rank died of that native abort is retried once into a fresh directory,
    with a warning carrying the Python stacks of the moment (faulthandler): any other failure,
    or the abort twice, fails the test."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "multifair", "train", str(CONFIGS / "diabetes.yaml"), *COMMON, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(
        [*cmd, "--out", str(run)], capture_output=True, text=True, timeout=240, env=env
    )
    if proc.returncode != 0 and NATIVE_ABORT in proc.stderr:
        warnings.warn(
            f"torchrun launch retried after a native abort:\n{proc.stderr[-6000:]}", stacklevel=2
        )
        shutil.rmtree(run, ignore_errors=True)
        proc = subprocess.run(
            [*cmd, "--out", str(run)], capture_output=True, text=True, timeout=240, env=env
        )
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


@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    """DDP: 2 processes x 8 samples x 2 accumulated micro-batches train exactly what one
    process does with 16 x 2 on the same data order: the two ranks' halves of each sampler
    chunk are the one process's micro-batch, so averaged gradients, the global-batch signals
    (gathered) and therefore every step agree. `multifair_released` edits the averaged encoder
    gradients with factors from those signals, so this also checks average-then-modify and
    `no_sync` on the first micro-batch. Dropout is off (it draws per-rank random numbers);
    `drop_last` keeps both runs to the same full batches."""
    same = [
        "method.name=multifair_released", "train.accumulate=2", "train.drop_last=true",
        "train.log_every=2", "model.dropout=0", "model.encoders.vitals.dropout=0",
        "model.encoders.serum.dropout=0",
    ]  # fmt: skip
    torchrun_train(tmp_path / "ddp", *same, "train.batch_size=8")
    args = ["train", str(CONFIGS / "diabetes.yaml"), *COMMON, *same, "train.batch_size=16"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    # parameters and method state (EMAs, previous AUCs) after every step of 2 epochs
    ddp, one = (torch.load(tmp_path / r / "checkpoints" / "last.pt") for r in ("ddp", "one"))
    assert ddp["step"] == one["step"] > 0
    for key in ("model", "method"):
        assert ddp[key].keys() == one[key].keys()
        for name, value in one[key].items():
            got = ddp[key][name]
            if name.endswith("self_attn.in_proj_bias"):
                # the key bias has a zero gradient in exact arithmetic (softmax ignores a
                # constant shift); AdamW turns its rounding noise into full-size steps, so it
                # differs at 1e-4 between any two summation orders. Query and value biases count.
                got, value = got.view(3, -1)[[0, 2]], value.view(3, -1)[[0, 2]]
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=name)
    # the logged window means (loss parts averaged over ranks; signals from gathered inputs)
    logs = [
        [r for r in read_log(tmp_path / run / "log.jsonl") if r["kind"] == "step"]
        for run in ("ddp", "one")
    ]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    # (not L_gm: a cosine between per-rank last-layer gradients, logged as the ranks' mean,
    # and it adds no gradient in `multifair_released`)
    for a, b in zip(*logs):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(b[key], float) and key != "loss/gm" and not key.startswith("update_"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    # the metrics of the selected checkpoint
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("ddp", "one")]
    assert metrics[0]["selected_epoch"] == metrics[1]["selected_epoch"]
    for split in ("val", "test"):
        a, b = (m[split] for m in metrics)
        assert a["overall"]["auc"] == pytest.approx(b["overall"]["auc"], abs=1e-6)
        assert a["attributes"]["sex"]["es_auc"] == pytest.approx(
            b["attributes"]["sex"]["es_auc"], abs=1e-6
        )


@pytest.mark.distributed
def test_sigterm_to_torchrun_stops_every_rank_after_one_step_and_resumes_exactly(tmp_path):
    """torchrun passes a SIGTERM on to every rank; the ranks agree at the next log step (one
    all_reduce), finish it, write last.pt with the epoch part-way and exit 143. A torchrun
    `--resume` reaches the same weights, optimizer state and metrics as a launch that was never
    stopped (each rank's RNG and its share of the epoch's batches restored)."""
    same = ["train.epochs=4", "train.batch_size=8", "train.log_every=1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    torchrun_train(straight, *same)
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "multifair", "train",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [*launcher, str(CONFIGS / "diabetes.yaml"), *COMMON, *same, "--out", str(stopped)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    log, deadline = stopped / "log.jsonl", time.monotonic() + 180
    while not (log.exists() and log.read_text()):  # the first step record: mid-epoch 1
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no step record within 180 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler's pre-emption does
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0, err
    stops = re.findall(r"multifair train: stopped by SIGTERM after step (\d+) ", err)
    assert len(stops) == 2 and stops[0] == stops[1], err  # both ranks, the same step
    assert f"resume with multifair train --resume {stopped}" in err
    assert not (stopped / "metrics.json").exists()
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == int(stops[0]) and len(state["rng"]) == 2
    # part-way through an epoch (never after its last step): 265 training rows, 2 ranks x 8,
    # 17 steps an epoch (the sampler pads the last batch)
    assert state["partial"]["steps"] == state["step"] % 17 > 0

    resumed = subprocess.run(
        [*launcher, "--resume", str(stopped)], capture_output=True, text=True, timeout=240, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (straight, stopped))
    for key in ("selected_epoch", "val", "test", "replica_digests"):
        assert m1[key] == m2[key], key
    a, b = (
        torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (straight, stopped)
    )
    assert a["step"] == b["step"] and "partial" not in b
    for part in ("model", "method", "optimizer"):
        assert_same_state(a[part], b[part], part)  # bit-identical
