"""`multifair benchmark` end to end with real `multifair train` subprocesses on the shipped tiny
config (2 methods x 2 seeds x 1 epoch on scikit-learn's diabetes table)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multifair.cli import main
from multifair.config import parse_overrides
from multifair.evaluation import benchmark as bm

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "benchmarks" / "tiny.yaml"


def tiny_config(tmp_path: Path, **changes) -> Path:
    """The shipped tiny config, writing under tmp_path."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["base"] = str((TINY.parent / cfg["base"]).resolve())
    cfg["output"] = str(tmp_path / "bench")
    cfg.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finished(out_dir: Path) -> dict[Path, int]:
    """metrics.json files of finished runs -> their modification time (ns)."""
    return {
        p: p.stat().st_mtime_ns
        for p in sorted(out_dir.glob("runs/*/*/*/*/metrics.json"))
        if bm.read_metrics(p.parent) is not None
    }


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_plan_prints_one_command_per_run_and_starts_nothing(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["benchmark", str(cfg), "--plan"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    out_dir = tmp_path / "bench"
    for line, (label, seed) in zip(
        lines, [("erm", 0), ("erm", 1), ("multifair", 0), ("multifair", 1)]
    ):
        argv = shlex.split(line)
        assert argv[:4] == [sys.executable, "-m", "multifair", "train"]
        assert (
            Path(argv[4]) == out_dir / "configs" / "data" / f"{label}.yaml"
            and Path(argv[4]).is_file()
        )
        overrides = parse_overrides(argv[5:])
        assert overrides["train"]["seed"] == seed and overrides["data"]["attribute"] == "sex"
        assert yaml.safe_load(Path(argv[4]).read_text())["method"]["name"] == label
        assert overrides["output"]["dir"] == str(out_dir / "runs/data/sex" / label / f"seed{seed}")
    # the erm entry's config drops the base's multifair parameters; multifair keeps them
    assert yaml.safe_load((out_dir / "configs/data/erm.yaml").read_text())["method"] == {
        "name": "erm"
    }
    assert (
        yaml.safe_load((out_dir / "configs/data/multifair.yaml").read_text())["method"]["tau"]
        == 0.04
    )
    assert (out_dir / "benchmark.yaml").is_file() and not (out_dir / "runs").exists()


def test_tiny_benchmark_killed_midway_then_resumed(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    out_dir = tmp_path / "bench"
    log = (tmp_path / "first.log").open("wb")
    # its own process group, so we can check that no training child outlives the kill
    proc = subprocess.Popen(
        [sys.executable, "-m", "multifair", "benchmark", str(cfg), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not finished(out_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    log.close()
    first = (tmp_path / "first.log").read_text()
    assert "interrupted:" in first, first
    assert not group_alive(proc.pid), "a training process survived the benchmark's SIGTERM"
    done_before = finished(out_dir)
    assert 1 <= len(done_before) < 4, first

    # the same command again: only the missing runs are trained
    assert main(["benchmark", str(cfg)]) == 0
    err = capsys.readouterr().err
    k = len(done_before)
    assert f"4 runs: {k} already finished, {4 - k} to run" in err
    assert len(re.findall(r"^\[\d/\d\] start ", err, flags=re.M)) == 4 - k
    done_after = finished(out_dir)
    assert len(done_after) == 4
    assert all(done_after[p] == t for p, t in done_before.items()), "a finished run was redone"

    # the table, in every format, and the report
    md = (out_dir / "results/results.md").read_text()
    assert "## data / sex" in md and "| erm |" in md and "| multifair |" in md
    assert "### paired difference to erm (by seed)" in md and "3 comparisons" in md
    data = json.loads((out_dir / "results/results.json").read_text())
    rows = {r["label"]: r for r in data["tables"][0]["rows"]}
    assert rows["multifair"]["paired"]["es_auc"]["n"] == 2 and rows["erm"]["seeds"] == [0, 1]
    assert (out_dir / "results/results.csv").read_text().count("\n") == 3
    html = (out_dir / "report.html").read_text()
    assert "<h3>Fairness vs AUC</h3>" in html and "<h3>Diagnostics (every run)</h3>" in html
    assert html.count("data:image/png;base64,") >= 4 and not re.search(r"https?://", html)

    # changing the recipe afterwards: finished runs are kept but flagged as stale
    original = cfg.read_text()
    changed = yaml.safe_load(original)
    changed["overrides"]["train"]["epochs"] = 2
    cfg.write_text(yaml.safe_dump(changed))
    assert main(["benchmark", str(cfg), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "4 runs: 4 already finished, 0 to run" in err
    # every run with a recorded fingerprint (the killed first attempt may have had no time to
    # record one for the run it was finishing)
    flagged = re.search(r"WARNING: (\d) finished runs were trained with a different config", err)
    assert flagged and 4 - k <= int(flagged.group(1)) <= 4, err
    cfg.write_text(original)  # back to the recipe they were trained with
    assert main(["benchmark", str(cfg), "--plan"]) == 0
    capsys.readouterr()

    # collect and a single run's report work on the finished directory
    assert main(["benchmark", "collect", str(out_dir), "--no-report"]) == 0
    assert "4 of 4 runs finished\n" in capsys.readouterr().err
    run_dir = out_dir / "runs/data/sex/multifair/seed0"
    assert main(["report", str(run_dir)]) == 0
    run_html = (run_dir / "report.html").read_text()
    assert "<h2>Per-group ROC curves</h2>" in run_html and "<h2>Diagnostics</h2>" in run_html
    # ROC for sex and age, aux AUC, modulation factors, gap vs tau, validation per epoch
    assert run_html.count("data:image/png;base64,") == 6


@pytest.mark.parametrize("launcher", ["subprocess", "preloaded"])
def test_a_failed_run_is_reported_with_its_stderr(tmp_path, capsys, launcher):
    """Either launcher: the exit status, the stderr tail and the table's failed-runs list."""
    cfg = tiny_config(
        tmp_path,
        methods=[{"label": "bad", "method": {"name": "erm", "bogus": 1}}],
        seeds=[0],
        workers=1,
    )
    assert main(["benchmark", str(cfg), "--no-report", "--launcher", launcher]) == 1
    err = capsys.readouterr().err
    assert "FAILED data/sex/bad/seed0 (exit 2)" in err
    assert "bogus" in err  # the tail of the run's stderr names the bad key
    md = (tmp_path / "bench/results/results.md").read_text()
    assert "## Failed runs" in md and "bogus" in md


def test_resampled_synthetic_table_trains_each_seed_on_its_own_draw(tmp_path, capsys):
    recipe = REPO / "configs" / "benchmarks" / "synth_table_recipe.yaml"
    cfg = {
        "name": "resample",
        "base": str(recipe),
        "output": str(tmp_path / "bench"),
        "overrides": {"train": {"epochs": 1}},
        "datasets": [
            {
                "label": "synth",
                "synth": {"flavour": "table", "out": "gen", "knobs": {"n": 300}, "resample": True},
            }
        ],
        "attributes": ["race"],
        "seeds": [3, 4],
        "methods": [{"label": "erm", "method": {"name": "erm"}}],
        "reference": "erm",
        "workers": 2,
        "n_boot": 0,
    }
    path = tmp_path / "resample.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", str(path), "--no-report"]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "bench"
    for seed in (3, 4):
        run = yaml.safe_load((out_dir / f"runs/synth/race/erm/seed{seed}/config.yaml").read_text())
        assert run["data"]["path"] == str(tmp_path / "gen" / f"seed{seed}" / "table.csv")
    data = json.loads((out_dir / "results/results.json").read_text())
    table = data["tables"][0]
    metas = [tmp_path / "gen" / f"seed{s}" / "synth_meta.json" for s in (3, 4)]
    best = [json.loads(m.read_text())["best_auc"]["test"]["overall_joint"] for m in metas]
    line = table["best_achievable_auc"]["best achievable (all modalities)"]["auc"]
    assert abs(line - sum(best) / 2) < 1e-3  # the table rounds to 4 decimals
