"""Real hospital exports: sentinel missing values, per-column transforms fitted on train (and
stored with the run), missingness by group in `data inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chi2_contingency, skew

from multifair.cli import main
from multifair.config import validate
from multifair.data import DataConfig, build_data
from multifair.errors import UserError

N = 300


def _hospital(seed: int = 0) -> pd.DataFrame:
    """A lab export as they come: chol 0 = not measured, TSH lognormal over four orders of
    magnitude with "?", "NA " and -999 for not measured, more often for one group."""
    rng = np.random.default_rng(seed)
    race = rng.choice(["Asian", "Black", "White"], N, p=[0.2, 0.25, 0.55])
    chol = rng.normal(200, 30, N).round(1).astype(object)
    chol[rng.random(N) < 0.15] = 0
    tsh = np.exp(rng.normal(0.0, 1.6, N)).round(4).astype(object)
    gone = rng.random(N) < np.where(race == "Black", 0.45, 0.1)
    tsh[gone] = rng.choice(["?", "NA ", "-999.0", -999], int(gone.sum()))
    return pd.DataFrame(
        {
            "id": [f"p{i:03d}" for i in range(N)],
            "race": race,
            "sex": rng.choice(["F", "M"], N),
            "chol": chol,
            "tsh": tsh,
            "crp": rng.lognormal(1.0, 1.0, N).round(3),
            "alt": rng.gamma(2.0, 10.0, N).round(2),
            "outcome": rng.integers(0, 2, N),
            "use": rng.choice(["train", "val", "test"], N, p=[0.6, 0.2, 0.2]),
        }
    )


def _cfg(path: Path, **kw) -> DataConfig:
    raw = {
        "kind": "table",
        "path": str(path),
        "label": "outcome",
        "attribute": "race",
        "attribute_columns": {"race": "race", "sex": "sex"},
        "id_column": "id",
        "split": {"column": "use"},
        "missing_values": {"chol": [0], "*": ["?", "NA", -999]},
        "columns": {"labs": {"columns": ["chol", "tsh"]}},
        "num_workers": 0,
    }
    raw.update(kw)
    return validate(DataConfig, raw, source="test")


def _sentinel_rows(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The oracle: which cells are "not measured", written out by hand."""
    tsh = frame["tsh"].astype(str).str.strip()
    return {
        "chol": frame["chol"].astype(str).isin(["0", "0.0"]).to_numpy(),
        "tsh": tsh.isin(["?", "NA", "-999", "-999.0"]).to_numpy(),
    }


def _features(bundle, split: str, modality: str = "labs") -> np.ndarray:
    ds = bundle.datasets[split]
    return torch.stack([ds[i][modality] for i in range(len(ds))]).numpy()


def _rows(bundle, frame: pd.DataFrame, split: str) -> np.ndarray:
    at = {s: i for i, s in enumerate(frame["id"])}
    return np.array([at[s] for s in bundle.sample_ids(split)])


