"""Benchmark config, plan, collection and tables, on run directories written in the documented
layout by tests/evaluation/conftest.py (no training)."""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from multifair.config import parse_overrides
from multifair.errors import UserError
from multifair.evaluation import benchmark as bm
from multifair.evaluation import benchmark_report as br
from multifair.evaluation import benchmark_tables as bt

BASE = {"data": {"kind": "table", "path": "sklearn:diabetes"}, "method": {"name": "erm"}}


def write_config(tmp_path: Path, **changes) -> Path:
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(BASE))
    cfg = {
        "name": "unit",
        "base": "train.yaml",
        "output": str(tmp_path / "bench"),
        "overrides": {"train": {"epochs": 1}, "data.unknown": "drop"},
        "attributes": ["race"],
        "seeds": [0, 1],
        "methods": [
            {"label": "erm", "method": {"name": "erm"}},
            {"label": "mf", "method": {"name": "multifair", "rho": 1.2}},
            {
                "label": "erm-es",
                "method": {"name": "erm"},
                "overrides": {"train.select_by": "es_auc"},
            },
        ],
        "sweep": {"key": "method.tau", "values": [0.02, 0.08], "methods": ["mf"]},
    }
    cfg.update(changes)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- config and plan ----------------------------------------------------------------------------
def test_plan_is_deterministic_and_overrides_round_trip(tmp_path):
    cfg, out_dir = bm.load_benchmark(write_config(tmp_path))
    runs = bm.plan(cfg, out_dir)
    # erm x 2 seeds + mf x 2 tau x 2 seeds + erm-es x 2 seeds
    assert len(runs) == 8
    assert [r.run_id for r in runs[:4]] == [
        "data/race/erm/seed0",
        "data/race/erm/seed1",
        "data/race/mf__tau=0.02/seed0",
        "data/race/mf__tau=0.02/seed1",
    ]
    assert runs == bm.plan(cfg, out_dir)  # same config -> same runs, same order
    # runs START seed by seed, so a benchmark stopped part-way has whole, paired seeds
    order = [r.run_id for r in bm.execution_order(cfg, runs)]
    assert order[:4] == [
        "data/race/erm/seed0",
        "data/race/mf__tau=0.02/seed0",
        "data/race/mf__tau=0.08/seed0",
        "data/race/erm-es/seed0",
    ]
    assert all(run_id.endswith("seed1") for run_id in order[4:])
    lines = bm.plan_lines(cfg, runs)
    argv = shlex.split(lines[3])
    assert argv[1:4] == ["-m", "multifair", "train"]
    assert argv[4] == str(out_dir / "configs" / "data" / "mf.yaml")
    # the command line carries what varies per run ...
    assert parse_overrides(argv[5:]) == {
        "method": {"tau": 0.02},
        "data": {"attribute": "race"},
        "train": {"seed": 1},
        "output": {"dir": str(out_dir / "runs/data/race/mf__tau=0.02/seed1")},
    }
    # ... and the entry's config file the rest: base -> overrides -> method block
    bm.write_manifest(cfg, out_dir)
    mf = yaml.safe_load(Path(argv[4]).read_text())
    assert mf == {
        "data": {"kind": "table", "path": "sklearn:diabetes", "unknown": "drop"},
        "method": {"name": "multifair", "rho": 1.2},
        "train": {"epochs": 1},
    }
    es = yaml.safe_load((out_dir / "configs/data/erm-es.yaml").read_text())
    assert es["train"] == {"epochs": 1, "select_by": "es_auc"} and es["method"] == {"name": "erm"}


def test_labels_with_dots_and_equals_give_distinct_files_without_equals(tmp_path):
    methods = [
        {"label": "reweight p=0.5", "method": {"name": "reweight", "power": 0.5}},
        {"label": "reweight p=0.6", "method": {"name": "reweight", "power": 0.6}},
    ]
    cfg, out_dir = bm.load_benchmark(write_config(tmp_path, methods=methods, sweep=None))
    runs = bm.plan(cfg, out_dir)
    assert all("=" not in r.config.name for r in runs)  # `multifair train` reads "=" as override
    assert len({r.config for r in runs}) == 2 and len({r.run_dir for r in runs}) == 4
    logs = {p for r in runs for p in bm.log_paths(out_dir, r)}
    assert len(logs) == 12  # stdout, stderr, status per run, none shared
    with pytest.raises(UserError, match="path with '='"):
        bad = tmp_path / "a=b"
        bm.write_manifest(cfg, bad)


