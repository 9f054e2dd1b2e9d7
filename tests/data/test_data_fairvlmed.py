"""FairVLMed trees: fundus + note, note from the npz or the CSVs, the released fallbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datahelpers import make_tree, meta_by_id

from multifair.data import DataConfig, build_data, make_loader
from multifair.data.fairvlmed import NO_NOTE, SHORT_NOTE, clean_note


def _expected_note(raw: str) -> str:
    """Independent restatement of the released rules."""
    text = raw.strip()
    if text == "" or text.lower() == "nan":
        return "no clinical notes available"
    text = text.lower()
    return "no significant clinical findings reported" if len(text) < 10 else text


def test_released_note_fallbacks():
    assert clean_note(None) == NO_NOTE
    assert clean_note("  ") == NO_NOTE
    assert clean_note("nan") == NO_NOTE
    assert clean_note("n/a") == SHORT_NOTE
    assert clean_note("IOP Elevated Today") == "iop elevated today"
    assert clean_note("IOP Elevated Today", lowercase=False) == "IOP Elevated Today"


@pytest.mark.parametrize("test_name", ["Test", "Testing", "test"])
def test_reads_back_with_every_test_spelling(tmp_path: Path, test_name: str):
    meta = make_tree(
        tmp_path,
        "fairvlmed",
        test_name=test_name,
        race_codes="legacy",
        seed=1,
        fundus_dtype="float32",
        empty_note_rate=0.2,
    )
    bundle = build_data(DataConfig(kind="fairvlmed", root=tmp_path, image_size=16, num_workers=0))
    truth = meta_by_id(meta)
    assert list(bundle.modalities) == ["fundus", "note"]
    assert bundle.modalities["note"].kind == "text"
    for split, ds in bundle.datasets.items():
        assert sorted(ds.sample_ids) == sorted(s for s, m in truth.items() if m["split"] == split)
        for i in range(len(ds)):
            sample = ds[i]
            assert sample["label"] == truth[sample["sample_id"]]["label"]
            assert sample["attributes"]["race"] == truth[sample["sample_id"]]["race"]
            with np.load(ds.records.paths[i], allow_pickle=False) as z:
                assert sample["note"] == _expected_note(str(z["note"]))
                assert sample["attributes"]["gender"] == int(z["gender"])
    ages = bundle.metadata("test")["age"]  # FairVLMed keeps age in the npz
    assert ages.notna().all()


def test_notes_from_csv_and_summaries(fairvlmed_tree, tmp_path: Path):
    root, _ = fairvlmed_tree
    base = DataConfig(kind="fairvlmed", root=root, image_size=16, modalities=["note"])
    from_npz = build_data(base, ["train"]).datasets["train"]
    from_csv = build_data(base.model_copy(update={"note_from": "csv"}), ["train"]).datasets["train"]
    assert [from_npz[i]["note"] for i in range(len(from_npz))] == [
        from_csv[i]["note"] for i in range(len(from_csv))
    ]
    summary = build_data(
        DataConfig(kind="fairvlmed", root=root, note="summary", image_size=16), ["train"]
    )
    assert summary.config.note_from == "csv"
    table = pd.read_csv(root / "gpt-4_summarized_notes.csv", keep_default_na=False)
    by_id = {f[:-4]: s for f, s in zip(table["filename"], table["summary"])}
    ds = summary.datasets["train"]
    for i in range(len(ds)):
        assert ds[i]["note"] == _expected_note(by_id[ds[i]["sample_id"]])
        assert len(ds[i]["note"]) <= 180
    # the other spelling of the summary file, under ReadMe/
    other = tmp_path / "copy"
    shutil.copytree(root, other)
    (other / "ReadMe").mkdir()
    (other / "gpt-4_summarized_notes.csv").rename(other / "ReadMe" / "gpt4_summarized_notes.csv")
    (other / "data_summary.csv").unlink()
    again = build_data(
        DataConfig(kind="fairvlmed", root=other, note="summary", image_size=16), ["train"]
    )
    assert again.datasets["train"][0]["note"] == ds[0]["note"]


def test_text_batches_are_lists(fairvlmed_tree):
    root, _ = fairvlmed_tree
    bundle = build_data(
        DataConfig(kind="fairvlmed", root=root, image_size=16, num_workers=0), ["val"]
    )
    batch = next(iter(make_loader(bundle, "val", batch_size=4)))
    assert isinstance(batch["note"], list) and all(isinstance(t, str) for t in batch["note"])
    assert batch["fundus"].dtype == torch.uint8 and batch["fundus"].shape == (4, 1, 16, 16)
    moved = bundle.to_device(batch, "cpu", train=True)
    assert moved["note"] == batch["note"] and moved["fundus"].shape == (4, 3, 16, 16)