# ---- part 1: sentinels ---------------------------------------------------------------------------
def test_sentinels_are_missing_before_types_and_statistics(tmp_path: Path):
    frame = _hospital()
    frame.to_csv(tmp_path / "h.csv", index=False)
    bundle = build_data(_cfg(tmp_path / "h.csv"))
    # without the sentinels TSH reads as categories ("?", "NA " are > 10% of its cells)
    plain = build_data(_cfg(tmp_path / "h.csv", missing_values={}))
    assert "tsh=?" in plain.modalities["labs"].features
    assert bundle.modalities["labs"].features == ("chol", "chol__missing", "tsh", "tsh__missing")
    gone = _sentinel_rows(frame)
    train = _rows(bundle, frame, "train")
    for split in bundle.datasets:
        rows, x = _rows(bundle, frame, split), _features(bundle, split)
        for j, column in enumerate(("chol", "tsh")):
            observed = pd.to_numeric(frame[column].iloc[train][~gone[column][train]]).to_numpy()
            value = pd.to_numeric(frame[column].iloc[rows], errors="coerce").to_numpy()
            value = np.where(gone[column][rows], np.median(observed), value)
            expected = (value - observed.mean()) / observed.std()
            np.testing.assert_allclose(x[:, 2 * j], expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(x[:, 2 * j + 1], gone[column][rows])


def test_sentinel_counts_match_numerically_and_after_stripping(tmp_path: Path):
    from multifair.data.table import apply_missing_values, describe_sentinel

    frame = _hospital()
    _, counts = apply_missing_values(frame, _cfg(tmp_path / "h.csv"))
    tsh = frame["tsh"].astype(str).str.strip()
    expected = [
        {"column": "chol", "value": 0, "cells": int(_sentinel_rows(frame)["chol"].sum())},
        {"column": "tsh", "value": "?", "cells": int((tsh == "?").sum())},
        {"column": "tsh", "value": "NA", "cells": int((tsh == "NA").sum())},  # "NA " == "NA"
        {"column": "tsh", "value": -999, "cells": int(tsh.isin(["-999", "-999.0"]).sum())},
    ]
    assert counts == expected and all(c["cells"] > 0 for c in counts)
    assert describe_sentinel(counts[0]) == f"{counts[0]['cells']} cells of chol equal 0: treated as missing"  # fmt: skip
    # "*" never touches the label or the id, and a sentinel on an attribute makes it unknown
    frame.loc[3, "outcome"] = -999
    frame.loc[5, "race"] = "?"
    frame.to_csv(tmp_path / "h.csv", index=False)
    with pytest.raises(UserError, match=r"row 3: column 'outcome': label -999 is outside"):
        build_data(_cfg(tmp_path / "h.csv"))
    frame.loc[3, "outcome"] = 1
    frame.to_csv(tmp_path / "h.csv", index=False)
    bundle = build_data(_cfg(tmp_path / "h.csv"))
    codes = {s: c for split in bundle.datasets for s, c in zip(bundle.sample_ids(split), bundle.groups(split))}  # fmt: skip
    assert codes["p005"] == -1 and sum(c == -1 for c in codes.values()) == 1


def _labs(transforms: dict) -> dict:
    return {"columns": {"labs": {"columns": ["chol"], "transforms": transforms}}}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            {"missing_values": {"cholesterol": [0]}},
            "test: missing_values: Value error, ['cholesterol'] are not feature or attribute columns",
        ),
        ({"missing_values": {"chol": 0}}, "missing_values.chol: Input should be a valid list"),
        ({"missing_values": {"chol": [" "]}}, "an empty sentinel is already missing"),
        (_labs({"chol": "log2"}), "columns.labs.transforms.chol"),
        (_labs({"tsh": "log1p"}), "transforms: columns ['tsh'] are not in `columns`"),
        (
            _labs({"chol": {"kind": "rank", "quantiles": [0, 1]}}),
            "`quantiles` is for clip, not rank",
        ),
        (_labs({"chol": {"kind": "clip", "quantiles": [0.9, 0.1]}}), "0 <= low < high <= 1"),
        (_labs({"chol": {"kind": "clip", "q": [0.1, 0.9]}}), "transforms.chol.q: unknown key"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, change, needle):
    with pytest.raises(UserError) as info:
        _cfg(tmp_path / "h.csv", **change)
    assert needle in str(info.value) and str(info.value).startswith("test: ")


def test_missing_values_belong_to_tables():
    with pytest.raises(UserError, match="`missing_values` is only for kind table"):
        validate(DataConfig, {"kind": "fairvision", "root": "x", "missing_values": {"*": [0]}})


# ---- part 2: transforms --------------------------------------------------------------------------
TRANSFORMS = {"tsh": "log1p", "crp": {"kind": "clip", "quantiles": [0.05, 0.95]}, "alt": "rank"}


def _transform_cfg(path: Path) -> DataConfig:
    labs = {"columns": ["tsh", "crp", "alt"], "transforms": TRANSFORMS}
    return _cfg(path, columns={"labs": labs}, missing_values={"*": ["?", "NA", -999]})


def _oracle(train: np.ndarray, values: np.ndarray, kind: str) -> np.ndarray:
    """log1p / clip to the 5%-95% train quantiles / mid-rank train CDF, by hand."""
    if kind == "log1p":
        return np.log1p(values)
    if kind == "clip":
        return np.clip(values, *np.quantile(train, [0.05, 0.95]))
    knots = np.unique(train)
    below = (train[None, :] < knots[:, None]).sum(1)
    equal = (train[None, :] == knots[:, None]).sum(1)
    return np.interp(values, knots, (below + 0.5 * equal) / train.size)


