"""`attributes: [race*sex]` in a benchmark config: each run trains on the intersection and the
results hold one table per attribute, the intersection's included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from multifair.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_over_an_intersectional_attribute(tmp_path, capsys):
    cfg = {
        "name": "intersection",
        "base": str(REPO / "configs" / "benchmarks" / "synth_table_recipe.yaml"),
        "output": str(tmp_path / "bench"),
        "overrides": {"train": {"epochs": 1, "threads": 1}, "data": {"min_group_size": 10}},
        "datasets": [
            {"label": "synth", "synth": {"flavour": "table", "out": "gen", "knobs": {"n": 300}}}
        ],
        "attributes": ["race*sex", "race"],
        "seeds": [0],
        "methods": [{"label": "erm", "method": {"name": "erm"}}],
        "reference": "erm",
        "n_boot": 0,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", str(path), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "'data.attribute=race*sex'" in plan  # quoted for the shell
    assert main(["benchmark", str(path), "--no-report"]) == 0
    capsys.readouterr()
    # Markdown: the "|" in group names is escaped, so every row has the header's columns
    lines = (tmp_path / "bench/results/results.md").read_text().splitlines()
    header = lines.index(next(x for x in lines if x.startswith("| method | AUC") and "\\|" in x))
    columns = [len(re.findall(r"(?<!\\)\|", x)) for x in lines[header : header + 3]]
    assert columns == [columns[1]] * 3, lines[header : header + 3]
    out = tmp_path / "bench"
    run = yaml.safe_load((out / "runs/synth/race_sex/erm/seed0/config.yaml").read_text())
    assert run["data"]["attribute"] == "race*sex" and run["data"]["min_group_size"] == 10
    tables = json.loads((out / "results/results.json").read_text())["tables"]
    assert [t["attribute"] for t in tables] == ["race*sex", "race"]
    metrics = json.loads((out / "runs/synth/race_sex/erm/seed0/metrics.json").read_text())
    names = set(metrics["intersections"]["race*sex"]["names"].values())
    assert {g["name"] for g in metrics["test"]["attributes"]["race*sex"]["groups"]} <= names