def test_several_sweeps_run_one_key_at_a_time(tmp_path):
    sweeps = [
        {"key": "method.tau", "values": [0.02, 0.08], "methods": ["mf"]},
        {"key": "train.batch_size", "values": [16, 64]},
    ]
    cfg, out_dir = bm.load_benchmark(write_config(tmp_path, sweep=sweeps, seeds=[0]))
    cells = [(r.label, r.sweep_key, r.sweep_value) for r in bm.plan(cfg, out_dir)]
    assert cells == [
        ("erm", "train.batch_size", 16),
        ("erm", "train.batch_size", 64),
        ("mf", "method.tau", 0.02),
        ("mf", "method.tau", 0.08),
        ("mf", "train.batch_size", 16),
        ("mf", "train.batch_size", 64),
        ("erm-es", "train.batch_size", 16),
        ("erm-es", "train.batch_size", 64),
    ]
    with pytest.raises(UserError, match="each key at most once"):
        bm.load_benchmark(write_config(tmp_path, sweep=[sweeps[0], sweeps[0]]))


def test_synthetic_dataset_is_generated_once_and_feeds_the_data_section(tmp_path):
    path = write_config(
        tmp_path,
        base=None,
        sweep=None,
        datasets=[
            {
                "label": "synth",
                "synth": {
                    "flavour": "table",
                    "scenario": "main",
                    "out": "gen",
                    "knobs": {"n": 300},
                },
            }
        ],
    )
    cfg, out_dir = bm.load_benchmark(path)
    bm.prepare_data(cfg, echo=lambda _: None)
    meta = tmp_path / "gen" / "synth_meta.json"
    assert meta.is_file()
    stamp = meta.stat().st_mtime_ns
    bm.prepare_data(cfg, echo=lambda _: None)  # present: not generated again
    assert meta.stat().st_mtime_ns == stamp
    bm.write_manifest(cfg, out_dir)
    erm = yaml.safe_load((out_dir / "configs/synth/erm.yaml").read_text())
    generated = yaml.safe_load((tmp_path / "gen" / "table.yaml").read_text())["data"]
    assert erm["data"] == {**generated, "unknown": "drop"}  # + the benchmark's override
    assert erm["train"] == {"epochs": 1} and erm["method"] == {"name": "erm"}
    best = bt.read_synth_meta(meta, "race")
    assert set(best) == {
        "best achievable (all modalities)",
        "best achievable (A alone)",
        "best achievable (B alone)",
    }
    assert 0.5 < best["best achievable (all modalities)"]["auc/White"] <= 1
    assert bt.read_synth_meta(meta, "sex") is None  # the latents are drawn per race group


def test_entry_config_keeps_method_params_only_for_the_same_method(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"data": {"kind": "table"}, "method": {"name": "multifair", "tau": 0.04}})
    )
    cfg = bm.BenchmarkConfig(
        name="x",
        base=str(tmp_path / "base.yaml"),
        output=str(tmp_path / "out"),
        attributes=["race"],
        seeds=[0],
        methods=[
            {"label": "erm", "method": {"name": "erm"}},
            {"label": "mf", "method": {"name": "multifair", "delta": 0.5}},
        ],
    )
    erm, mf = cfg.methods
    assert bm.entry_config(cfg, cfg.datasets[0], erm)["method"] == {"name": "erm"}
    assert bm.entry_config(cfg, cfg.datasets[0], mf)["method"] == {
        "name": "multifair",
        "tau": 0.04,
        "delta": 0.5,
    }


