"""Intersectional training attributes (`data.attribute: race*gender`) from every loader, and the
minimum group size rule, against a naive per-sample oracle written from docs/data.md."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datahelpers import make_tree

from multifair.data import DataConfig, build_data
from multifair.data import intersections as ix
from multifair.errors import UserError


def oracle_names(train: list[tuple[str, str]], firsts, seconds, limit: int) -> dict:
    """(first, second) name pair -> the group name the documented rule gives it."""
    counts = Counter(train)
    out = {}
    for a in firsts:
        big = [b for b in seconds if counts[(a, b)] >= max(limit, 1)]
        small = [b for b in seconds if 0 < counts[(a, b)] < limit]
        whole = not big or (small and sum(counts[(a, b)] for b in small) < limit)
        for b in seconds:
            out[(a, b)] = f"{a}|*" if whole else f"{a}|{b}" if b in big else f"{a}|other"
    return out


def check_bundle(bundle, attribute: str, limit: int) -> None:
    """Every split's intersection codes name the oracle's group of the sample's two parts."""
    first, second = ix.parts(attribute)
    names = bundle.group_names

    def pairs(split):
        a, b = bundle.groups(split, first), bundle.groups(split, second)
        return [
            None if x < 0 or y < 0 else (names[first][x], names[second][y])
            for x, y in zip(a.tolist(), b.tolist())
        ]

    want = oracle_names(
        [p for p in pairs("train") if p is not None],
        names[first].values(),
        names[second].values(),
        limit,
    )
    assert bundle.train_attribute == attribute and bundle.attributes[0] == attribute
    assert {first, second} <= set(bundle.attributes)  # the single attributes stay evaluated
    assert sorted(names[attribute]) == list(range(bundle.n_groups))  # codes 0..G-1
    for split in bundle.datasets:
        got = bundle.groups(split, attribute)
        for code, pair in zip(got.tolist(), pairs(split)):
            if pair is None:
                assert code == -1  # unknown when any part is unknown
            else:
                assert names[attribute][code] == want[pair]
    sample = bundle.datasets["train"][0]
    assert sample["group"] == sample["attributes"][attribute]
    batch = bundle.collate([bundle.datasets["val"][i] for i in range(3)])
    assert batch["group"].tolist() == batch["attributes"][attribute].tolist()


@pytest.mark.parametrize("limit", [0, 4, 1000])
def test_fairvision_race_by_gender(fairvision_tree, limit):
    root, _ = fairvision_tree
    cfg = DataConfig(
        kind="fairvision", root=root, attribute="race*gender", min_group_size=limit, image_size=16
    )
    bundle = build_data(cfg)
    check_bundle(bundle, "race*gender", limit)
    if limit == 0:  # no merging: every combination seen is a group, named like Black|Female
        assert "Black|Female" in bundle.group_names["race*gender"].values()
    if limit == 1000:  # everything below the limit: one group per race
        assert set(bundle.group_names["race*gender"].values()) == {"Asian|*", "Black|*", "White|*"}


def test_fairvlmed_intersection_with_unknowns(tmp_path: Path):
    make_tree(tmp_path, "fairvlmed", unknown_rate=0.3, seed=3)
    cfg = DataConfig(kind="fairvlmed", root=tmp_path, attribute="gender*language", min_group_size=3)
    bundle = build_data(cfg)
    check_bundle(bundle, "gender*language", 3)
    assert (bundle.groups("train", "gender*language") == -1).any()  # language -1 -> unknown
    dropped = build_data(cfg.model_copy(update={"unknown": "drop"}))
    for split in dropped.datasets:
        assert (dropped.groups(split) >= 0).all()
        n_unknown = int((bundle.groups(split) == -1).sum())
        assert len(dropped.datasets[split]) == len(bundle.datasets[split]) - n_unknown


def write_table(path: Path, train: dict, val: dict) -> Path:
    """A table with race x language counts per split; label alternating, two features."""
    rows = []
    for split, counts in (("train", train), ("val", val), ("test", val)):
        for (race, language), n in counts.items():
            for i in range(n):
                rows.append({"use": split, "race": race, "language": language, "y": i % 2})
    frame = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    frame["x1"], frame["x2"] = rng.normal(size=len(frame)), rng.normal(size=len(frame))
    frame.to_csv(path, index=False)
    return path


TRAIN = {  # training counts chosen to hit each branch of the rule at min_group_size 10
    ("White", "English"): 40,  # own group
    ("White", "Spanish"): 6,  # small: pooled with Other (6 + 5 >= 10) into White|other
    ("White", "Other"): 5,
    ("Black", "English"): 30,  # own
    ("Black", "Spanish"): 30,  # own; Black|Other is never seen in training -> Black|other
    ("Asian", "English"): 30,  # large, but Asian's small groups are 4 < 10 even together:
    ("Asian", "Spanish"): 4,  # every Asian group becomes Asian|*
}
VAL = {  # other sizes in val/test: the TRAINING counts decide, the same way in every split
    ("White", "English"): 10,
    ("White", "Spanish"): 12,
    ("White", "Other"): 2,
    ("Black", "English"): 6,
    ("Black", "Spanish"): 6,
    ("Black", "Other"): 8,
    ("Asian", "English"): 6,
    ("Asian", "Spanish"): 20,
    ("Asian", "Other"): 2,
}


