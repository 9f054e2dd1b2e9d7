"""Multi-class labels in the data layer: `data.classes` (list, mapping, presets), FairVision's
AMD `amd_condition` / DR `dr_subtype` strings, table label columns with K classes, and
errors that name an unknown value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from datahelpers import make_tree, meta_by_id

from multifair.config import validate
from multifair.data import build_data
from multifair.data.config import CLASS_PRESETS, DataConfig, make_class_spec
from multifair.errors import UserError


def test_class_spec_from_a_list_a_mapping_and_a_preset():
    spec = make_class_spec(["none", "Mild", 2])
    assert spec.names == ["none", "Mild", "2"]
    assert [spec.index(v) for v in ("none", " mild ", 2, 2.0, "2")] == [0, 1, 2, 2, 2]
    grouped = make_class_spec({"no": ["a", "b"], "yes": "c"})
    assert [grouped.index(v) for v in ("a", "b", "c")] == [0, 0, 1]
    amd = make_class_spec("fairvision_amd")
    assert amd.names == ["normal", "early", "intermediate", "late"]
    assert amd.index("wet.amd.inactive.scar") == 3
    assert amd.index("not.in.icd.table") == 0
    dr = make_class_spec("fairvision_dr")
    assert [dr.index(v) for v in ("no.dr.diagnosis", "moderate.npdr", "pdr")] == [
        0,
        1,
        2,
    ]
    with pytest.raises(ValueError, match=r"label 'severe' is not one of data.classes"):
        spec.index("severe")


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["only"], "at least two classes"),
        ({"a": ["x"], "b": ["x"]}, "is in both"),
        ("fairvision_glaucoma", "is not a preset"),
    ],
)
def test_bad_classes_fail_when_the_config_is_loaded(classes, message):
    raw = {"kind": "table", "path": "x.csv", "label": "y", "columns": {"A": {"columns": ["a"]}}}
    with pytest.raises(UserError, match=message):
        validate(DataConfig, {**raw, "classes": classes}, source="data")
    with pytest.raises(UserError, match="binary label"):
        validate(
            DataConfig,
            {**raw, "label": {"column": "y", "rule": "> 0"}, "classes": ["a", "b", "c"]},
            source="data",
        )


def test_fairvision_amd_and_dr_keys_default_to_their_presets(tmp_path):
    binary = DataConfig(kind="fairvision", root=tmp_path)
    assert binary.class_spec() is None  # glaucoma: binary exactly as before
    amd = DataConfig(kind="fairvision", root=tmp_path, label_key="amd_condition", disease="AMD")
    assert amd.class_spec().names == list(CLASS_PRESETS["fairvision_amd"])
    dr = DataConfig(kind="fairvision", root=tmp_path, label_key="dr_subtype", disease="DR")
    assert dr.class_spec().names == list(CLASS_PRESETS["fairvision_dr"])


@pytest.fixture(scope="module")
def amd_tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("amd") / "root"
    return root, make_tree(root, "fairvision", n_classes=4, n=48)


def test_fairvision_reads_amd_condition_strings_as_stages(amd_tree):
    root, meta = amd_tree
    npz = next((root / "Glaucoma" / "Training").glob("*.npz"))
    with np.load(npz) as z:
        assert "amd_condition" in z.files and "glaucoma" not in z.files
        raw = [v for values in CLASS_PRESETS["fairvision_amd"].values() for v in values]
        assert str(z["amd_condition"]) in raw
    cfg = DataConfig(kind="fairvision", root=root, label_key="amd_condition", image_size=16)
    bundle = build_data(cfg)
    assert bundle.classes == ["normal", "early", "intermediate", "late"]
    assert bundle.n_classes == 4
    truth = meta_by_id(meta)
    for split in ("train", "test"):
        labels = bundle.labels(split)
        assert labels.tolist() == [truth[s]["label"] for s in bundle.sample_ids(split)]
    assert set(np.concatenate([bundle.labels(s) for s in ("train", "val", "test")])) == {
        0,
        1,
        2,
        3,
    }
    assert bundle.datasets["train"][0]["label"] in range(4)


def test_a_label_outside_the_classes_names_file_key_and_value(amd_tree, tmp_path):
    root, _ = amd_tree
    cfg = DataConfig(
        kind="fairvision",
        root=root,
        label_key="amd_condition",
        classes={"normal": ["not.in.icd.table", "no.amd.diagnosis"], "early": ["early.dry"]},
        image_size=16,
        cache="off",
    )
    with pytest.raises(UserError, match=r"amd_condition.*is not one of data.classes"):
        build_data(cfg)


def test_table_label_column_with_k_classes(tmp_path):
    root = tmp_path / "t"
    meta = make_tree(root, "table", n_classes=3, n=90)
    frame = pd.read_csv(root / "table.csv")
    assert set(frame["stage"]) == {"none", "moderate", "severe"}
    cfg = DataConfig(**yaml.safe_load((root / "table.yaml").read_text())["data"])
    bundle = build_data(cfg)
    assert bundle.classes == ["none", "moderate", "severe"] and bundle.n_classes == 3
    truth = meta_by_id(meta)
    labels = bundle.labels("train")
    assert labels.tolist() == [truth[s]["label"] for s in bundle.sample_ids("train")]
    # the class order is the config's, not the sorted one
    reordered = cfg.model_copy(update={"classes": ["severe", "none", "moderate"]})
    assert (build_data(reordered).labels("train") == (labels + 1) % 3).all()
    # a value outside the list fails naming it
    frame.loc[3, "stage"] = "terminal"
    frame.to_csv(root / "table.csv", index=False)
    with pytest.raises(UserError, match=r"'terminal' is not one of data.classes"):
        build_data(cfg)


def test_inspect_reads_the_classes(amd_tree):
    from multifair.data.inspect import inspect_tree

    root, meta = amd_tree
    report = inspect_tree(root, "fairvision", label_key="amd_condition", progress=False)
    assert report["problems"] == []
    train = report["splits"]["train"]
    stages = [s["label"] for s in meta["samples"] if s["split"] == "train"]
    assert train["positives"] == sum(1 for y in stages if y > 0)
    assert train["negatives"] == sum(1 for y in stages if y == 0)
    binary = inspect_tree(root, "fairvision", label_key="glaucoma", progress=False)
    assert binary["problems"] and all(p["key"] == "glaucoma" for p in binary["problems"])


def test_synthetic_fairvlmed_refuses_a_multiclass_label():
    from pydantic import ValidationError

    from multifair.data.synthetic import SynthKnobs

    with pytest.raises(ValidationError, match="FairVLMed has a binary glaucoma label only"):
        SynthKnobs(flavour="fairvlmed", n_classes=3)
    assert SynthKnobs(flavour="fairvision", n_classes=4).n_classes == 4