@pytest.mark.parametrize(
    "value", ["erm", "yes", "a b", "", 3, 0.1, 1e-5, True, None, [0.5, 1], {"a": 1}, "x: y"]
)
def test_format_value_reads_back_unchanged(value):
    text = bm.format_value(value)
    assert parse_overrides([f"k={text}"])["k"] == value


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"workerz: unknown key"):
        bm.load_benchmark(write_config(tmp_path, workerz=2))
    with pytest.raises(UserError, match=r"sweep\.methods: .*'nope'"):
        bm.load_benchmark(
            write_config(tmp_path, sweep={"key": "method.tau", "values": [1], "methods": ["nope"]})
        )
    dup = [{"label": "erm", "method": {"name": "erm"}}] * 2
    with pytest.raises(UserError, match="labels must be unique"):
        bm.load_benchmark(write_config(tmp_path, methods=dup))
    with pytest.raises(UserError, match=r"methods\.0\.method.*needs a `name`"):
        bm.load_benchmark(write_config(tmp_path, methods=[{"label": "x", "method": {}}]))
    with pytest.raises(UserError, match="training config not found"):
        bm.load_benchmark(write_config(tmp_path, base="missing.yaml"))


# ---- paired differences -----------------------------------------------------------------------
def test_paired_difference_matches_a_hand_computation():
    row = {0: 0.80, 1: 0.75, 2: 0.71, 3: 0.90, 7: 0.5}
    ref = {0: 0.79, 1: 0.72, 2: 0.72, 3: 0.88, 9: 0.1}  # seeds 7 and 9 are unpaired
    p = bt.paired_difference(row, ref)
    diffs = [0.01, 0.03, -0.01, 0.02]
    mean = sum(diffs) / 4  # 0.0125
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    t975_3df = 3.182446305284263  # Student t, 97.5th percentile, 3 degrees of freedom (table)
    assert p.n == 4
    assert p.diffs == pytest.approx(diffs)
    assert p.mean == pytest.approx(0.0125)
    assert p.lo == pytest.approx(mean - t975_3df * sd / 2)
    assert p.hi == pytest.approx(mean + t975_3df * sd / 2)
    one = bt.paired_difference({0: 0.8}, {0: 0.7})
    assert one.n == 1 and one.mean == pytest.approx(0.1) and math.isnan(one.lo)
    assert bt.paired_difference({0: math.nan}, {0: 0.7}).n == 0


# ---- collection and tables ----------------------------------------------------------------------
def populate(
    tmp_path: Path, make_run_dir, *, skip: tuple[str, ...] = ()
) -> tuple[bm.BenchmarkConfig, Path]:
    """A finished benchmark: erm, a FIN-like row, a unimodal reference row, 3 seeds."""
    meta = tmp_path / "synth_meta.json"
    # the shape data/synthetic.py writes
    best = {
        "white": {"A": 0.96, "B": 0.80, "joint": 0.97, "n": 1},
        "black": {"A": 0.63, "B": 0.80, "joint": 0.82, "n": 1},
        "asian": {"A": 0.62, "B": 0.76, "joint": 0.81, "n": 1},
        "overall_joint": 0.95,
    }
    meta.write_text(json.dumps({"modalities": ["A", "B"], "best_auc": {"test": best}}))
    path = write_config(
        tmp_path,
        seeds=[0, 1, 2],
        sweep=None,
        datasets=[{"label": "synth", "synth_meta": str(meta)}],
        methods=[
            {"label": "erm", "method": {"name": "erm"}},
            {"label": "fin", "method": {"name": "fin"}},
            {"label": "oct only", "method": {"name": "unimodal", "modality": "oct"}},
        ],
    )
    cfg, out_dir = bm.load_benchmark(path)
    bm.write_manifest(cfg, out_dir)
    strength = {"erm": 1.0, "fin": 1.3, "oct only": 0.6}
    for run in bm.plan(cfg, out_dir):
        if run.run_id in skip:
            continue
        make_run_dir(
            run.run_dir,
            method=run.method,
            seed=run.seed,
            signal=strength[run.label],
            minority_signal=strength[run.label] * 0.6,
            uses_attribute_at_test=run.label == "fin",
            time_per_step_s=0.01 * (1 + run.seed),
        )
    return cfg, out_dir


