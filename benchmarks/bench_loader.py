"""Data loading speed: the released per-sample npz pipeline vs the uint8 memory-mapped cache.

Writes a few dozen FULL-SIZE FairVision subjects (200x200x200 uint8 OCT, 200x200 fundus,
uncompressed npz) to a temporary folder, then measures in one process, one thread:

  npz, released   np.load + the released float pipeline (10 slices resized to 224, per-slice
                  z-score, fundus gray->RGB, resize, ImageNet normalisation)
  npz, ours       np.load + our CPU half (the same tensors as uint8; float work left to the GPU)
  cache           one sample's 10x224x224 OCT + 1x224x224 fundus from the memory-mapped cache
  cache, batched  the same through Dataset.__getitems__ (one sorted read per batch)
  table, decoded  a table whose path columns name a 512x512 RGB PNG and the subject's npz
                  (OCT key), decoded and resized per sample - the same pixels as above
  table, cache    that table after `multifair data prepare CONFIG` (the uint8 memory map)

and a DataLoader over the cache with 0, 1 and 2 worker processes (batch 32, uint8 batches
delivered to the main process), plus the machine's floor for worker processes: workers that
only allocate and hand over batches of the same size through shared memory. The files sit in the page cache after the first pass; every
figure is the best of a few repeats. Prints one table; ratios are against `npz, released`.

    python benchmarks/bench_loader.py [--n 24] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from multifair.data import DataConfig, build_data, make_loader, prepare_cache
from multifair.data.bundle import batch_tensor
from multifair.data.synthetic import SynthKnobs, generate
from multifair.data.transforms import released_preprocess_numpy


def rate(fn, n_items: int, repeats: int = 3) -> float:
    """Best-of-`repeats` items per second of `fn()` processing `n_items` items."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def loader_rate(
    bundle, workers: int, seconds: float, batch: int = 32, thread: bool = False
) -> float:
    """Samples/s delivered by make_loader (random indices with replacement, endless)."""
    ds = bundle.datasets["train"]
    sampler = RandomSampler(ds, replacement=True, num_samples=10**9)
    loader = make_loader(
        bundle,
        "train",
        batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=False,
        prefetch_thread=thread,
    )
    it = iter(loader)
    for _ in range(3 + 2 * workers):  # warm up: workers started, pages cached
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["label"].shape[0]
    out = n / (time.perf_counter() - t0)
    del it, loader
    return out


class _Indices(Dataset):
    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> int:
        return i


class _EmptyBatch:
    """Collate that only allocates (in shared memory) and fills a batch of the cached size."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, indices: list[int]) -> torch.Tensor:
        return batch_tensor((len(indices), *self.shape), torch.uint8).fill_(1)


def shm_floor(shape: tuple[int, ...], workers: int, seconds: float, batch: int = 32) -> float:
    """Samples/s of a DataLoader whose workers do nothing but hand over batches of this size:
    the machine's inter-process ceiling for the cached loader."""
    loader = DataLoader(_Indices(), batch_size=batch, num_workers=workers, collate_fn=_EmptyBatch(shape),
                        prefetch_factor=4)  # fmt: skip
    it = iter(loader)
    for _ in range(3 + 2 * workers):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it).shape[0]
    return n / (time.perf_counter() - t0)


