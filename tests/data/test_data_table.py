"""Bring-your-own table: mixed column types, fitted on train only, saved and reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datahelpers import make_tree

from multifair.data import DataConfig, build_data, load_data_config, make_loader
from multifair.errors import UserError

DIABETES = Path(__file__).resolve().parents[2] / "configs" / "data" / "diabetes.yaml"


def test_diabetes_config_against_sklearn():
    from sklearn.datasets import load_diabetes

    cfg = load_data_config(DIABETES)
    bundle = build_data(cfg)
    raw = load_diabetes(scaled=False, as_frame=True).frame
    assert sum(len(ds) for ds in bundle.datasets.values()) == len(raw) == 442
    assert list(bundle.modalities) == ["vitals", "serum"]
    assert bundle.modalities["vitals"].features == ("age", "bmi", "bp")
    assert bundle.modalities["serum"].shape == (6,)
    assert bundle.group_names == {"sex": {0: "sex 1", 1: "sex 2"}, "age": {0: "<50", 1: ">=50"}}
    for split in bundle.datasets:
        rows = [int(s.split("_")[1]) for s in bundle.sample_ids(split)]
        np.testing.assert_array_equal(
            bundle.labels(split), (raw["target"].to_numpy()[rows] > 140).astype(int)
        )
        np.testing.assert_array_equal(
            bundle.groups(split, "sex"), (raw["sex"].to_numpy()[rows] == 2).astype(int)
        )
        np.testing.assert_array_equal(
            bundle.groups(split, "age"), (raw["age"].to_numpy()[rows] >= 50).astype(int)
        )
    # standardised with the TRAIN rows' statistics (oracle: pandas on the same rows)
    train_rows = [int(s.split("_")[1]) for s in bundle.sample_ids("train")]
    test_rows = [int(s.split("_")[1]) for s in bundle.sample_ids("test")]
    ref = raw.iloc[train_rows][["s1", "s2", "s3", "s4", "s5", "s6"]]
    mean, std = ref.mean().to_numpy(), ref.std(ddof=0).to_numpy()
    expected = (raw.iloc[test_rows][ref.columns].to_numpy() - mean) / std
    got = torch.stack([bundle.datasets["test"][i]["serum"] for i in range(len(test_rows))]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # stratified split: each split keeps roughly the label balance
    rates = [bundle.labels(s).mean() for s in ("train", "val", "test")]
    assert max(rates) - min(rates) < 0.05


def _mixed_frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(n)],
            "num": rng.normal(10, 2, n),
            "flag_tf": rng.choice(["t", "f"], n),
            "flag_yes": rng.choice(["yes", "no", "Yes"], n),
            "flag_bool": rng.choice(["TRUE", "FALSE"], n),
            "cat": rng.choice(["a", "b", "c"], n),
            "note": [f"note {i}" for i in range(n)],
            "sex": rng.choice(["F", "M"], n),
            "outcome": rng.choice(["pos", "neg"], n),
            "use": ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4),
        }
    )
    frame.loc[[1, 5, 7], "num"] = np.nan
    frame.loc[[2], "flag_tf"] = np.nan
    frame.loc[[3, n - 20], "cat"] = np.nan
    frame.loc[n - 15, "cat"] = "zzz"  # a category the training rows never saw
    return frame


def _mixed_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(
        kind="table",
        path=str(path),
        label={"column": "outcome", "positive": ["pos"]},
        attribute="sex",
        id_column="id",
        split={"column": "use"},
        columns={
            "labs": {"columns": ["num", "flag_tf", "flag_yes", "flag_bool", "cat"]},
            "text": {"kind": "text", "column": "note"},
        },
        **kw,
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_mixed_types_encoding_and_imputation(tmp_path: Path, suffix: str):
    frame = _mixed_frame()
    path = tmp_path / f"t{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    bundle = build_data(_mixed_cfg(path))
    spec = bundle.modalities["labs"]
    assert spec.features == (
        "num",
        "num__missing",
        "flag_tf",
        "flag_tf__missing",
        "flag_yes",
        "flag_bool",
        "cat=a",
        "cat=b",
        "cat=c",
        "cat__missing",
    )
    assert bundle.group_names["sex"] == {0: "F", 1: "M"}
    train = frame[frame["use"] == "train"]
    num = train["num"]
    by_id = {s: i for i, s in enumerate(frame["id"])}
    for ds in bundle.datasets.values():
        for i in range(len(ds)):
            x = ds[i]["labs"].numpy()
            row = frame.iloc[by_id[ds[i]["sample_id"]]]
            value = num.median() if np.isnan(row["num"]) else row["num"]
            assert x[0] == pytest.approx((value - num.mean()) / num.std(ddof=0), abs=1e-5)
            assert x[1] == float(np.isnan(row["num"]))
            assert x[4] == float(str(row["flag_yes"]).lower() == "yes")
            assert x[5] == float(row["flag_bool"] in ("TRUE", True))
            onehot = [float(row["cat"] == c) for c in "abc"]
            assert list(x[6:9]) == onehot  # unseen 'zzz' and missing -> all zeros
            assert x[9] == float(pd.isna(row["cat"]))
            assert ds[i]["label"] == int(row["outcome"] == "pos")
            assert ds[i]["text"] == row["note"]


def test_state_roundtrip_for_predict_on_new_data(tmp_path: Path):
    frame = _mixed_frame()
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    bundle = build_data(_mixed_cfg(path))
    state = json.loads(json.dumps(bundle.state()))  # JSON-able
    # new data: other rows, other statistics, no label column, no split column
    new = frame.drop(columns=["outcome", "use"]).iloc[::-1].copy()
    new["num"] = new["num"] * 100
    new_path = tmp_path / "new.csv"
    new.to_csv(new_path, index=False)
    again = build_data(_mixed_cfg(new_path), ["all"], state=state)
    assert again.modalities["labs"].features == bundle.modalities["labs"].features
    assert (again.labels("all") == -1).all()
    f = state["fitted"]["features"]["labs"][0]
    x = torch.stack([again.datasets["all"][i]["labs"] for i in range(len(new))]).numpy()
    raw = new["num"].fillna(f["fill"]).to_numpy()
    np.testing.assert_allclose(x[:, 0], (raw - f["mean"]) / f["std"], rtol=1e-5)
    with pytest.raises(UserError, match="state is for kind 'table'"):
        build_data(DataConfig(kind="fairvision", root=tmp_path), state=state)


def test_label_rules_bins_and_seeded_split(tmp_path: Path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "score": rng.normal(0, 1, 200),
            "age": rng.uniform(20, 90, 200),
            "x": rng.normal(0, 1, 200),
        }
    )
    frame.loc[0, "age"] = np.nan
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    cfg = DataConfig(
        kind="table",
        path=str(path),
        label={"column": "score", "rule": ">= 0.5"},
        attribute="age",
        attribute_columns={"age": {"column": "age", "bins": [40, 65]}},
        columns={"m": {"columns": ["x"]}},
        split={"seed": 3},
    )
    a, b = build_data(cfg), build_data(cfg)
    assert a.group_names["age"] == {0: "<40", 1: "40-65", 2: ">=65"}
    ids = {s: set(a.sample_ids(s)) for s in a.datasets}
    assert ids["train"].isdisjoint(ids["test"]) and sum(map(len, ids.values())) == 200
    assert all(a.sample_ids(s) == b.sample_ids(s) for s in a.datasets)  # seeded
    for split in a.datasets:
        rows = [int(s.split("_")[1]) for s in a.sample_ids(split)]
        np.testing.assert_array_equal(
            a.labels(split), (frame["score"].to_numpy()[rows] >= 0.5).astype(int)
        )
        expected = np.digitize(frame["age"].to_numpy()[rows], [40, 65])
        expected[np.isnan(frame["age"].to_numpy()[rows])] = -1
        np.testing.assert_array_equal(a.groups(split), expected)
    other = build_data(cfg.model_copy(update={"split": cfg.split.model_copy(update={"seed": 4})}))
    assert other.sample_ids("test") != a.sample_ids("test")


def test_one_file_per_split(tmp_path: Path):
    frame = _mixed_frame(40).drop(columns=["use"])
    paths = {}
    for split, part in zip(
        ("train", "val", "test"), (frame.iloc[:14], frame.iloc[14:27], frame.iloc[27:])
    ):
        paths[split] = str(tmp_path / f"{split}.csv")
        part.to_csv(paths[split], index=False)
    cfg = _mixed_cfg(tmp_path / "x.csv").model_copy(update={"path": paths})
    bundle = build_data(cfg)
    assert [len(bundle.datasets[s]) for s in ("train", "val", "test")] == [14, 13, 13]


@pytest.mark.parametrize(
    ("column", "value", "needle"),
    [
        ("outcome", np.nan, "row 4: column 'outcome': label is missing"),
        ("num", "abc", "row 4: column 'num': 'abc' is not a number"),
        ("sex", "X", "row 4: column 'sex': 'X' is not a known group"),
        ("use", "later", "row 4: 'later' is not a split name"),
    ],
)
def test_bad_cells_name_row_column_and_value(tmp_path: Path, column, value, needle):
    frame = _mixed_frame()
    frame[column] = frame[column].astype(object)
    frame.loc[4, column] = value
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    cfg = _mixed_cfg(path)
    if column == "sex":
        names = {"attribute_columns": {"sex": {"column": "sex", "names": ["F", "M"]}}}
        cfg = DataConfig.model_validate({**cfg.model_dump(), **names})
    with pytest.raises(UserError, match=needle):
        build_data(cfg)
    if column in ("outcome", "sex"):  # row problems can be skipped on request, and are counted
        bundle = build_data(cfg.model_copy(update={"skip_bad": True}))
        assert len(bundle.skipped) == 1 and needle in bundle.skipped[0]["problem"]


def test_image_path_column(tmp_path: Path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        np.savez(
            tmp_path / "img" / f"{i}.npz", pixels=rng.integers(0, 255, (20, 20), dtype=np.uint8)
        )
        rows.append({"file": f"img/{i}.npz", "y": i % 2, "g": "ab"[i % 3 == 0], "v": float(i)})
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    cfg = DataConfig(
        kind="table",
        path=str(tmp_path / "t.csv"),
        label="y",
        attribute="g",
        columns={
            "img": {"kind": "image", "column": "file", "key": "pixels"},
            "v": {"columns": ["v"]},
        },
        split={"fractions": {"train": 0.5, "test": 0.5}},
        image_size=20,
    )
    bundle = build_data(cfg, ["train", "test"])
    assert bundle.modalities["img"].kind == "image" and bundle.modalities["img"].stored_shape == (
        1,
        20,
        20,
    )
    sample = bundle.datasets["test"][0]
    index = int(sample["sample_id"].split("_")[1])
    with np.load(tmp_path / "img" / f"{index}.npz") as z:
        np.testing.assert_array_equal(sample["img"][0].numpy(), z["pixels"])
    batch = next(iter(make_loader(bundle, "train", batch_size=3)))
    assert batch["img"].dtype == torch.uint8 and batch["v"].dtype == torch.float32


def test_synthetic_table_config_loads(tmp_path: Path):
    make_tree(tmp_path, "table", n=300)
    bundle = build_data(load_data_config(tmp_path / "table.yaml"))
    assert list(bundle.modalities) == ["A", "B"]
    assert bundle.attributes == ["race", "sex", "age"]
    assert bundle.group_names["race"] == {0: "Asian", 1: "Black", 2: "White"}
    f = bundle.modalities["A"].features
    assert "a01__missing" in f and "site=north" in f and "smoker" in f
