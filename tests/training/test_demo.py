"""`multifair demo` end to end on a smaller generated dataset, and its embedded settings
equal configs/demo.yaml."""

from __future__ import annotations

import json
from pathlib import Path

from multifair.cli import main
from multifair.config import load_yaml
from multifair.training.demo import DEMO_CONFIG, DEMO_KNOBS, ensure_data

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_embedded_demo_settings_are_configs_demo_yaml():
    shipped = load_yaml(CONFIGS / "demo.yaml")
    shipped["data"].pop("root")
    embedded = json.loads(json.dumps(DEMO_CONFIG))
    embedded["data"].pop("root")
    assert shipped == embedded


def test_demo_trains_both_methods_and_prints_them_side_by_side(tmp_path, capsys):
    """Through `multifair.cli.main`, on a smaller generated FairVision-format dataset."""
    knobs = {**DEMO_KNOBS, "n": 240}
    args = ["demo", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
            "--subjects", "240", "train.epochs=1", "train.progress=false", "output.n_boot=20"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    table = out[out.index("test split") :]
    metrics = {m: json.loads((tmp_path / "runs" / m / "metrics.json").read_text()) for m in ("erm", "multifair")}  # fmt: skip
    header = table.splitlines()[0].split()
    assert header[-4:] == ["erm", "multifair", "best", "possible"]
    auc_row = next(line for line in table.splitlines() if line.strip().startswith("AUC "))
    values = auc_row.split()[1:3]
    assert values == [f"{metrics[m]['test']['overall']['auc']:.3f}" for m in ("erm", "multifair")]
    for label in ("ES-AUC (race)", "AUC White", "AUC Black", "AUC Asian", "DPD (race)", "DEOdds (race)", "oct head alone"):  # fmt: skip
        assert label in table, label
    # the data is generated once: a second demo reuses it
    meta = tmp_path / "cache" / "demo-fairvision" / "synth_meta.json"
    before = meta.stat().st_mtime_ns
    ensure_data(tmp_path / "cache", knobs)
    assert meta.stat().st_mtime_ns == before and "generating" not in capsys.readouterr().out
