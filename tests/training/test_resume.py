"""Kill a training process after its first checkpoint, `--resume` it, and reach bit-identically
the same final metrics, parameters, optimizer state, method state and log as an uninterrupted
run (CPU, fixed seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from multifair.cli import main
from multifair.training.logging import read_log

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ARGS = [
    str(CONFIGS / "diabetes.yaml"), "train.epochs=3", "train.batch_size=64", "train.log_every=2",
    "train.progress=false", "model.dim=16", "output.n_boot=0", "output.predictions=[test]",
    "train.schedule=cosine",
]  # fmt: skip


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_same_state(a: dict, b: dict, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kill_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["train", *ARGS, "--out", str(straight)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "multifair", "train", *ARGS, "--out", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no clean-up runs: as after an OOM kill or a pre-emption
    proc.wait()
    proc.stderr.close()
    assert not (killed / "metrics.json").exists(), "the run finished before the kill"
    done = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 3

    assert main(["train", "--resume", str(killed)]) == 0

    m1 = json.loads((straight / "metrics.json").read_text())
    m2 = json.loads((killed / "metrics.json").read_text())
    for key in ("selected_epoch", "val", "test"):
        assert m1[key] == m2[key], key  # exact: every metric of every group
    for name in ("last.pt", "best.pt"):
        a = torch.load(straight / "checkpoints" / name, weights_only=True)
        b = torch.load(killed / "checkpoints" / name, weights_only=True)
        for part in ("model", "method", "optimizer", "epoch"):
            if part in a:
                assert_same_state(a[part], b[part], f"{name}:{part}")
    assert (straight / "predictions_test.csv").read_text() == (killed / "predictions_test.csv").read_text()  # fmt: skip
    # the killed epoch's step records were dropped on resume, not logged twice
    assert without_timing(read_log(straight / "log.jsonl")) == without_timing(read_log(killed / "log.jsonl"))  # fmt: skip


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGTERM: the step in progress finishes, last.pt holds the epoch part-way (with the open
    log window), exit 143; --resume skips the batches already trained on and reaches the same
    weights, optimizer state, metrics and log as a run that was never stopped."""
    args = [*ARGS, "train.batch_size=16", "train.log_every=3"]  # 16 steps an epoch
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", *args, "--out", str(straight)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "multifair", "train", *args, "--out", str(stopped)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    log = stopped / "log.jsonl"
    while not (log.exists() and log.read_text()):  # the first step record: mid-epoch 1
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no step record within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("multifair train: stopped by SIGTERM after step "), err
    assert f"resume with multifair train --resume {stopped}" in line
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert not (stopped / "metrics.json").exists()
    if "partial" in state:  # stopped part-way through an epoch (the usual case)
        assert 1 <= state["partial"]["steps"] < 16 and state["step"] % 16 != 0

    assert main(["train", "--resume", str(stopped)]) == 0
    m1 = json.loads((straight / "metrics.json").read_text())
    m2 = json.loads((stopped / "metrics.json").read_text())
    for key in ("selected_epoch", "val", "test"):
        assert m1[key] == m2[key], key
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "method", "optimizer", "epoch", "step"):
        assert_same_state(a[part], b[part], part)
    assert "partial" not in b
    assert without_timing(read_log(straight / "log.jsonl")) == without_timing(read_log(log))
