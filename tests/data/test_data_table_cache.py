"""Image- and npz-path columns of a table through the memory-mapped uint8 cache
(`multifair data prepare CONFIG`): same tensors as decoding, verified on open, used
automatically, stale caches refused or skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from multifair.cli import main
from multifair.data import DataConfig, build_data, make_loader
from multifair.data.table import MappedRows, PathReader
from multifair.errors import UserError

N_FILES = 14


def _write_table(root: Path) -> Path:
    """PNG fundus photos (gray, 30x26) and npz volumes (6x20x20) named by relative paths;
    two rows share each image, as repeat visits do."""
    rng = np.random.default_rng(0)
    (root / "png").mkdir(parents=True)
    (root / "vol").mkdir()
    for i in range(N_FILES):
        Image.fromarray(rng.integers(0, 256, (30, 26), dtype=np.uint8)).save(root / "png" / f"{i}.png")  # fmt: skip
        np.savez(root / "vol" / f"{i}.npz", scan=rng.integers(0, 256, (6, 20, 20), dtype=np.uint8))
    rows = [
        {"id": f"r{r}", "photo": f"png/{r // 2}.png", "scan": f"vol/{r // 2}.npz", "y": r % 2,
         "g": "ab"[r % 3 == 0], "age": 40 + r}
        for r in range(2 * N_FILES)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "t.csv", index=False)
    return root / "t.csv"


def _cfg(table: Path, **kw) -> DataConfig:
    return DataConfig(
        kind="table",
        path=str(table),
        label="y",
        attribute="g",
        id_column="id",
        columns={
            "photo": {"kind": "image", "column": "photo"},
            "scan": {"kind": "volume", "column": "scan", "key": "scan"},
            "age": {"columns": ["age"]},
        },
        split={"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
        image_size=16,
        oct_slices=3,
        num_workers=0,
        **kw,
    )


def _yaml(table: Path, **kw) -> Path:
    path = table.with_suffix(".yaml")
    path.write_text(json.dumps({"data": _cfg(table, **kw).model_dump(mode="json")}))
    return path


def _prepare(config: Path, *extra: str) -> int:
    return main(["data", "prepare", str(config), *extra, "--workers", "0", "--no-progress"])


def _same(a, b) -> None:
    for split in a.datasets:
        assert a.sample_ids(split) == b.sample_ids(split)
        for i in range(len(a.datasets[split])):
            x, y = a.datasets[split][i], b.datasets[split][i]
            for m in ("photo", "scan", "age"):
                torch.testing.assert_close(x[m], y[m], rtol=0, atol=0)


def test_image_path_rows_read_from_the_cache_equal_the_decoded_files(tmp_path: Path, capsys):
    table = _write_table(tmp_path / "data")
    assert main(["data", "inspect", str(_yaml(table))]) == 0
    assert "image cache: not used: files decoded per sample" in capsys.readouterr().out
    assert _prepare(_yaml(table)) == 0
    out = capsys.readouterr().out
    assert "photo: 14 files (14 written now, 0 bad)" in out and "scan: 14 files" in out
    assert main(["data", "inspect", str(_yaml(table))]) == 0
    assert "image cache: used" in capsys.readouterr().out
    cached = build_data(_cfg(table))  # found beside the table, verified, used
    decoded = build_data(_cfg(table, cache="off"))
    assert cached.source == "cache" and decoded.source == "table"
    assert isinstance(cached.datasets["train"].images["photo"], MappedRows)
    assert isinstance(decoded.datasets["train"].images["photo"], PathReader)
    _same(cached, decoded)
    assert cached.modalities == decoded.modalities
    assert cached.modalities["photo"].stored_shape == (1, 16, 16)
    assert cached.modalities["scan"].stored_shape == (3, 16, 16)
    # through a worker process (the memory map is reopened there) the batches are the same
    a = next(iter(make_loader(decoded, "train", batch_size=5, shuffle=True, seed=3)))
    b = next(iter(make_loader(cached, "train", batch_size=5, shuffle=True, seed=3, num_workers=1)))
    assert a["sample_id"] == b["sample_id"] and b["photo"].dtype == torch.uint8
    torch.testing.assert_close(a["photo"], b["photo"], rtol=0, atol=0)
    torch.testing.assert_close(a["scan"], b["scan"], rtol=0, atol=0)
    # idempotent: a second prepare has nothing to do
    assert _prepare(_yaml(table)) == 0
    assert "photo: 14 files (0 written now, 0 bad)" in capsys.readouterr().out


def test_stale_cache_is_refused_or_skipped_and_rebuilt(tmp_path: Path, caplog, capsys):
    table = _write_table(tmp_path / "data")
    cache = tmp_path / "cache"
    assert _prepare(_yaml(table), str(cache)) == 0
    assert build_data(_cfg(table, cache=str(cache))).source == "cache"
    victim = table.parent / "png" / "5.png"
    Image.fromarray(np.full((31, 26), 7, dtype=np.uint8)).save(victim)  # a re-export
    os.utime(victim, ns=(1, 1))
    with pytest.raises(UserError, match=r"data.cache: .* is stale: the photo source files changed .*png/5\.png.*data prepare"):  # fmt: skip
        build_data(_cfg(table, cache=str(cache)))
    # found automatically (the default place): a warning, and the files are decoded
    assert _prepare(_yaml(table)) == 0
    Image.fromarray(np.full((30, 26), 9, dtype=np.uint8)).save(victim)
    os.utime(victim, ns=(2, 2))
    bundle = build_data(_cfg(table))
    assert (
        bundle.source == "table" and "not using the cache" in caplog.text and "stale" in caplog.text
    )
    # prepare again rewrites only the changed store, and the cache holds the new pixels
    capsys.readouterr()
    assert _prepare(_yaml(table), str(cache)) == 0
    out = capsys.readouterr().out
    assert (
        "photo: 14 files (14 written now, 0 bad)" in out and "scan: 14 files (0 written now" in out
    )
    again = build_data(_cfg(table, cache=str(cache)))
    assert again.source == "cache"
    _same(again, build_data(_cfg(table, cache="off")))
    # other settings (image size) are a different cache: refused when named, ignored when found
    with pytest.raises(UserError, match="holds caches for other settings"):
        build_data(_cfg(table, cache=str(cache)).model_copy(update={"image_size": 12}))


def test_bad_files_are_recorded_with_skip_bad_and_refused_without(tmp_path: Path, capsys):
    table = _write_table(tmp_path / "data")
    (table.parent / "png" / "2.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"png/2\.png: unreadable image"):
        _read_all(build_data(_cfg(table, cache="off")))  # decoded lazily, when a sample is read
    assert _prepare(_yaml(table)) == 2
    assert "png/2.png: unreadable image" in capsys.readouterr().err
    assert _prepare(_yaml(table), "--skip-bad") == 0
    # resumed where the failed attempt stopped: files are cached in sorted order, and the six
    # before png/2.png (0, 1, 10..13) were flushed before it failed
    assert "photo: 14 files (8 written now, 1 bad)" in capsys.readouterr().out
    # the two rows naming that file: skipped and listed with skip_bad, an error without
    bundle = build_data(_cfg(table, skip_bad=True))
    assert bundle.source == "cache"
    assert sorted(p["problem"].split(":")[0] for p in bundle.skipped) == ["row 4", "row 5"]
    assert all("png/2.png: unreadable image" in p["problem"] for p in bundle.skipped)
    with pytest.raises(UserError, match=r"row 4: column 'photo': .*png/2\.png: unreadable image"):
        build_data(_cfg(table))


def _read_all(bundle) -> None:
    for ds in bundle.datasets.values():
        for i in range(len(ds)):
            ds[i]


def test_empty_path_is_a_missing_modality_and_counts_as_missing_by_group(tmp_path: Path, capsys):
    table = _write_table(tmp_path / "data")
    frame = pd.read_csv(table)
    frame.loc[[6, 9], "scan"] = np.nan  # both rows in group "b" (r % 3 == 0)
    frame.to_csv(table, index=False)
    # data.missing_modalities: mask (default) - the rows stay, without their scan
    bundle = build_data(_cfg(table))
    assert not bundle.skipped
    assert sum(counts["scan"] for counts in bundle.missing["absent"].values()) == 2
    # impute (the behaviour before masks): an empty path is a row problem
    with pytest.raises(UserError, match="row 6: column 'scan': empty path"):
        build_data(_cfg(table, missing_modalities="impute"))
    assert len(build_data(_cfg(table, skip_bad=True, missing_modalities="impute")).skipped) == 2
    # inspect: a missing modality is not a problem (exit 0) but is counted by group
    assert main(["data", "inspect", str(_yaml(table)), "--json", str(tmp_path / "r.json")]) == 0
    by_group = json.loads((tmp_path / "r.json").read_text())["missingness"]["g"]
    n_b = int((frame["g"] == "b").sum())
    assert by_group["scan"]["groups"]["b"]["rows"] == pytest.approx(2 / n_b)
    assert by_group["scan"]["groups"]["a"]["rows"] == 0 and by_group["photo"]["p"] == 1.0
    assert (
        "missing scan by g: rows a 0% (0% of cells), b 20% (20% of cells)"
        in capsys.readouterr().out
    )