def test_transforms_are_fitted_on_train_only_and_keep_missing(tmp_path: Path):
    frame = _hospital()
    frame.to_csv(tmp_path / "h.csv", index=False)
    bundle = build_data(_transform_cfg(tmp_path / "h.csv"))
    assert bundle.modalities["labs"].features == ("tsh", "tsh__missing", "crp", "alt")
    gone = _sentinel_rows(frame)["tsh"]
    train = _rows(bundle, frame, "train")
    for split in ("train", "val"):
        rows, x = _rows(bundle, frame, split), _features(bundle, split)
        for j, column, kind in ((0, "tsh", "log1p"), (2, "crp", "clip"), (3, "alt", "rank")):
            keep = ~gone[train] if column == "tsh" else np.ones(train.size, bool)
            fit_on = pd.to_numeric(frame[column].iloc[train][keep]).to_numpy()
            values = pd.to_numeric(frame[column].iloc[rows], errors="coerce").to_numpy(copy=True)
            if column == "tsh":
                values[gone[rows]] = np.nan
            moved, ref = _oracle(fit_on, values, kind), _oracle(fit_on, fit_on, kind)
            missing = np.isnan(values)
            moved[missing] = np.median(ref)  # NaN stays missing: imputed after the transform
            np.testing.assert_allclose(x[:, j], (moved - ref.mean()) / ref.std(), rtol=1e-5, atol=1e-5)  # fmt: skip
            if column == "tsh":
                np.testing.assert_array_equal(x[:, 1], missing)
    # fitted on the train rows only: wild val/test values change nothing that was fitted
    wild = frame.copy()
    held_out = wild["use"] != "train"
    wild.loc[held_out, ["crp", "alt"]] = 1e6
    wild.to_csv(tmp_path / "wild.csv", index=False)
    other = build_data(_transform_cfg(tmp_path / "wild.csv"))
    assert other.state()["fitted"] == bundle.state()["fitted"]
    entry = {e["column"]: e for e in bundle.state()["fitted"]["features"]["labs"]}
    assert entry["crp"]["transform"]["high"] < 1e3 and entry["alt"]["transform"]["x"][-1] < 1e3
    x = _features(other, "test")
    top = (entry["alt"]["transform"]["cdf"][-1] - entry["alt"]["mean"]) / entry["alt"]["std"]
    assert x[:, 3].max() == pytest.approx(top)  # above the train range: the last knot


def test_rank_interpolates_between_train_values(tmp_path: Path):
    from multifair.data.config import ColumnTransform
    from multifair.data.table import apply_transform, fit_transform

    rng = np.random.default_rng(1)
    train = rng.lognormal(0, 2, 5000)
    fitted = fit_transform(train, ColumnTransform(kind="rank"), "alt")
    assert len(fitted["x"]) <= 1001  # thinned knots, exact to ~1/1000
    probe = np.quantile(train, np.linspace(0.01, 0.99, 57))
    np.testing.assert_allclose(
        apply_transform(probe, fitted), np.linspace(0.01, 0.99, 57), atol=2e-3
    )
    ends = apply_transform(np.array([-1.0, np.nan, 1e9]), fitted)
    assert ends[0] == pytest.approx(0.5 / 5000, abs=1e-3) and np.isnan(ends[1]) and ends[2] > 0.999


def test_predict_on_a_new_table_applies_the_stored_transforms(tmp_path: Path):
    frame = _hospital()
    frame.to_csv(tmp_path / "h.csv", index=False)
    bundle = build_data(_transform_cfg(tmp_path / "h.csv"))
    state = json.loads(json.dumps(bundle.state()))  # what the run stores
    # new data: the test rows plus very different patients, no label or split column
    new = pd.concat([frame[frame["use"] == "test"], _hospital(seed=5).assign(id=lambda f: "n" + f["id"])])  # fmt: skip
    new["crp"] = new["crp"].where(new["id"].str.startswith("p"), new["crp"] * 50)
    new.drop(columns=["outcome", "use"]).to_csv(tmp_path / "new.csv", index=False)
    again = build_data(_transform_cfg(tmp_path / "new.csv"), ["all"], state=state)
    x, ids = _features(again, "all"), again.sample_ids("all")
    before = dict(zip(bundle.sample_ids("test"), _features(bundle, "test")))
    np.testing.assert_allclose(np.stack([before[s] for s in ids if s in before]), x[[s in before for s in ids]], rtol=1e-6)  # fmt: skip
    # the wild new rows are clipped at the TRAIN quantile, not at their own
    clip = {e["column"]: e for e in state["fitted"]["features"]["labs"]}["crp"]
    top = (clip["transform"]["high"] - clip["mean"]) / clip["std"]
    assert x[:, 2].max() == pytest.approx(top, rel=1e-5)


def test_transform_domain_and_type_errors_name_row_column_and_value(tmp_path: Path):
    frame = _hospital()
    frame.loc[7, "tsh"] = -3.5
    frame.to_csv(tmp_path / "h.csv", index=False)
    cfg = _transform_cfg(tmp_path / "h.csv")
    with pytest.raises(UserError, match=r"row 7: column 'tsh': -3.5 is not > -1 \(log1p\)"):
        build_data(cfg)
    skipped = build_data(cfg.model_copy(update={"skip_bad": True}))
    assert [s["problem"] for s in skipped.skipped] == ["row 7: column 'tsh': -3.5 is not > -1 (log1p)"]  # fmt: skip
    labs = {"columns": ["race", "crp"], "transforms": {"race": "rank"}}
    with pytest.raises(UserError, match=r"data.columns.labs.transforms.race: rank needs a numeric column; 'race' reads as categorical"):  # fmt: skip
        build_data(_cfg(tmp_path / "h.csv", columns={"labs": labs}, missing_values={}))


