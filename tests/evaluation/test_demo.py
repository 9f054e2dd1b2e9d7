"""`multifair demo` end to end on a smaller generated dataset; its embedded settings equal
configs/demo.yaml and its matrix equals configs/benchmarks/demo.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from multifair.cli import main
from multifair.config import load_yaml
from multifair.evaluation import benchmark as bm
from multifair.evaluation.benchmark_tables import Paired, Row
from multifair.evaluation.demo import (
    DEMO_CONFIG,
    DEMO_KNOBS,
    GROUP_AWARE,
    REFERENCE,
    _verdict,
    demo_benchmark,
    ensure_data,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_embedded_demo_settings_are_configs_demo_yaml():
    shipped = load_yaml(CONFIGS / "demo.yaml")
    shipped["data"].pop("root")
    embedded = json.loads(json.dumps(DEMO_CONFIG))
    embedded["data"].pop("root")
    assert shipped == embedded


def test_demo_matrix_is_configs_benchmarks_demo_yaml(tmp_path):
    """Every row's training config, the seeds and the data knobs: the shipped benchmark file
    reproduces what `multifair demo` runs (apart from where the data and runs live)."""
    shipped, _ = bm.load_benchmark(CONFIGS / "benchmarks" / "demo.yaml")
    embedded = demo_benchmark(tmp_path / "data", tmp_path / "runs", workers=2)
    assert [m.label for m in shipped.methods] == [m.label for m in embedded.methods]
    assert shipped.seeds == embedded.seeds and shipped.attributes == embedded.attributes
    assert shipped.datasets[0].synth.knobs == embedded.datasets[0].synth.knobs
    assert {k: v for k, v in DEMO_KNOBS.items() if k not in ("flavour", "scenario")} == (
        shipped.datasets[0].synth.knobs
    )
    for a, b in zip(shipped.methods, embedded.methods, strict=True):
        one = bm.entry_config(shipped, shipped.datasets[0], a)
        two = bm.entry_config(embedded, embedded.datasets[0], b)
        one["data"].pop("root"), two["data"].pop("root")
        assert one == two, a.label


def test_a_bad_override_is_one_line_before_any_data_or_run(tmp_path, capsys):
    args = ["demo", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), "train.epoch=3"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "multifair demo: error: config: train.epoch: unknown key; did you mean 'epochs'? (got 3)"
    ]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def _row(label: str, paired: dict[str, Paired] | None = None, **mean: float) -> Row:
    return Row(label, label, "x", None, None, [0, 1], {}, dict(mean), {}, {}, "auc", False,
               False, paired=paired or {})  # fmt: skip


def test_each_rows_sentence_follows_its_interval():
    groups = ["A", "B"]
    ref = _row(REFERENCE, **{"auc/A": 0.70, "auc/B": 0.95, "es_auc": 0.65})
    assert "A 0.700 against B 0.950" in _verdict(ref, ref, groups)
    up, tie = Paired(0.02, 0.01, 0.03, 3, []), Paired(0.0, -0.01, 0.01, 3, [])
    down = Paired(-0.02, -0.03, -0.01, 3, [])
    text = _verdict(_row("x", {"es_auc": up, "auc": down}), ref, groups)
    assert text.startswith("Fairer: ES-AUC +0.020") and "at lower AUC (-0.020)" in text
    text = _verdict(_row("x", {"es_auc": tie, "auc": up}), ref, groups)
    assert text.startswith("Ties with erm") and "at higher AUC" in text
    assert _verdict(_row("x", {"es_auc": down, "auc": tie}), ref, groups).startswith("Less fair")
    one_seed = Paired(0.02, math.nan, math.nan, 1, [0.02])
    assert "Too few" in _verdict(_row("x", {"es_auc": one_seed}), ref, groups)


@pytest.mark.slow
def test_demo_trains_every_row_and_prints_the_comparison(tmp_path, capsys):
    """Through `multifair.cli.main`, on a smaller generated dataset, two seeds, one epoch."""
    knobs = {**DEMO_KNOBS, "n": 200}
    args = ["demo", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
            "--subjects", "200", "--seeds", "2", "--workers", "2", "train.epochs=1",
            "train.select_from=0"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    table = out[out.index("3/3 results") :]
    # every row, the modalities check and the sentences
    for label in ("erm", "multifair", "recommended group-blind", f"{GROUP_AWARE} †"):
        assert f"  {label} " in table, label
    assert "fundus  head" in table and "oct     head" in table
    assert "What each row means" in table and "config: method: {name: multifair_adam" in table
    # the printed numbers are the runs' own: erm's AUC and the paired ES-AUC difference
    runs = tmp_path / "runs" / "runs" / "fairvision" / "race"
    metrics = {
        (m, s): json.loads((runs / m / f"seed{s}" / "metrics.json").read_text())
        for m in ("erm", "multifair")
        for s in (0, 1)
    }
    auc = sum(metrics[("erm", s)]["test"]["overall"]["auc"] for s in (0, 1)) / 2
    erm_line = next(line for line in table.splitlines() if line.startswith("  erm "))
    assert erm_line.split()[1] == f"{auc:.3f}"
    es = lambda m, s: metrics[(m, s)]["test"]["attributes"]["race"]["es_auc"]  # noqa: E731
    diff = sum(es("multifair", s) - es("erm", s) for s in (0, 1)) / 2
    mf_line = next(line for line in table.splitlines() if line.startswith("  multifair "))
    assert f"{diff:+.3f} [" in mf_line
    report = tmp_path / "runs" / "report.html"
    assert report.is_file() and f"report: {report}" in out
    # the data is generated once, and a second demo reuses every finished run
    meta = tmp_path / "cache" / "demo-fairvision-200" / "synth_meta.json"
    before = meta.stat().st_mtime_ns
    ensure_data(tmp_path / "cache", knobs)
    assert meta.stat().st_mtime_ns == before and "generating" not in capsys.readouterr().out
    assert main(args) == 0
    assert "12 runs: 12 already finished, 0 to run" in capsys.readouterr().out
