"""FairVision trees in every layout / spelling / dtype variant, read back through the loader.

Oracle: the generator's synth_meta (labels, race per sample id) and the raw npz arrays (at
the native size the loader must return the stored pixels; OCT slices at linspace(0, D-1, K)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datahelpers import make_tree, meta_by_id

from multifair.data import DataConfig, build_data, make_loader
from multifair.data.formats import GROUP_NAMES


def _check_against_npz(bundle, meta, k: int = 3) -> None:
    truth = meta_by_id(meta)
    for split, ds in bundle.datasets.items():
        expected = sorted(s["sample_id"] for s in meta["samples"] if s["split"] == split)
        assert sorted(ds.sample_ids) == expected
        for i in range(min(k, len(ds))):
            sample = ds[i]
            sid = sample["sample_id"]
            assert sample["label"] == truth[sid]["label"]
            assert sample["attributes"]["race"] == truth[sid]["race"]
            assert sample["group"] == truth[sid]["race"]
            with np.load(ds.records.paths[i], allow_pickle=False) as z:
                fundus, volume = z["slo_fundus"], z["oct_bscans"]
            assert sample["fundus"].dtype == torch.uint8 and sample["fundus"].shape == (1, 16, 16)
            np.testing.assert_array_equal(
                sample["fundus"][0].numpy(), np.clip(np.round(fundus), 0, 255)
            )
            idx = [int(x) for x in np.linspace(0, volume.shape[0] - 1, bundle.config.oct_slices)]
            np.testing.assert_array_equal(sample["oct"].numpy(), volume[idx])


@pytest.mark.parametrize(
    ("layout", "test_name", "fundus_dtype", "race_codes", "compress"),
    [
        ("readme", "Test", "uint8", "int", False),
        ("readme", "Testing", "float32", "legacy", True),
        ("renamed", "test", "float64", "int", False),
        ("renamed", "Test", "uint8", "legacy", False),
        ("dataset", "Test", "float32", "int", True),
        ("dataset", "Testing", "uint8", "legacy", False),
    ],
)
def test_every_layout_and_dtype_reads_back(
    tmp_path: Path, layout, test_name, fundus_dtype, race_codes, compress
):
    meta = make_tree(
        tmp_path,
        layout=layout,
        test_name=test_name,
        fundus_dtype=fundus_dtype,
        race_codes=race_codes,
        compress=compress,
        csv_bom=compress,
        seed=3,
    )
    cfg = DataConfig(kind="fairvision", root=tmp_path, image_size=16, oct_slices=4, num_workers=0)
    bundle = build_data(cfg)
    assert bundle.source == "npz"
    _check_against_npz(bundle, meta)
    # age comes from the CSV (BOM or not), in whichever folder the layout puts it
    truth = {s["sample_id"] for s in meta["samples"]}
    ages = bundle.metadata("train")["age"]
    assert ages.notna().all() and set(bundle.metadata("train")["sample_id"]) <= truth


def test_root_may_point_at_the_disease_folder(fairvision_tree):
    root, meta = fairvision_tree
    bundle = build_data(
        DataConfig(kind="fairvision", root=root / "Glaucoma", image_size=16, oct_slices=5)
    )
    _check_against_npz(bundle, meta, k=1)


def test_attribute_vocabulary_and_keys(fairvision_tree):
    root, _ = fairvision_tree
    bundle = build_data(DataConfig(kind="fairvision", root=root, attribute="gender", image_size=16))
    # `male` (FairVision) is read as the vocabulary's `gender`, `hispanic` as `ethnicity`
    assert bundle.attributes == ["race", "gender", "ethnicity", "language", "maritalstatus"]
    assert bundle.train_attribute == "gender" and bundle.n_groups == 2
    assert bundle.group_names["race"] == GROUP_NAMES["race"]
    with np.load(bundle.datasets["test"].records.paths[0]) as z:
        assert bundle.datasets["test"][0]["group"] == int(z["male"])
        assert bundle.datasets["test"][0]["attributes"]["ethnicity"] == int(z["hispanic"])


def test_modality_specs_and_resize(fairvision_tree):
    root, _ = fairvision_tree
    bundle = build_data(
        DataConfig(kind="fairvision", root=root, image_size=24, oct_slices=3), ["val"]
    )
    spec = bundle.modalities
    assert spec["fundus"].kind == "image" and spec["fundus"].shape == (3, 24, 24)
    assert spec["fundus"].stored_shape == (1, 24, 24)
    assert spec["oct"].kind == "volume" and spec["oct"].shape == (3, 24, 24)
    sample = bundle.datasets["val"][0]
    assert sample["fundus"].shape == (1, 24, 24) and sample["oct"].shape == (3, 24, 24)
    # bilinear upsizing keeps the mean brightness
    with np.load(bundle.datasets["val"].records.paths[0]) as z:
        assert abs(sample["fundus"].float().mean().item() - float(z["slo_fundus"].mean())) < 2.0
    only = build_data(
        DataConfig(kind="fairvision", root=root, modalities=["oct"], image_size=16), ["val"]
    )
    assert list(only.modalities) == ["oct"] and "fundus" not in only.datasets["val"][0]


def test_unknown_policy(tmp_path: Path):
    make_tree(tmp_path, race_unknown_rate=0.3, seed=5)
    n_unknown = {s: 0 for s in ("train", "val", "test")}
    cfg = DataConfig(kind="fairvision", root=tmp_path, image_size=16)
    keep = build_data(cfg)
    for split in n_unknown:
        n_unknown[split] = int((keep.groups(split) == -1).sum())
    assert sum(n_unknown.values()) > 0
    drop = build_data(cfg.model_copy(update={"unknown": "drop"}))
    for split in n_unknown:
        assert len(drop.datasets[split]) == len(keep.datasets[split]) - n_unknown[split]
        assert (drop.groups(split) >= 0).all()
    with pytest.raises(Exception, match="race is -1"):
        build_data(cfg.model_copy(update={"unknown": "error"}))


def test_degenerate_group_is_single_class(tmp_path: Path):
    make_tree(tmp_path, degenerate="gender=1", seed=2)
    bundle = build_data(
        DataConfig(kind="fairvision", root=tmp_path, attribute="gender", image_size=16)
    )
    for split in bundle.datasets:
        y, g = bundle.labels(split), bundle.groups(split)
        assert (y[g == 1] == 0).all() and (g == 1).any()


def test_loader_batches_follow_the_contract(fairvision_tree):
    root, _ = fairvision_tree
    bundle = build_data(DataConfig(kind="fairvision", root=root, image_size=16, oct_slices=4))
    batch = next(iter(make_loader(bundle, "train", batch_size=5, num_workers=0)))
    assert batch["fundus"].dtype == torch.uint8 and batch["fundus"].shape == (5, 1, 16, 16)
    assert batch["oct"].dtype == torch.uint8 and batch["oct"].shape == (5, 4, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["group"].dtype == torch.int64
    assert set(batch["attributes"]) == set(bundle.attributes)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["sample_id"] == bundle.sample_ids("train")[:5]
    moved = bundle.to_device(batch, "cpu", train=False)
    assert moved["fundus"].shape == (5, 3, 16, 16) and moved["fundus"].dtype == torch.float32
    assert moved["oct"].shape == (5, 4, 16, 16) and moved["oct"].dtype == torch.float32
    torch.testing.assert_close(moved["group"], batch["group"])