def test_tables_match_the_runs_metrics(tmp_path, make_run_dir):
    _, out_dir = populate(tmp_path, make_run_dir)
    collection = bm.collect(out_dir)
    assert len(collection.finished) == 9 and not collection.missing
    (table,) = bt.build_tables(collection, n_boot=50)
    assert (table.dataset, table.attribute) == ("synth", "race")
    assert table.groups == ["white", "black", "asian"]
    rows = {r.label: r for r in table.rows}
    by_seed = {
        (r.run.label, r.run.seed): json.loads((r.run.run_dir / "metrics.json").read_text())
        for r in collection.finished
    }
    for label in ("erm", "fin"):
        aucs = [by_seed[(label, s)]["test"]["overall"]["auc"] for s in range(3)]
        assert rows[label].mean["auc"] == pytest.approx(np.mean(aucs))
        assert rows[label].std["auc"] == pytest.approx(np.std(aucs, ddof=1))
        worst = [
            min(g["auc"] for g in by_seed[(label, s)]["test"]["attributes"]["race"]["groups"])
            for s in range(3)
        ]
        assert rows[label].mean["worst_auc"] == pytest.approx(np.mean(worst))
    assert rows["erm"].mean["time_per_step_s"] == pytest.approx(0.02)
    # paired differences: fin vs erm only (the unimodal row is a reference line)
    assert table.reference == "erm" and table.comparisons == 3
    assert set(rows["fin"].paired) == {"auc", "es_auc", "worst_auc"}
    assert not rows["oct only"].paired and rows["oct only"].reference_only
    hand = [
        by_seed[("fin", s)]["test"]["attributes"]["race"]["es_auc"]
        - by_seed[("erm", s)]["test"]["attributes"]["race"]["es_auc"]
        for s in range(3)
    ]
    assert rows["fin"].paired["es_auc"].mean == pytest.approx(np.mean(hand))
    # pooled bootstrap CI: a real interval around the pooled estimate
    lo, hi = rows["erm"].ci["auc"]
    assert 0.5 < lo < hi < 1.0
    assert set(rows["erm"].ci) >= {"es_auc", "dpd", "deodds", "auc/white", "auc/asian"}
    assert table.best_achievable == {
        "best achievable (all modalities)": {
            "auc/white": 0.97,
            "auc/black": 0.82,
            "auc/asian": 0.81,
            "auc": 0.95,
        },
        "best achievable (A alone)": {"auc/white": 0.96, "auc/black": 0.63, "auc/asian": 0.62},
        "best achievable (B alone)": {"auc/white": 0.80, "auc/black": 0.80, "auc/asian": 0.76},
    }
    assert rows["fin"].uses_attribute_at_test and not rows["erm"].uses_attribute_at_test


def test_markdown_csv_json_outputs(tmp_path, make_run_dir):
    _, out_dir = populate(tmp_path, make_run_dir)
    collection = bm.collect(out_dir)
    tables = bt.build_tables(collection, n_boot=20)
    paths = br.write_results(tables, collection)
    md = paths["markdown"].read_text()
    assert "## synth / race" in md
    assert f"fin {bt.ATTRIBUTE_MARK}" in md and "uses the sensitive attribute at test time" in md
    assert "oct only (reference)" in md
    assert "| best achievable (all modalities) | 0.950 |  |  | 0.970 | 0.820 | 0.810 |" in md
    assert "| best achievable (B alone) |  |  |  | 0.800 | 0.800 | 0.760 |" in md
    assert "### paired difference to erm (by seed)" in md
    assert "3 comparisons, intervals not adjusted for multiplicity" in md
    assert "| AUC white | AUC black | AUC asian |" in md.replace(" ± ", "")
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["label"] for r in rows] == ["erm", "fin", "oct only"]
    assert float(rows[1]["d_auc_n"]) == 3 and rows[0]["d_auc_mean"] == ""
    data = json.loads(paths["json"].read_text())
    assert data["runs"]["finished"] == 9
    fin = data["tables"][0]["rows"][1]
    assert fin["paired"]["auc"]["n"] == 3 and len(fin["per_seed"]) == 3


