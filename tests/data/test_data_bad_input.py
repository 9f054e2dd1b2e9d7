"""Bad input: one clear error naming file, key and value - or, when asked, a counted skip."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from datahelpers import make_tree

from multifair.cli import main
from multifair.data import DataConfig, build_data, make_loader
from multifair.errors import UserError


@pytest.fixture
def tree(tmp_path: Path, fairvision_tree) -> Path:
    root = tmp_path / "root"
    shutil.copytree(fairvision_tree[0], root)
    return root


def _first(root: Path, split: str = "Training") -> Path:
    return sorted((root / "Glaucoma" / split).glob("data_*.npz"))[0]


def _rewrite(path: Path, drop: str | None = None, **changes) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != drop}
    arrays.update(changes)
    np.savez(path, **arrays)


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(kind="fairvision", root=root, image_size=16, num_workers=0, **kw)


def _fails(root: Path, *needles: str, **kw) -> str:
    with pytest.raises(UserError) as info:
        build_data(_cfg(root, **kw))
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_truncated_npz(tree: Path):
    path = _first(tree)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _fails(tree, str(path), "unreadable npz")


def test_unreadable_file(tree: Path):
    path = _first(tree)
    path.write_bytes(b"this is not a zip archive")
    _fails(tree, str(path), "unreadable npz")


def test_missing_key(tree: Path):
    path = _first(tree)
    _rewrite(path, drop="glaucoma")
    _fails(tree, str(path), "'glaucoma'", "missing key")
    _rewrite(path, glaucoma=np.array(1))
    _rewrite(path, drop="oct_bscans")
    # an absent image array is a missing modality (data.missing_modalities: mask, the
    # default; tests/data/test_data_missing.py); `impute` keeps the error of a missing key
    _fails(tree, str(path), "'oct_bscans'", "missing key", missing_modalities="impute")
    _fails(tree, str(path), "modality 'oct' is missing", missing_modalities="error")


def test_wrong_shape(tree: Path):
    path = _first(tree)
    _rewrite(path, oct_bscans=np.zeros((16, 16), np.uint8))
    _fails(tree, str(path), "'oct_bscans'", "(16, 16)", "not a volume")
    _rewrite(path, oct_bscans=np.zeros((5, 16, 16), np.uint8), slo_fundus=np.zeros(16, np.uint8))
    _fails(tree, str(path), "'slo_fundus'", "(16,)")


@pytest.mark.parametrize(
    ("value", "needle"),
    [(2, "label 2 is outside {0, 1}"), (np.nan, "label is NaN"), (-1, "label -1 is outside")],
)
def test_label_outside_01(tree: Path, value, needle):
    path = _first(tree)
    _rewrite(path, glaucoma=np.array(value))
    _fails(tree, str(path), "'glaucoma'", needle)


def test_nan_pixels_fail_when_read(tree: Path):
    path = _first(tree)
    with np.load(path) as z:
        fundus = z["slo_fundus"].astype(np.float32)
    fundus[3, 4] = np.nan
    _rewrite(path, slo_fundus=fundus)
    bundle = build_data(_cfg(tree))  # headers are fine; the values are checked when read
    index = bundle.datasets["train"].sample_ids.index(path.stem)
    with pytest.raises(UserError, match=r"slo_fundus.*non-finite pixel value nan"):
        bundle.datasets["train"][index]


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("race", np.array(7), "7 is not a race code"),
        ("race", np.array("Martian"), "'Martian' is not a race value"),
        ("male", np.array(3), "3 is not a gender code"),
        ("language", np.array(1.5), "1.5 is not an integer code"),
    ],
)
def test_unknown_attribute_code(tree: Path, key, value, needle):
    path = _first(tree)
    _rewrite(path, **{key: value})
    _fails(tree, str(path), f"'{key}'", needle)


def test_pickled_object_array_is_refused(tree: Path):
    path = _first(tree)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["race"] = np.array([{"evil": 1}], dtype=object)
    np.savez(path, **arrays)  # numpy pickles the object array
    _fails(tree, str(path), "'race'", "refusing to load")


def test_empty_and_missing_split_folders(tree: Path):
    test_folder = tree / "Glaucoma" / "Test"
    for f in test_folder.glob("*"):
        f.unlink()
    _fails(tree, str(test_folder), "empty split folder")
    test_folder.rmdir()
    _fails(tree, "no folder for split(s) ['test']")
    build_data(_cfg(tree), ["train", "val"])  # the other splits still load


def test_ambiguous_split_spellings(tree: Path):
    (tree / "Glaucoma" / "test").mkdir()
    _fails(tree, "'Test'", "'test'", "keep one")


def test_skip_bad_counts_and_reports(tree: Path, caplog):
    bad = [_first(tree, "Training"), _first(tree, "Validation")]
    bad[0].write_bytes(b"junk")
    _rewrite(bad[1], race=np.array(9))
    n_train = len(list((tree / "Glaucoma" / "Training").glob("data_*.npz")))
    bundle = build_data(_cfg(tree, skip_bad=True))
    assert len(bundle.datasets["train"]) == n_train - 1
    assert sorted(s["file"] for s in bundle.skipped) == sorted(map(str, bad))
    assert {s["key"] for s in bundle.skipped} == {None, "race"}
    assert "skipped 2 bad file(s)" in caplog.text


def test_missing_root_and_bad_config_are_one_line_cli_errors(tmp_path: Path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a folder" in err
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  kind: fairvision\n  root: x\n  label: {column: y}\n")
    assert main(["data", "inspect", str(cfg)]) == 2
    assert "`label` is only for kind table" in capsys.readouterr().err


def test_table_missing_column_names_file_and_column(tmp_path: Path):
    make_tree(tmp_path, "table", n=60)
    cfg = DataConfig(
        kind="table",
        path=str(tmp_path / "table.csv"),
        label="glaucoma",
        columns={"A": {"columns": ["a01", "a99"]}},
    )
    with pytest.raises(UserError, match=r"table\.csv: column 'a99' not found \(columns: \["):
        build_data(cfg)


def test_worker_errors_reach_the_main_process(tree: Path):
    path = _first(tree)
    with np.load(path) as z:
        fundus = z["slo_fundus"].astype(np.float64)
    fundus[0, 0] = 400.0
    _rewrite(path, slo_fundus=fundus)
    bundle = build_data(_cfg(tree), ["train"])
    loader = make_loader(bundle, "train", batch_size=64, num_workers=1)
    with pytest.raises(UserError, match=r"outside 0\.\.255"):
        list(loader)