# ---- part 4: data inspect --------------------------------------------------------------------------
def test_inspect_reports_sentinels_skew_and_missingness_by_group(tmp_path: Path, capsys):
    frame = _hospital()
    frame.to_csv(tmp_path / "h.csv", index=False)
    cfg = _cfg(tmp_path / "h.csv", columns={"labs": {"columns": ["chol", "tsh", "crp"]}, "alt": {"columns": ["alt"], "transforms": {"alt": "rank"}}})  # fmt: skip
    (tmp_path / "h.yaml").write_text(json.dumps({"data": cfg.model_dump(mode="json")}))
    assert main(["data", "inspect", str(tmp_path / "h.yaml"), "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    gone = _sentinel_rows(frame)
    assert f"  {gone['chol'].sum()} cells of chol equal 0: treated as missing" in out
    assert "cells of tsh equal 'NA': treated as missing" in out
    tsh = pd.to_numeric(frame["tsh"][~gone["tsh"]]).to_numpy()
    assert (
        f"tsh: labs, numeric, {gone['tsh'].sum()} missing, skew {skew(tsh, bias=False):.1f}" in out
    )
    assert skew(tsh, bias=False) > 2 and skew(pd.to_numeric(frame["chol"][~gone["chol"]]), bias=False) < 2  # fmt: skip
    assert "  columns.labs.transforms: {tsh: log1p, crp: log1p}" in out  # chol is not skewed
    assert (
        "alt: alt, numeric, 0 missing, skew" in out and "(rank)" in out
    )  # configured: no suggestion
    report = json.loads((tmp_path / "r.json").read_text())
    by_race = report["missingness"]["race"]["labs"]
    lab_rows = gone["chol"] | gone["tsh"]
    table = []
    for name in ("Asian", "Black", "White"):
        sel = (frame["race"] == name).to_numpy()
        assert by_race["groups"][name]["rows"] == pytest.approx(lab_rows[sel].mean())
        cells = (gone["chol"][sel].sum() + gone["tsh"][sel].sum()) / (3 * sel.sum())
        assert by_race["groups"][name]["cells"] == pytest.approx(cells)
        table.append([lab_rows[sel].sum(), (~lab_rows[sel]).sum()])
    assert by_race["p"] == pytest.approx(chi2_contingency(np.array(table)).pvalue)
    assert by_race["differs"] and not report["missingness"]["sex"]["labs"]["differs"]
    assert "missing labs by race: rows Asian" in out and "<- differs by group (chi-square p=" in out
    sex_line = next(line for line in out.splitlines() if line.startswith("missing labs by sex"))
    assert "differs" not in sex_line


def test_train_then_predict_on_a_new_table_reuses_the_run_s_transforms(tmp_path: Path):
    """Through the CLI: the transforms fitted at training time travel in the checkpoint, so
    `predict` on a new table (other statistics, no label) scores known rows exactly as the run
    did."""
    import yaml

    frame = _hospital()
    frame.to_csv(tmp_path / "h.csv", index=False)
    run_cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "diabetes.yaml").read_text())  # fmt: skip
    run_cfg["data"] = _transform_cfg(tmp_path / "h.csv").model_dump(mode="json", exclude_defaults=True)  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_cfg))
    tiny = ["train.epochs=1", "train.progress=false", "train.warmup_steps=0", "model.dim=8", "output.n_boot=0", "method.name=erm"]  # fmt: skip
    assert main(["train", str(tmp_path / "run.yaml"), *tiny, "--out", str(tmp_path / "run")]) == 0
    new = pd.concat([frame[frame["use"] == "test"], _hospital(seed=5).assign(id=lambda f: "n" + f["id"])])  # fmt: skip
    new["crp"] = new["crp"] * 50  # every statistic of the new table differs
    new.loc[new["id"].str.startswith("p"), "crp"] /= 50  # ... except on the run's own test rows
    new.drop(columns=["outcome", "use"]).to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new.csv"), "--out", str(out)]) == 0  # fmt: skip
    pred = pd.read_csv(out).merge(pd.read_csv(tmp_path / "run" / "predictions_test.csv"), on="sample_id", suffixes=("", "_run"))  # fmt: skip
    assert len(pred) == int((frame["use"] == "test").sum())
    np.testing.assert_allclose(pred["score"], pred["score_run"], rtol=1e-5)
