"""HTML reports: expected sections, embedded images, nothing fetched from a network."""

from __future__ import annotations

import base64
import re

import pytest
import yaml

from multifair.evaluation import benchmark as bm
from multifair.evaluation.report import write_report

IMG = re.compile(r'<img alt="figure" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def assert_self_contained(html: str) -> list[bytes]:
    """No network reference, no script, every image an embedded PNG; returns the PNGs."""
    assert not re.search(r"https?://", html)
    assert "<script" not in html and "<link" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    pngs = [base64.b64decode(m) for m in IMG.findall(html)]
    assert pngs and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    return pngs


def test_run_report_sections_images_and_diagnostics(tmp_path, make_run_dir, make_log):
    log = make_log(epochs=6, steps_per_epoch=10)
    for rec in log:  # gap above tau on every step: the gap diagnostic must fire
        if rec["kind"] == "step":
            rec["gap"] = 0.2
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, method="multifair", tau=0.04, log=log)
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    html = path.read_text()
    for section in ("Test metrics", "Per-group ROC curves", "Training", "Diagnostics"):
        assert f"<h2>{section}" in html
    # ROC, aux AUC, factors, gap vs tau, validation per epoch
    assert len(assert_self_contained(html)) == 5
    assert "group AUC gap stays above tau for most of training" in html
    assert "ES-AUC" in html and "white" in html
    # every table scrolls inside its own box, so a wide one does not widen the page
    assert html.count("<table>") == html.count('<div class="scroll"><table>') > 0


def test_run_report_says_when_no_signature_is_found(tmp_path, make_run_dir, make_log):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, log=make_log())
    html = write_report(run_dir, tmp_path / "elsewhere" / "r.html").read_text()
    assert "No known failure signature found" in html


def test_benchmark_report_has_tables_scatter_paired_sweep_and_rocs(
    tmp_path, make_run_dir, make_log
):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"method": {"name": "erm"}}))
    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "report-test",
                "base": "train.yaml",
                "output": str(tmp_path / "bench"),
                "attributes": ["race"],
                "seeds": [0, 1],
                "n_boot": 0,
                "methods": [
                    {"label": "erm", "method": {"name": "erm"}},
                    {"label": "mf", "method": {"name": "multifair"}},
                ],
                "sweep": [
                    {"key": "method.tau", "values": [0.02, 0.08], "methods": ["mf"]},
                    {"key": "method.delta", "values": [0.3, 0.6], "methods": ["mf"]},
                ],
            }
        )
    )
    cfg, out_dir = bm.load_benchmark(cfg_path)
    bm.write_manifest(cfg, out_dir)
    gap_log = make_log()
    for rec in gap_log:  # the multifair runs: batch gap above tau throughout
        if rec["kind"] == "step":
            rec["gap"] = 0.2
    for run in bm.plan(cfg, out_dir):
        make_run_dir(
            run.run_dir,
            method=run.method,
            seed=run.seed,
            signal=1 + (run.sweep_value or 0),
            log=gap_log if run.label == "mf" else make_log(),
        )
    html = write_report(out_dir).read_text()
    for section in (
        "<h2>data / race</h2>",
        "<h3>Fairness vs AUC</h3>",
        "<h3>Paired differences to erm</h3>",
        "<h3>Sweep</h3>",
        "<h3>Per-group ROC curves",
        "<h3>Training curves",
        "<h3>Diagnostics (every run)</h3>",
        "paired difference to erm (by seed)",
        "mf [tau=0.02]",
    ):
        assert section in html, section
    # scatter + paired + 2 sweeps + 5 ROC (erm, mf x 2 tau, mf x 2 delta) + 5 x 4 training
    assert len(assert_self_contained(html)) == 4 + 5 + 20
    assert "10 of 10 runs finished" in html and "mf [delta=0.6]" in html
    # one diagnostics box for the signature shared by the 8 multifair runs, then its runs
    assert html.count('class="finding"') == 1
    assert "<code>[gap_above_tau]</code> in 8 runs" in html
    assert "<td>data/race/mf__delta=0.6/seed1</td>" in html


def test_run_report_plots_group_weights_per_epoch_with_group_names(
    tmp_path, make_run_dir, make_log
):
    """`group_weights: validation` writes group_weight/<code> into each epoch record's method
    stats: the report adds one figure of them, with the codes named from metrics.json."""
    import json

    from multifair.evaluation.diagnostics import read_log
    from multifair.evaluation.report import _group_names, _method_epoch_series, training_figures

    log = make_log(epochs=4, steps_per_epoch=5)
    epochs = [rec for rec in log if rec["kind"] == "epoch"]
    for i, rec in enumerate(epochs):
        rec["method"] = {"group_weight/0": 0.8 - 0.05 * i, "group_weight/1": 1.5 + 0.1 * i}
    epochs[2]["method"]["group_weight/1"] = float("nan")  # skipped, not plotted as 0
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, log=log)
    series = _method_epoch_series(read_log(run_dir / "log.jsonl"), "group_weight/")
    assert sorted(series) == ["0", "1"]
    assert series["0"][1].tolist() == pytest.approx([0.8, 0.75, 0.7, 0.65])
    assert series["1"][0].tolist() == [0, 1, 3]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = _group_names(metrics, metrics["attribute"])
    assert names and set(names) >= {"0", "1"} and all(names.values())
    parsed = read_log(run_dir / "log.jsonl")
    plain = read_log(run_dir / "log.jsonl")
    plain.epochs = [{k: v for k, v in rec.items() if k != "method"} for rec in plain.epochs]
    assert len(training_figures(parsed, None)) == len(training_figures(plain, None)) + 1
    html = write_report(run_dir).read_text()
    assert len(assert_self_contained(html)) == len(training_figures(parsed, None)) + 1  # + ROC


def test_run_report_shows_the_group_stacking_fit_with_group_names(tmp_path, make_run_dir, make_log):
    """`group_fusion: stacking` stores its fit under metrics.json `posthoc`: the report shows
    one row per group, named, and says a group kept the shared model."""
    import json

    run_dir = tmp_path / "run"
    make_run_dir(run_dir, log=make_log())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["uses_attribute_at_test"] = True
    metrics["posthoc"] = {
        "stacking/0": {"fused": 0.55, "A": -0.23, "B": 0.41, "bias": 0.16},
        "stacking/1": None,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    names = {
        g["code"]: g["name"] for g in metrics["test"]["attributes"][metrics["attribute"]]["groups"]
    }
    html = write_report(run_dir).read_text()
    assert "Group-aware stacking" in html and "sensitive attribute at test time" in html
    assert (
        f"<td>{names[0]}</td><td>+0.550</td><td>-0.230</td><td>+0.410</td><td>+0.160</td>" in html
    )
    assert f"<td>{names[1]}</td><td>shared model</td>" in html
    assert "fitted on validation after selection" in html  # an older run: no stacking_data
    metrics["posthoc"]["stacking_data"] = "train+validation"
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    html = write_report(run_dir).read_text()
    assert "fitted on training + validation after selection" in html
    assert f"<td>{names[1]}</td><td>shared model</td>" in html
    del metrics["posthoc"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert "Group-aware stacking" not in write_report(run_dir).read_text()