def test_collect_reports_missing_and_failed_runs(tmp_path, make_run_dir):
    cfg, out_dir = populate(tmp_path, make_run_dir, skip=("synth/race/fin/seed2",))
    # a failed attempt as the runner leaves it: status + stderr under logs/
    run = next(r for r in bm.plan(cfg, out_dir) if r.run_id == "synth/race/fin/seed2")
    _, err, status = bm.log_paths(out_dir, run)
    err.parent.mkdir(parents=True, exist_ok=True)
    err.write_text("Traceback...\nRuntimeError: boom\n")
    status.write_text(json.dumps({"status": "failed", "returncode": 1}))
    collection = bm.collect(out_dir)
    assert [r.run_id for r in collection.missing] == ["synth/race/fin/seed2"]
    assert collection.failed[0][1].endswith("RuntimeError: boom")
    (table,) = bt.build_tables(collection, n_boot=0)
    fin = next(r for r in table.rows if r.label == "fin")
    assert fin.seeds == [0, 1] and fin.paired["auc"].n == 2 and fin.ci == {}
    md = br.to_markdown([table], collection)
    assert "8 of 9 runs finished; 1 missing (1 failed)" in md and "RuntimeError: boom" in md


def test_collect_needs_a_benchmark_dir(tmp_path):
    with pytest.raises(UserError, match="not a benchmark directory"):
        bm.collect(tmp_path)


def test_seed_subsets_parse_and_reject_unknown_seeds():
    assert bm.parse_seeds("10-12", range(20)) == [10, 11, 12]
    assert bm.parse_seeds("0-1,5", [5, 1, 0, 9]) == [5, 1, 0]  # the config's order
    with pytest.raises(UserError, match=r"seeds \[20\] are not in the benchmark's seeds"):
        bm.parse_seeds("19-20", range(20))
    with pytest.raises(UserError, match=r"expected e\.g\. 10-19"):
        bm.parse_seeds("ten", range(20))


def test_collect_keeps_only_the_requested_seeds(tmp_path):
    cfg, out_dir = bm.load_benchmark(write_config(tmp_path))
    collection = bm.collect(out_dir, cfg, seeds="1")
    assert {run.seed for run in collection.runs} == {1}
    assert len(collection.runs) == 4  # erm, mf x 2 tau, erm-es
    assert collection.config.name == "unit, seeds 1"


