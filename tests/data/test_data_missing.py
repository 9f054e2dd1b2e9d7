"""Missing modalities in every loader: the per-sample presence mask (batch["present"]), the
`data.missing_modalities` policies, and the synthetic `missing` knob (rates by group, files on
disk that really lack the modality)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from multifair.data import DataConfig, build_data, make_loader, prepare_cache
from multifair.data.synthetic import SynthKnobs, generate
from multifair.errors import UserError


def _all_present(bundle, split: str) -> dict[str, np.ndarray]:
    """The presence mask as batches deliver it, over a whole split (in order). Batches carry
    it for the modalities some sample of the data lacks, exactly; the others are present in
    every sample."""
    out: dict[str, list[np.ndarray]] = {m: [] for m in bundle.modalities}
    for batch in make_loader(bundle, split, batch_size=64, num_workers=0):
        assert set(batch["present"]) == bundle.lacking
        for m in bundle.modalities:
            have = batch["present"].get(m, torch.ones(len(batch["label"]), dtype=torch.bool))
            out[m].append(have.numpy())
    return {m: np.concatenate(v) for m, v in out.items()}


def _expected(meta: dict, split: str, ids: list[str]) -> dict[str, np.ndarray]:
    by_id = {s["sample_id"]: set(s.get("missing", [])) for s in meta["samples"]}
    return {m: np.array([m not in by_id[i] for i in ids]) for m in meta["modalities"]}


# ---- the synthetic knob ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def missing_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("missing_table")
    knobs = SynthKnobs(flavour="table", n=3000, missing={"A": [0.05], "B": [0.3, 0.3, 0.05]})
    return out, generate(knobs, out, progress=False)


def test_knob_rates_by_group(missing_table):
    out, meta = missing_table
    race = np.array([s["race"] for s in meta["samples"]])
    lacks_b = np.array(["B" in s.get("missing", []) for s in meta["samples"]])
    lacks_a = np.array(["A" in s.get("missing", []) for s in meta["samples"]])
    for code, rate in [(0, 0.3), (1, 0.3), (2, 0.05)]:
        n = int((race == code).sum())
        se = np.sqrt(rate * (1 - rate) / n)
        assert abs(lacks_b[race == code].mean() - rate) < 4 * se, code
    assert abs(lacks_a.mean() - 0.05) < 4 * np.sqrt(0.05 * 0.95 / len(race))
    assert not (lacks_a & lacks_b).any()  # nobody loses every modality
    # on disk: the whole block of B is empty exactly for those rows
    frame = pd.read_csv(out / "table.csv")
    b_cols = [c for c in frame.columns if c.startswith("b")] + ["statin", "insurance"]
    assert (frame[b_cols].isna().all(axis=1).to_numpy() == lacks_b).all()


def test_knob_leaves_other_data_unchanged(tmp_path):
    plain = generate(SynthKnobs(flavour="table", n=200), tmp_path / "plain", progress=False)
    knob = generate(
        SynthKnobs(flavour="table", n=200, missing={"B": [0.5]}), tmp_path / "knob", progress=False
    )
    assert [s["latent"] for s in plain["samples"]] == [s["latent"] for s in knob["samples"]]
    a = pd.read_csv(tmp_path / "plain" / "table.csv")
    b = pd.read_csv(tmp_path / "knob" / "table.csv")
    pd.testing.assert_frame_equal(a[[c for c in a if c.startswith("a")]], b[[c for c in b if c.startswith("a")]])  # fmt: skip


def test_synth_cli_writes_the_knob(tmp_path, capsys):
    import json

    from multifair.cli import main

    out = tmp_path / "t"
    args = ["data", "synth", "table", str(out), "--n", "100", "--missing", "B=0.5"]
    assert main(args) == 0
    knobs = json.loads((out / "synth_meta.json").read_text())["knobs"]
    assert knobs["missing"] == {"B": [0.5]}
    assert main(["data", "synth", "table", str(tmp_path / "u"), "--missing", "B"]) == 2
    assert "--missing 'B': expected MODALITY=R" in capsys.readouterr().err


def test_knob_rejects_bad_rates():
    with pytest.raises(ValueError, match="missing"):
        SynthKnobs(flavour="table", missing={"C": [0.1]})
    with pytest.raises(ValueError, match=r"missing\.B"):
        SynthKnobs(flavour="table", missing={"B": [0.1, 0.2]})


# ---- table: all-empty tabular block ---------------------------------------------------------


def test_table_mask_matches_files(missing_table):
    out, meta = missing_table
    cfg = yaml.safe_load((out / "table.yaml").read_text())["data"]
    bundle = build_data(DataConfig(**cfg))
    assert bundle.has_missing
    for split in ("train", "test"):
        got = _all_present(bundle, split)
        want = _expected(meta, split, bundle.sample_ids(split))
        for m in ("A", "B"):
            assert (got[m] == want[m]).all(), (split, m)
            assert (bundle.present(split)[m] == want[m]).all()
        assert bundle.missing["absent"][split]["B"] == int((~want["B"]).sum())


def test_table_policies(missing_table):
    out, meta = missing_table
    cfg = yaml.safe_load((out / "table.yaml").read_text())["data"]
    lacking = sum(1 for s in meta["samples"] if s.get("missing"))
    dropped = build_data(DataConfig(**cfg, missing_modalities="drop"))
    assert not dropped.has_missing
    assert sum(dropped.missing["dropped"].values()) == lacking
    assert sum(len(d) for d in dropped.datasets.values()) == len(meta["samples"]) - lacking
    imputed = build_data(DataConfig(**cfg, missing_modalities="impute"))
    assert not imputed.has_missing  # median cells fed as data, as before masks
    batch = next(iter(make_loader(imputed, "train", 8, num_workers=0)))
    assert "present" not in batch
    with pytest.raises(UserError, match=r"row \d+: modality '[AB]' is missing"):
        build_data(DataConfig(**cfg, missing_modalities="error"))


# ---- table: image-path columns (files and cache), text, no modality at all ------------------


def _image_table(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        path = f"img{i}.npy"
        np.save(tmp_path / path, rng.integers(0, 255, (12, 12)).astype(np.uint8))
        rows.append(
            {
                "id": f"p{i}",
                "y": i % 2,
                "sex": "F" if i % 3 else "M",
                "scan": path,
                "lab1": float(rng.normal()),
                "lab2": float(rng.normal()),
                "note": f"note {i}",
            }
        )
    rows[3]["scan"] = ""  # empty path
    rows[5]["scan"] = "does_not_exist.npy"  # file absent
    rows[7]["lab1"] = rows[7]["lab2"] = np.nan  # every lab missing
    rows[9]["note"] = ""
    rows[11].update(scan="", lab1=np.nan, lab2=np.nan, note="")  # nothing at all
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    return tmp_path / "t.csv"


def _image_cfg(csv: Path, **extra) -> DataConfig:
    return DataConfig(
        kind="table",
        path=str(csv),
        label="y",
        attribute="sex",
        attribute_columns={"sex": "sex"},
        columns={
            "scan": {"kind": "image", "column": "scan"},
            "labs": {"columns": ["lab1", "lab2"]},
            "note": {"kind": "text", "column": "note"},
        },
        split={"fractions": {"train": 1.0}},
        id_column="id",
        image_size=8,
        num_workers=0,
        min_group_size=0,
        **extra,
    )


def test_table_image_text_and_empty_sample(tmp_path):
    csv = _image_table(tmp_path)
    bundle = build_data(_image_cfg(csv, cache="off"), ("train",))
    assert bundle.missing["dropped"]["train"] == 1  # p11 has no modality: dropped, counted
    ids = bundle.sample_ids("train")
    assert "p11" not in ids and len(ids) == 39
    got = _all_present(bundle, "train")
    lacks = {"scan": {"p3", "p5"}, "labs": {"p7"}, "note": {"p9"}}
    for m, who in lacks.items():
        assert {i for i, p in zip(ids, got[m]) if not p} == who, m
    # an absent image is a zero placeholder of the present images' shape
    ds = bundle.datasets["train"]
    assert ds[ids.index("p3")]["scan"].shape == ds[0]["scan"].shape
    assert int(ds[ids.index("p3")]["scan"].abs().sum()) == 0
    # the cache gives the same masks and placeholders
    prepare_cache(_image_cfg(csv), progress=False)
    cached = build_data(_image_cfg(csv), ("train",))
    assert cached.source == "cache"
    got_cached = _all_present(cached, "train")
    assert all((got[m] == got_cached[m]).all() for m in got)
    a = next(iter(make_loader(bundle, "train", 64, num_workers=0)))
    b = next(iter(make_loader(cached, "train", 64, num_workers=0)))
    assert torch.equal(a["scan"], b["scan"])


def test_table_named_but_absent_files_are_counted_and_none_existing_is_an_error(tmp_path, caplog):
    csv = _image_table(tmp_path)
    with caplog.at_level("WARNING", logger="multifair.data.table"):
        build_data(_image_cfg(csv, cache="off"), ("train",))
    assert "column 'scan': 1 of 38 files it names do not exist" in caplog.text
    assert "does_not_exist.npy" in caplog.text
    # a wrong folder: every named file absent is an error, not a modality missing for everyone
    frame = pd.read_csv(csv)
    frame["scan"] = [f"elsewhere/{v}" if isinstance(v, str) else v for v in frame["scan"]]
    frame.to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"column 'scan': none of the 38 files it names exists"):
        build_data(_image_cfg(csv, cache="off"), ("train",))


def test_table_impute_keeps_the_old_empty_path_error(tmp_path):
    csv = _image_table(tmp_path)
    with pytest.raises(UserError, match="row 3: column 'scan': empty path"):
        build_data(_image_cfg(csv, cache="off", missing_modalities="impute"), ("train",))


# ---- FairVision / FairVLMed ------------------------------------------------------------------


def test_fairvision_absent_npz_key(tmp_path):
    knobs = SynthKnobs(
        flavour="fairvision",
        n=40,
        fundus_shape=[16, 16],
        oct_shape=[4, 16, 16],
        missing={"oct": [0.4], "fundus": [0.2]},
    )
    meta = generate(knobs, tmp_path, progress=False)
    one = next(tmp_path.rglob("data_*.npz"))
    lacking = {s["sample_id"]: s.get("missing", []) for s in meta["samples"]}
    with np.load(one) as z:  # the file really lacks the array
        assert ("oct_bscans" in z.files) != ("oct" in lacking[one.stem])
    cfg = DataConfig(kind="fairvision", root=tmp_path, image_size=8, oct_slices=2, num_workers=0)
    npz = build_data(cfg.model_copy(update={"cache": "off"}))
    prepare_cache(cfg, progress=False)
    cached = build_data(cfg)
    assert cached.source == "cache"
    for bundle in (npz, cached):
        got = _all_present(bundle, "train")
        want = _expected(meta, "train", bundle.sample_ids("train"))
        assert all((got[m] == want[m]).all() for m in ("fundus", "oct"))
        assert (~want["oct"]).any() and (~want["fundus"]).any()
    with pytest.raises(UserError, match=r"modality .(fundus|oct). is missing"):
        build_data(cfg.model_copy(update={"cache": "off", "missing_modalities": "error"}))
    # inspect counts them per split and race group; they are not problems of the files
    from multifair.data.inspect import format_report, inspect_tree

    report = inspect_tree(tmp_path, progress=False)
    assert not report["problems"]
    train = report["splits"]["train"]["missing_modalities"]
    want = _expected(meta, "train", [s["sample_id"] for s in meta["samples"] if s["split"] == "train"])  # fmt: skip
    assert sum(train["oct"].values()) == int((~want["oct"]).sum())
    assert "missing oct (no array; a missing modality)" in format_report(report)


def test_fairvlmed_missing_note(tmp_path):
    knobs = SynthKnobs(flavour="fairvlmed", n=40, fundus_shape=[16, 16], missing={"note": [0.5]})
    meta = generate(knobs, tmp_path, progress=False)
    base = DataConfig(kind="fairvlmed", root=tmp_path, image_size=8, num_workers=0, cache="off")
    # default: the released fallback text, counted as present
    released = build_data(base)
    assert not released.has_missing
    masked = build_data(base.model_copy(update={"note_fallback": False}))
    ids = masked.sample_ids("train")
    want = _expected(meta, "train", ids)["note"]
    got = _all_present(masked, "train")["note"]
    assert (got == want).all() and (~want).any()
    # the batch still holds the fallback text where the note is missing (never reaches fusion)
    batch = next(iter(make_loader(masked, "train", 64, num_workers=0)))
    texts = [t for t, p in zip(batch["note"], batch["present"]["note"].tolist()) if not p]
    assert set(texts) == {"no clinical notes available"}


def test_a_modality_no_training_sample_has_is_an_error(tmp_path):
    """OCT missing for every patient (a tree without volumes, a wrong key) is not a missing
    modality to mask: nothing could learn it. The error names it and data.modalities."""
    knobs = SynthKnobs(
        flavour="fairvision", n=40, fundus_shape=[16, 16], oct_shape=[4, 16, 16],
        missing={"oct": [1.0]},
    )  # fmt: skip
    generate(knobs, tmp_path, progress=False)
    cfg = DataConfig(
        kind="fairvision", root=tmp_path, image_size=8, oct_slices=2, num_workers=0, cache="off"
    )
    with pytest.raises(UserError, match=r"split 'train': no sample has modality 'oct'.*data\.modalities"):  # fmt: skip
        build_data(cfg)
    assert not build_data(cfg.model_copy(update={"modalities": ["fundus"]})).has_missing
