"""The preprocessing cache: same tensors as the npz path, resumable, verified on open."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from multifair.data import DataConfig, build_data, make_loader, prepare_cache
from multifair.data.cache import DEFAULT_DIRNAME, cache_settings, signature
from multifair.errors import UserError


@pytest.fixture
def tree(tmp_path: Path, fairvision_tree) -> Path:
    root = tmp_path / "root"
    shutil.copytree(fairvision_tree[0], root)
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        kind="fairvision", root=root, image_size=12, oct_slices=3, num_workers=0, **kw
    )


def _same_samples(a, b) -> None:
    for split in a.datasets:
        assert len(a.datasets[split]) == len(b.datasets[split])
        for i in range(len(a.datasets[split])):
            x, y = a.datasets[split][i], b.datasets[split][i]
            assert x["sample_id"] == y["sample_id"] and x["label"] == y["label"]
            assert x["attributes"] == y["attributes"]
            for m, spec in a.modalities.items():
                if spec.kind == "text":
                    assert x[m] == y[m]
                else:
                    torch.testing.assert_close(x[m], y[m], rtol=0, atol=0)


def test_cache_holds_exactly_the_npz_tensors(tree: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    summary = prepare_cache(_cfg(tree), cache, workers=0, progress=False)
    assert all(s["bad"] == 0 for s in summary["splits"].values())
    npz = build_data(_cfg(tree, cache="off"))
    cached = build_data(_cfg(tree, cache=str(cache)))
    assert npz.source == "npz" and cached.source == "cache"
    _same_samples(npz, cached)
    assert npz.metadata("test").equals(cached.metadata("test"))
    # batched reads (__getitems__) through a worker give the same batch as the npz path
    a = next(iter(make_loader(npz, "train", batch_size=7, shuffle=True, seed=1)))
    b = next(iter(make_loader(cached, "train", batch_size=7, shuffle=True, seed=1, num_workers=1)))
    assert a["sample_id"] == b["sample_id"]
    torch.testing.assert_close(a["oct"], b["oct"], rtol=0, atol=0)
    arrays = sorted(p.name for p in (Path(summary["directory"]) / "train").glob("*.npy"))
    assert arrays == ["done.npy", "fundus.npy", "oct.npy"]
    assert (
        np.load(Path(summary["directory"]) / "train" / "oct.npy", mmap_mode="r").dtype == np.uint8
    )


def test_default_location_is_found_and_other_settings_ignored(tree: Path, caplog):
    prepare_cache(_cfg(tree), None, workers=0, progress=False)
    assert (tree / DEFAULT_DIRNAME).is_dir()
    assert build_data(_cfg(tree)).source == "cache"
    # another image size: not this cache; the npz path is used
    other = DataConfig(kind="fairvision", root=tree, image_size=10, oct_slices=3)
    assert build_data(other).source == "npz"
    assert "other settings" in caplog.text
    # an explicit cache with the wrong settings is an error naming both
    with pytest.raises(UserError, match="holds caches for other settings"):
        build_data(other.model_copy(update={"cache": str(tree / DEFAULT_DIRNAME)}))


def test_resume_after_interruption(tree: Path, tmp_path: Path):
    cfg = _cfg(tree)
    cache = tmp_path / "cache"
    prepare_cache(cfg, cache, workers=0, progress=False)
    folder = cache / signature(cache_settings(cfg))
    reference = np.load(folder / "train" / "oct.npy").copy()
    # simulate an interruption: half the rows not written, meta not complete, pixels zeroed
    flags = np.load(folder / "train" / "done.npy")
    flags[::2] = 0
    np.save(folder / "train" / "done.npy", flags)
    arr = np.load(folder / "train" / "oct.npy", mmap_mode="r+")
    arr[::2] = 0
    arr.flush()
    del arr
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"]["train"]["complete"] = False
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"partial \(\d+ of \d+ samples written\)"):
        build_data(cfg.model_copy(update={"cache": str(cache)}))
    summary = prepare_cache(cfg, cache, workers=0, progress=False)
    assert summary["splits"]["train"]["written"] == int((flags == 0).sum())
    assert summary["splits"]["val"]["written"] == 0  # complete splits are not rewritten
    np.testing.assert_array_equal(np.load(folder / "train" / "oct.npy"), reference)
    assert build_data(cfg.model_copy(update={"cache": str(cache)})).source == "cache"


def test_stale_cache_is_detected(tree: Path, tmp_path: Path):
    cfg = _cfg(tree, cache=str(tmp_path / "cache"))
    prepare_cache(cfg, tmp_path / "cache", workers=0, progress=False)
    victim = sorted((tree / "Glaucoma" / "Validation").glob("data_*.npz"))[0]
    with np.load(victim) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["glaucoma"] = np.array(1 - int(arrays["glaucoma"]))
    arrays["extra"] = np.zeros(3)  # changes the size, as a re-download would
    np.savez(victim, **arrays)
    with pytest.raises(UserError, match=r"stale: the val source files changed .*data_\d+\.npz"):
        build_data(cfg)
    # a file added to a split is also a change
    prepare_cache(cfg, tmp_path / "cache", workers=0, progress=False)
    assert build_data(cfg).source == "cache"
    shutil.copy(victim, victim.with_name("data_99999.npz"))
    with pytest.raises(UserError, match="stale"):
        build_data(cfg)


def test_truncated_array_is_detected(tree: Path, tmp_path: Path):
    cfg = _cfg(tree, cache=str(tmp_path / "cache"))
    summary = prepare_cache(cfg, tmp_path / "cache", workers=0, progress=False)
    path = Path(summary["directory"]) / "test" / "fundus.npy"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 50)
    with pytest.raises(UserError, match=r"fundus\.npy is missing or truncated"):
        build_data(cfg)
    os.remove(Path(summary["directory"]) / "meta.json")
    with pytest.raises(UserError, match=r"meta\.json is missing"):
        build_data(cfg)


def test_missing_explicit_cache_is_an_error(tree: Path, tmp_path: Path):
    with pytest.raises(UserError, match="does not exist; create it with `multifair data prepare"):
        build_data(_cfg(tree, cache=str(tmp_path / "nowhere")))


def test_bad_files_recorded_with_skip_bad(tree: Path, tmp_path: Path):
    victim = sorted((tree / "Glaucoma" / "Training").glob("data_*.npz"))[1]
    with np.load(victim) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["oct_bscans"] = arrays["oct_bscans"].astype(np.float32)
    arrays["oct_bscans"][0, 0, 0] = np.nan  # passes the scan, fails when read
    np.savez(victim, **arrays)
    cfg = _cfg(tree, cache=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="non-finite pixel value nan"):
        prepare_cache(cfg, tmp_path / "cache", workers=0, progress=False)
    skip = cfg.model_copy(update={"skip_bad": True})
    summary = prepare_cache(skip, tmp_path / "cache", workers=0, progress=False)
    assert summary["splits"]["train"]["bad"] == 1
    bundle = build_data(skip)
    assert victim.stem not in bundle.sample_ids("train")
    assert [s["file"] for s in bundle.skipped] == [str(victim)]
    with pytest.raises(UserError, match="non-finite"):  # without skip_bad the bad file is an error
        build_data(cfg)


def test_fairvlmed_cache_keeps_notes(fairvlmed_tree, tmp_path: Path):
    root, _ = fairvlmed_tree
    cfg = DataConfig(kind="fairvlmed", root=root, image_size=12, cache=str(tmp_path / "c"))
    prepare_cache(cfg, tmp_path / "c", workers=0, progress=False)
    _same_samples(build_data(cfg.model_copy(update={"cache": "off"})), build_data(cfg))


def test_prefetch_thread_yields_the_same_batches_and_errors(tree: Path, tmp_path: Path):
    cfg = _cfg(tree, cache=str(tmp_path / "cache"))
    prepare_cache(cfg, tmp_path / "cache", workers=0, progress=False)
    bundle = build_data(cfg)
    plain = list(make_loader(bundle, "train", batch_size=4, shuffle=True, seed=2))
    threaded = make_loader(
        bundle, "train", batch_size=4, shuffle=True, seed=2, prefetch_thread=True
    )
    assert len(threaded) == len(plain) and threaded.batch_size == 4
    got = list(threaded)
    assert [b["sample_id"] for b in got] == [b["sample_id"] for b in plain]
    torch.testing.assert_close(got[-1]["fundus"], plain[-1]["fundus"], rtol=0, atol=0)
    next(iter(threaded))  # stopping early leaves no thread behind
    import threading

    assert not any(t.name == "multifair-prefetch" and t.is_alive() for t in threading.enumerate())
    # an error in the reading thread reaches the consumer
    npz = build_data(cfg.model_copy(update={"cache": "off"}), ["train"])
    victim = Path(npz.datasets["train"].records.paths[0])
    victim.write_bytes(b"junk")
    with pytest.raises(UserError, match="unreadable npz"):
        list(make_loader(npz, "train", batch_size=4, prefetch_thread=True))
