"""`multifair data synth | inspect | prepare` end to end through `multifair.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from multifair.cli import main
from multifair.data import DataConfig, build_data, load_data_config, make_loader

TINY = [
    "--n",
    "36",
    "--fundus-shape",
    "16,16",
    "--oct-shape",
    "4,16,16",
    "--split",
    "0.5,0.25,0.25",
]


def test_synth_inspect_prepare_end_to_end(tmp_path: Path, capsys):
    root = tmp_path / "fv"
    assert (
        main(
            [
                "data",
                "synth",
                "fairvision",
                str(root),
                *TINY,
                "--layout",
                "dataset",
                "--test-name",
                "Testing",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote 36 fairvision subjects" in out and "best test AUC from the latents" in out
    meta = json.loads((root / "synth_meta.json").read_text())

    report_path = tmp_path / "report.json"
    assert main(["data", "inspect", str(root), "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["kind"] == "fairvision" and report["problems"] == []
    for split in ("train", "val", "test"):
        truth = [s for s in meta["samples"] if s["split"] == split]
        entry = report["splits"][split]
        assert entry["files"] == entry["readable"] == len(truth)
        assert entry["positives"] == sum(s["label"] for s in truth)
        white = [s for s in truth if s["race"] == 2]
        assert entry["attributes"]["race"]["White"] == {
            "n": len(white),
            "positives": sum(s["label"] for s in white),
        }
    assert report["shapes"] == {"slo_fundus [16, 16] uint8": 36, "oct_bscans [4, 16, 16] uint8": 36}
    assert report["csv"]["label_disagrees_with_npz"] == 0 and report["csv"]["npz_without_row"] == 0
    assert "train: 18 files, 18 usable" in out and "problems: 0" in out

    cache = tmp_path / "cache"
    assert (
        main(
            [
                "data",
                "prepare",
                str(root),
                str(cache),
                "--image-size",
                "16",
                "--oct-slices",
                "3",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "train: 18 samples (18 written now, 0 bad)" in capsys.readouterr().out
    cfg = DataConfig(kind="fairvision", root=root, image_size=16, oct_slices=3, cache=str(cache))
    assert build_data(cfg).source == "cache"
    # again: nothing left to do (resumable / idempotent)
    assert (
        main(
            [
                "data",
                "prepare",
                str(root),
                str(cache),
                "--image-size",
                "16",
                "--oct-slices",
                "3",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "(0 written now, 0 bad)" in capsys.readouterr().out


def test_inspect_lists_every_problem(tmp_path: Path, capsys):
    root = tmp_path / "vlm"
    assert (
        main(["data", "synth", "fairvlmed", str(root), *TINY[:2], "--fundus-shape", "12,10"]) == 0
    )
    files = sorted((root / "Training").glob("data_*.npz"))
    files[0].write_bytes(b"garbage")
    with np.load(files[1]) as z:
        arrays = {k: z[k] for k in z.files if k != "note"}
    arrays["race"] = np.array(5)
    arrays["glaucoma"] = np.array(3)
    np.savez(files[1], **arrays)
    capsys.readouterr()
    assert main(["data", "inspect", str(root), "--deep"]) == 1
    out = capsys.readouterr().out
    assert "fairvlmed" in out and "problems: 4" in out
    assert f"{files[0]}: unreadable npz" in out
    assert f"{files[1]} key 'glaucoma': label 3 is outside {{0, 1}}" in out
    assert f"{files[1]} key 'race': 5 is not a race code" in out
    assert f"{files[1]} key 'note': missing key" in out


def test_table_synth_and_inspect_config(tmp_path: Path, capsys):
    out = tmp_path / "t"
    assert main(["data", "synth", "table", str(out), "--n", "300", "--scenario", "neutral"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out / "table.yaml")]) == 0
    text = capsys.readouterr().out
    assert (
        "a01: A, numeric" in text
        and "smoker: A, boolean" in text
        and "site: A, categorical" in text
    )
    cfg = load_data_config(out / "table.yaml")
    assert build_data(cfg).modalities["B"].shape[0] > 12
    assert main(["data", "prepare", str(out / "table.yaml")]) == 2  # no path column to cache
    diabetes = Path(__file__).resolve().parents[2] / "configs" / "data" / "diabetes.yaml"
    assert main(["data", "inspect", str(diabetes)]) == 0
    assert "sex 1" in capsys.readouterr().out


def test_distributed_sampler_shards_the_split(tmp_path: Path):
    main(["data", "synth", "table", str(tmp_path / "t"), "--n", "100"])
    bundle = build_data(load_data_config(tmp_path / "t" / "table.yaml"))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(
            bundle.datasets["train"], num_replicas=2, rank=rank, shuffle=True, seed=1
        )
        sampler.set_epoch(0)
        loader = make_loader(bundle, "train", batch_size=8, sampler=sampler, num_workers=0)
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(len(bundle.datasets["train"])))