def table_config(path: Path, **changes) -> DataConfig:
    data = dict(
        kind="table",
        path=str(path),
        label="y",
        attribute="race*language",
        attributes=["race"],
        attribute_columns={"race": "race", "language": "language"},
        columns={"x": {"columns": ["x1", "x2"]}},
        split={"column": "use"},
        min_group_size=10,
        num_workers=0,
    )
    data.update(changes)
    return DataConfig(**data)


def test_table_min_group_size_rule_and_messages(tmp_path, capsys):
    cfg = table_config(write_table(tmp_path / "t.csv", TRAIN, VAL))
    bundle = build_data(cfg)
    out = capsys.readouterr().out.splitlines()
    check_bundle(bundle, "race*language", 10)
    assert bundle.attributes == ["race*language", "race", "language"]
    names = bundle.group_names["race*language"]
    assert list(names.values()) == [
        "Asian|*", "Black|English", "Black|Spanish", "Black|other", "White|English", "White|other"
    ]  # fmt: skip
    assert out == [
        "race*language: Asian|English has 30 training samples, but the smaller groups of its "
        "first attribute stay < 10 even together: merged into Asian|*",
        "race*language: Asian|Spanish has 4 training samples < 10: merged into Asian|*",
        "race*language: White|Other has 5 training samples < 10: merged into White|other",
        "race*language: White|Spanish has 6 training samples < 10: merged into White|other",
    ]
    fitted = bundle.intersections["race*language"]
    assert fitted["train_counts"] == {
        "Asian|*": 34, "Black|English": 30, "Black|Spanish": 30, "Black|other": 0,
        "White|English": 40, "White|other": 11,
    }  # fmt: skip
    # val: Asian|Spanish has 20 samples there, Black|Other 8: still merged by the training counts
    val = Counter(names[c] for c in bundle.groups("val", "race*language").tolist())
    assert val["Asian|*"] == 28 and val["Black|other"] == 8 and val["White|other"] == 14
    assert "merged (< 10)" in bundle.describe()


def test_saved_state_reproduces_the_groups(tmp_path, capsys, fairvision_tree):
    cfg = table_config(write_table(tmp_path / "t.csv", TRAIN, VAL))
    bundle = build_data(cfg)
    capsys.readouterr()
    again = build_data(cfg, ("all",), state=bundle.state())  # `predict` on a new table
    assert again.group_names["race*language"] == bundle.group_names["race*language"]
    assert capsys.readouterr().out == ""  # reused, not fitted again
    np.testing.assert_array_equal(
        again.groups("all", "race*language")[-len(bundle.datasets["test"]) :],
        bundle.groups("test", "race*language"),
    )
    # FairVision: `evaluate` loads the test split only; the state brings the training groups
    root, _ = fairvision_tree
    fv = DataConfig(
        kind="fairvision", root=root, attribute="race*gender", min_group_size=4, image_size=16
    )
    full = build_data(fv)
    test = build_data(fv, ("test",), state=full.state())
    assert test.group_names["race*gender"] == full.group_names["race*gender"]
    np.testing.assert_array_equal(test.groups("test"), full.groups("test"))
    with pytest.raises(UserError, match="needs the training split's group sizes"):
        build_data(fv, ("test",))


def test_intersection_in_evaluated_attributes_only(tmp_path, capsys):
    cfg = table_config(
        write_table(tmp_path / "t.csv", TRAIN, VAL),
        attribute="race",
        attributes=["race", "race*language"],
    )
    bundle = build_data(cfg)
    assert bundle.attributes == ["race", "race*language"] and bundle.n_groups == 3
    assert "Asian|*" in bundle.group_names["race*language"].values()


@pytest.mark.parametrize(
    "attribute, match",
    [
        ("race*", "has an empty part"),
        ("race*race", "names an attribute twice"),
    ],
)
def test_bad_syntax_is_a_config_error(tmp_path, attribute, match):
    from multifair.config import validate

    with pytest.raises(UserError, match=rf"data: attribute: .*{match}"):
        validate(
            DataConfig,
            {"kind": "fairvision", "root": str(tmp_path), "attribute": attribute},
            source="data",
        )


def test_unknown_part_names_the_key_and_the_valid_attributes(tmp_path, fairvision_tree):
    cfg = table_config(write_table(tmp_path / "t.csv", TRAIN, VAL), attribute="race*lang")
    with pytest.raises(UserError) as err:
        build_data(cfg)
    assert str(err.value) == (
        "data.attribute: 'lang' in 'race*lang' is not an attribute of this data "
        "(valid: ['race', 'language'], or a column of the table)"
    )
    root, _ = fairvision_tree
    with pytest.raises(UserError, match=r"data.attributes: 'sex' in 'race\*sex' .*'gender'"):
        build_data(DataConfig(kind="fairvision", root=root, attributes=["race*sex"], image_size=16))