def write_table(root: Path, paths: list[str]) -> DataConfig:
    """A table over the FairVision subjects: a 512x512 RGB PNG fundus photo (the subject's
    fundus, upsampled) and the subject's npz as the OCT path column."""
    from PIL import Image

    (root / "png").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, path in enumerate(paths):
        with np.load(path, allow_pickle=False) as z:
            fundus, label = z["slo_fundus"].astype(np.uint8), int(z["glaucoma"])
        rgb = Image.fromarray(fundus).convert("RGB").resize((512, 512), Image.BILINEAR)
        rgb.save(root / "png" / f"{i:05d}.png")
        rows.append({"id": f"s{i}", "photo": f"png/{i:05d}.png", "oct": path, "y": label, "g": i % 2})  # fmt: skip
    import pandas as pd

    pd.DataFrame(rows).to_csv(root / "table.csv", index=False)
    return DataConfig(
        kind="table",
        path=str(root / "table.csv"),
        label="y",
        attribute="g",
        id_column="id",
        columns={
            "photo": {"kind": "image", "column": "photo"},
            "oct": {"kind": "volume", "column": "oct", "key": "oct_bscans"},
        },
        split={"fractions": {"train": 1.0}},
        image_size=224,
        oct_slices=10,
        num_workers=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24, help="full-size subjects to write")
    parser.add_argument("--seconds", type=float, default=3.0, help="per DataLoader measurement")
    parser.add_argument("--keep", type=Path, help="write the data here and keep it")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core figures

    tmp = Path(tempfile.mkdtemp(prefix="mf_bench_")) if args.keep is None else args.keep
    try:
        t0 = time.perf_counter()
        generate(SynthKnobs(flavour="fairvision", size="full", n=args.n, split=[1.0, 0.0, 0.0]),
                 tmp / "fv", force=True, progress=False)  # fmt: skip
        t_gen = time.perf_counter() - t0
        cfg = DataConfig(
            kind="fairvision", root=tmp / "fv", image_size=224, oct_slices=10, num_workers=0
        )
        npz = build_data(cfg.model_copy(update={"cache": "off"}), ["train"])
        paths = npz.datasets["train"].records.paths
        n = len(paths)

        def released() -> None:
            for p in paths:
                with np.load(p, allow_pickle=False) as z:
                    released_preprocess_numpy(z["slo_fundus"], z["oct_bscans"], 224, 10)

        ours = npz.datasets["train"]

        def npz_ours() -> None:
            for i in range(n):
                ours[i]

        t0 = time.perf_counter()
        prepare_cache(cfg, tmp / "cache", ["train"], workers=0, progress=False)
        t_prep = time.perf_counter() - t0
        cached = build_data(cfg.model_copy(update={"cache": str(tmp / "cache")}), ["train"])
        assert cached.source == "cache"
        ds = cached.datasets["train"]
        reps = max(1, 2000 // n)

        def cache_single() -> None:
            for _ in range(reps):
                for i in range(n):
                    ds[i]

        def cache_batched() -> None:
            idx = list(range(n))
            for _ in range(reps):
                ds.__getitems__(idx)

        table_cfg = write_table(tmp / "table", paths)
        decoded = build_data(table_cfg.model_copy(update={"cache": "off"}), ["train"])
        t0 = time.perf_counter()
        prepare_cache(table_cfg, None, workers=0, progress=False)
        t_table = time.perf_counter() - t0
        table = build_data(table_cfg, ["train"])
        assert decoded.source == "table" and table.source == "cache"
        decoded_ds, table_ds = decoded.datasets["train"], table.datasets["train"]

        def table_decoded() -> None:
            for i in range(n):
                decoded_ds[i]

        def table_cached() -> None:
            for _ in range(reps):
                for i in range(n):
                    table_ds[i]

        released()  # page cache warm-up
        rows = [
            ("npz, released (float, per sample)", rate(released, n)),
            ("npz, ours (uint8 out, per sample)", rate(npz_ours, n)),
            ("cache (per sample)", rate(cache_single, n * reps)),
            (f"cache (batched __getitems__, {n}/read)", rate(cache_batched, n * reps)),
            ("DataLoader, cache, 0 workers, batch 32", loader_rate(cached, 0, args.seconds)),
            (
                "DataLoader, cache, 0 workers + prefetch thread",
                loader_rate(cached, 0, args.seconds, thread=True),
            ),
            ("DataLoader, cache, 1 worker, batch 32", loader_rate(cached, 1, args.seconds)),
            ("DataLoader, cache, 2 workers, batch 32", loader_rate(cached, 2, args.seconds)),
            ("table, image paths: PNG + npz decoded (per sample)", rate(table_decoded, n)),
            ("table, image paths: cache (per sample)", rate(table_cached, n * reps)),
            ("DataLoader, table cache, 0 workers, batch 32", loader_rate(table, 0, args.seconds)),
            (
                "floor: 2 workers passing empty batches",
                shm_floor((11, 224, 224), 2, args.seconds),
            ),
        ]
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    base = rows[0][1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    print(f"data: {n} full-size FairVision subjects (OCT 200x200x200 uint8, fundus 200x200), "
          f"model input 224 px, 10 OCT slices; generated in {t_gen:.0f} s, cached in {t_prep:.1f} s")  # fmt: skip
    print(f"table: the same subjects as rows, a 512x512 RGB PNG + the npz per row; "
          f"`data prepare` of the table in {t_table:.1f} s")  # fmt: skip
    print()
    w = max(len(name) for name, _ in rows)
    print(f"| {'path':<{w}} | {'samples/s':>10} | {'ms/sample':>9} | {'vs npz, released':>16} |")
    print(f"|{'-' * (w + 2)}|{'-' * 11}:|{'-' * 10}:|{'-' * 17}:|")
    for name, r in rows:
        print(f"| {name:<{w}} | {r:>10.1f} | {1000 / r:>9.3f} | {r / base:>15.1f}x |")


if __name__ == "__main__":
    main()