def test_modality_block_shows_head_auc_lr_factor_and_update_relative_to_reference(
    tmp_path, make_run_dir
):
    _, out_dir = populate(tmp_path, make_run_dir)
    for record in bm.collect(out_dir).finished:
        run_dir, label = record.run.run_dir, record.run.label
        metrics = json.loads((run_dir / "metrics.json").read_text())
        head_b = {"erm": 0.60, "fin": 0.70, "oct only": 0.65}[label] + 0.01 * record.run.seed
        metrics["aux_auc"] = {"test": {"A": 0.9, "B": head_b}}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        steps = [
            {"kind": "step", "step": s, "update_norm/A": 0.1, "update_norm/B": 0.1 * (s + 1)}
            for s in range(2)
        ]  # B's mean update norm: 0.15
        if label == "fin":  # a method that sets step-size factors and moves B twice as far
            for rec in steps:
                rec.update({"lr_factor/A": 0.5, "lr_factor/B": 1.5, "update_norm/B": 0.3})
        log = [*steps, {"kind": "epoch", "epoch": 0, "update_norm/B": 99.0}]  # epochs ignored
        (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (table,) = bt.build_tables(bm.collect(out_dir), n_boot=0)
    _, header, rows, notes = next(b for b in br.table_blocks(table) if "modalities" in b[0])
    assert header == ["method", *(f"{m} {c}" for m in "AB" for c in ("head AUC", "lr factor", "update"))]  # fmt: skip
    by_name = {row[0]: row for row in rows}
    assert by_name["erm"] == ["erm", "0.900 ± 0.000", "-", "1.00x", "0.610 ± 0.010", "-", "1.00x"]
    fin = by_name["fin †"]
    assert fin[2:4] == ["0.50", "1.00x"] and fin[5:7] == ["1.50", "2.00x"]
    assert fin[4] == "0.710 ± 0.010"
    assert "relative to erm" in notes[0]


def test_modality_block_compares_the_reference_heads_with_single_modality_rows(
    tmp_path, make_run_dir
):
    """A single-modality row (one finite head) is set against the reference row's head of that
    modality: B's joint head 0.60 against 0.65 alone reads -0.050; A has no such row."""
    _, out_dir = populate(tmp_path, make_run_dir)
    for record in bm.collect(out_dir).finished:
        run_dir, label = record.run.run_dir, record.run.label
        metrics = json.loads((run_dir / "metrics.json").read_text())
        heads = {"erm": {"A": 0.9, "B": 0.60}, "fin": {"A": 0.9, "B": 0.7}, "oct only": {"B": 0.65}}
        metrics["aux_auc"] = {"test": heads[label]}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (table,) = bt.build_tables(bm.collect(out_dir), n_boot=0)
    _, _, _, notes = next(b for b in br.table_blocks(table) if "modalities" in b[0])
    assert "erm's heads against the single-modality models: B 0.600 against oct only 0.650 (-0.050)." in notes[1]  # fmt: skip
    assert "A 0.900" not in notes[1]  # no single-modality row for A
    # against another reference, that row's heads
    (table,) = bt.build_tables(bm.collect(out_dir, reference="fin"), n_boot=0)
    _, _, _, notes = next(b for b in br.table_blocks(table) if "modalities" in b[0])
    assert "fin's heads against the single-modality models: B 0.700 against oct only 0.650 (+0.050)" in notes[1]  # fmt: skip


def test_more_parallel_runs_than_cores_is_a_warning():
    assert bm.oversubscribed(2, 1, cores=2) is None
    assert bm.oversubscribed(0, 8, cores=2) is None  # nothing left to run
    warning = bm.oversubscribed(20, 1, cores=16)
    assert warning.startswith("WARNING: 20 runs x 1 threads exceed the 16 CPU cores")
    assert warning.endswith("--workers 16 avoids that")
    assert bm.oversubscribed(2, 4, cores=4).endswith("--workers 1 avoids that")


def test_collect_can_pair_with_another_entry(tmp_path, make_run_dir):
    _, out_dir = populate(tmp_path, make_run_dir)
    (table,) = bt.build_tables(bm.collect(out_dir, reference="fin"), n_boot=0)
    rows = {r.label: r for r in table.rows}
    assert table.reference == "fin" and rows["erm"].paired and not rows["fin"].paired
    assert rows["erm"].paired["auc"].mean == pytest.approx(
        np.mean([rows["erm"].per_seed[s]["auc"] - rows["fin"].per_seed[s]["auc"] for s in range(3)])
    )
    with pytest.raises(UserError, match="--reference 'nope': not an entry label"):
        bm.collect(out_dir, reference="nope")


def test_collect_pools_a_replication_run_in_another_directory(tmp_path, make_run_dir):
    """Seeds 0-2 in one benchmark directory, 3-4 of two of its rows in another (a
    replication): pooled, the paired differences use all 5 seeds of the shared rows."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    _, out_dir = populate(tmp_path / "first", make_run_dir)
    meta = tmp_path / "first" / "synth_meta.json"
    path = write_config(
        tmp_path / "second",
        name="unit replication",
        output=str(tmp_path / "second" / "bench"),
        seeds=[3, 4],
        sweep=None,
        datasets=[{"label": "synth", "synth_meta": str(meta)}],
        methods=[
            {"label": "erm", "method": {"name": "erm"}},
            {"label": "fin", "method": {"name": "fin"}},
        ],
    )
    cfg2, out2 = bm.load_benchmark(path)
    bm.write_manifest(cfg2, out2)
    for run in bm.plan(cfg2, out2):
        make_run_dir(
            run.run_dir, method=run.method, seed=run.seed, signal=1.0 + 0.3 * (run.label == "fin")
        )
    first, second = bm.collect(out_dir), bm.collect(out2)
    merged = bm.merge_collections([first, second])
    assert merged.config.seeds == [0, 1, 2, 3, 4] and merged.out_dir == out_dir
    assert merged.config.name == "unit + unit replication"
    (table,) = bt.build_tables(merged, n_boot=0)
    rows = {r.label: r for r in table.rows}
    assert rows["fin"].paired["auc"].n == 5 and rows["oct only"].seeds == [0, 1, 2]
    by_seed = {
        (r.run.label, r.run.seed): json.loads((r.run.run_dir / "metrics.json").read_text())
        for r in first.finished + second.finished
    }
    auc = lambda label, s: by_seed[(label, s)]["test"]["overall"]["auc"]  # noqa: E731
    hand = [auc("fin", s) - auc("erm", s) for s in range(5)]
    assert rows["fin"].paired["auc"].mean == pytest.approx(np.mean(hand))
    # --seeds and --reference act on the pooled seeds and rows
    only = bm.merge_collections([first, second], seeds="2-3", reference="fin")
    assert only.config.seeds == [2, 3] and {r.run.seed for r in only.finished} == {2, 3}
    assert only.config.reference == "fin"
    from multifair.cli import main

    assert main(["benchmark", "collect", str(out_dir), "--with", str(out2), "--no-report"]) == 0
    pooled_md = (out_dir / "results" / "with_unit_replication" / "results.md").read_text()
    assert "unit + unit replication" in pooled_md and "| fin" in pooled_md
    with pytest.raises(UserError, match="disjoint seeds"):
        bm.merge_collections([first, first])
    with pytest.raises(UserError, match="--reference 'nope'"):
        bm.merge_collections([first, second], reference="nope")


def test_pooling_keeps_the_first_directorys_datasets_and_names_the_rest(tmp_path, make_run_dir):
    """A second directory with the shared dataset plus another one: the pooled tables cover the
    first directory's datasets, the other one is named as left out; no shared dataset, or other
    attributes, are errors."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    _, out_dir = populate(tmp_path / "first", make_run_dir)
    meta = tmp_path / "first" / "synth_meta.json"

    def second(name, datasets, attributes=("race",)):
        path = write_config(
            tmp_path / "second", name=name, output=str(tmp_path / "second" / name),
            seeds=[3, 4], sweep=None, attributes=list(attributes), datasets=datasets,
            methods=[{"label": "erm", "method": {"name": "erm"}}, {"label": "fin", "method": {"name": "fin"}}],
        )  # fmt: skip
        cfg2, out2 = bm.load_benchmark(path)
        bm.write_manifest(cfg2, out2)
        for run in bm.plan(cfg2, out2):
            make_run_dir(run.run_dir, method=run.method, seed=run.seed, attribute=run.attribute)
        return bm.collect(out2)

    both = second("both", [{"label": "synth", "synth_meta": str(meta)}, {"label": "other", "synth_meta": str(meta)}])  # fmt: skip
    first = bm.collect(out_dir)
    merged = bm.merge_collections([first, both])
    assert {r.run.dataset for r in merged.finished} == {"synth"}
    (table,) = bt.build_tables(merged, n_boot=0)
    assert {r.label: r for r in table.rows}["fin"].paired["auc"].n == 5
    assert bm.left_out_datasets([first, both]) == {both.out_dir: ["other"]}
    with pytest.raises(UserError, match="no dataset label in common"):
        bm.merge_collections([first, second("none", [{"label": "else", "synth_meta": str(meta)}])])
    with pytest.raises(UserError, match="attributes"):
        bm.merge_collections([first, second("sex", [{"label": "synth", "synth_meta": str(meta)}], ("sex",))])  # fmt: skip


SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "benchmarks"


@pytest.mark.parametrize(
    "name", sorted(p.name for p in SHIPPED.glob("*.yaml") if "recipe" not in p.name)
)
def test_every_shipped_benchmark_config_loads_and_plans(name):
    cfg, out_dir = bm.load_benchmark(SHIPPED / name)  # validated: keys, base file, labels
    runs = bm.plan(cfg, out_dir)
    assert {r.label for r in runs} == {m.label for m in cfg.methods}
    assert {r.seed for r in runs} == set(cfg.seeds)
    assert cfg.reference in {m.label for m in cfg.methods}


def test_resampled_synthetic_dataset_draws_one_data_set_per_seed(tmp_path):
    synth = {"flavour": "table", "out": "gen", "knobs": {"n": 300}, "resample": True}
    path = write_config(
        tmp_path, base=None, sweep=None, datasets=[{"label": "synth", "synth": synth}]
    )
    cfg, out_dir = bm.load_benchmark(path)
    bm.prepare_data(cfg, echo=lambda _: None)
    gen = tmp_path / "gen"
    metas = [gen / f"seed{s}" / "synth_meta.json" for s in (0, 1)]
    assert [json.loads(m.read_text())["knobs"]["seed"] for m in metas] == [0, 1]
    tables = [(gen / f"seed{s}" / "table.csv").read_text() for s in (0, 1)]
    assert tables[0] != tables[1]  # two draws, not one copied
    assert not (gen / "synth_meta.json").exists()
    bm.write_manifest(cfg, out_dir)
    for run in bm.plan(cfg, out_dir):  # each run reads the draw of its own seed
        own = (gen / f"seed{run.seed}" / "table.csv").resolve()
        assert run.overrides["data.path"] == str(own)
        assert parse_overrides(run.command()[5:])["data"]["path"] == str(own)
    erm = yaml.safe_load((out_dir / "configs/synth/erm.yaml").read_text())
    assert erm["data"]["path"] == str((gen / "seed0" / "table.csv").resolve())
    # the reference lines: the mean over the draws, key by key
    best = bt.mean_synth_meta(metas, "race")
    each = [bt.read_synth_meta(m, "race") for m in metas]
    assert each[0] != each[1]
    for name, row in best.items():
        for key, value in row.items():
            assert value == pytest.approx((each[0][name][key] + each[1][name][key]) / 2)
    assert bt.mean_synth_meta([tmp_path / "absent.json"], "race") is None
    # the generator's seed is the run's: a fixed one alongside is a contradiction
    bad = {**synth, "knobs": {"n": 300, "seed": 4}}
    with pytest.raises(UserError, match=r"remove `knobs\.seed`"):
        bm.load_benchmark(
            write_config(tmp_path, base=None, sweep=None, datasets=[{"label": "s", "synth": bad}])
        )


def test_selection_cell_names_a_burn_in():
    assert bt.selection_label({"select_by": "es_auc", "select_from": 4}) == "es_auc from epoch 4"
    assert bt.selection_label({"select_by": "auc", "select_from": 0}) == "auc"
    assert bt.selection_label({}) == "auc"  # metrics.json of runs before these keys existed


def test_stacking_block_shows_each_groups_mean_fitted_weights(tmp_path, make_run_dir):
    """Runs with `group_fusion: stacking` store their fit in metrics.json `posthoc`: the table
    gets one row per (method, group) with the mean weights over the seeds that fitted it."""
    _, out_dir = populate(tmp_path, make_run_dir)
    for record in bm.collect(out_dir).finished:
        if record.run.label != "fin":
            continue
        run_dir, seed = record.run.run_dir, record.run.seed
        metrics = json.loads((run_dir / "metrics.json").read_text())
        codes = {g["name"]: g["code"] for g in metrics["test"]["attributes"]["race"]["groups"]}
        metrics["posthoc"] = {
            f"stacking/{codes['white']}": {"fused": 1.0 + seed, "A": 0.5, "B": 0.1, "bias": 0.0},
            f"stacking/{codes['asian']}": (
                None if seed == 2 else {"fused": 0.5, "A": -0.2 * (seed + 1), "B": 0.4, "bias": 0.1}
            ),
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (table,) = bt.build_tables(bm.collect(out_dir), n_boot=0)
    _, header, rows, notes = next(b for b in br.table_blocks(table) if "stacking" in b[0])
    assert header == ["method", "group", "fused", "A", "B", "bias", "fitted"]
    by_group = {row[1]: row for row in rows}
    assert set(by_group) == {"white", "asian"} and all(r[0] == "fin †" for r in rows)
    assert by_group["white"][2:] == ["2.00 ± 1.00", "0.50 ± 0.00", "0.10 ± 0.00", "0.00 ± 0.00", "3/3"]  # fmt: skip
    assert by_group["asian"][3] == "-0.30 ± 0.14" and by_group["asian"][-1] == "2/3"
    assert "fitted after selection on validation" in notes[0]
    # no stacking run, no block
    (tmp_path / "p").mkdir()
    (plain,) = bt.build_tables(bm.collect(populate(tmp_path / "p", make_run_dir)[1]), n_boot=0)
    assert not any("stacking" in b[0] for b in br.table_blocks(plain))


def test_attribute_mark_is_added_once():
    from multifair.evaluation.benchmark_report import _row_name
    from multifair.evaluation.benchmark_tables import Row

    def row(label: str, aware: bool) -> Row:
        return Row(label, label, "x", None, None, [0], {}, {}, {}, {}, "auc", aware, False)

    assert _row_name(row("stacking", True)) == "stacking †"
    assert _row_name(row("stacking †", True)) == "stacking †"
    assert _row_name(row("erm", False)) == "erm"
