"""What a training run prints: bars on a terminal, one line per epoch in a log file."""

from __future__ import annotations

import io
import re
from pathlib import Path

from multifair.cli import main
from multifair.console import bars_enabled
from multifair.training.trainer import _progress

DIABETES = str(Path(__file__).resolve().parents[2] / "configs" / "diabetes.yaml")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_when_asked_for_and_on_a_terminal():
    assert bars_enabled(True, Terminal())
    assert not bars_enabled(False, Terminal())  # train.progress=false wins everywhere
    assert not bars_enabled(True, io.StringIO())  # a log file, a pipe, CI


def test_the_epoch_bar_stays_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = _progress(3, "epoch 1/1", True)
    for _ in range(3):
        bar.update()
    bar.close()
    assert "\r" in terminal.getvalue() and "epoch 1/1" in terminal.getvalue()


def test_a_run_logged_to_a_file_prints_one_line_per_epoch_and_no_bar_frames(tmp_path, capfd):
    """stdout and stderr are captured here, as by `> run.log 2>&1`: not terminals. Bars are
    asked for (train.progress=true, the default), so only the terminal check keeps them out."""
    args = [
        "train", DIABETES, "train.epochs=4", "train.batch_size=64", "train.progress=true",
        "train.tensorboard=false", "model.dim=16", "output.n_boot=0", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(args) == 0
    out, err = capfd.readouterr()
    log = out + err
    assert "\r" not in log
    epoch_lines = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == [f"epoch {e}" for e in (1, 2, 3, 4)]
    assert all(re.search(r"train loss [\d.]+ \| val AUC", line) for line in epoch_lines)
    assert len(log.splitlines()) < 40  # a header, the epochs, the test table: nothing per step
