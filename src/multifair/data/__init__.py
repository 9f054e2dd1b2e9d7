"""Data: FairVision / FairVLMed npz trees, your own table, synthetic data, and the cache.

The API the rest of multifair calls::

    from multifair.data import DataConfig, build_data, make_loader

    cfg = DataConfig(kind="fairvision", root="data/fairvision", image_size=224)
    bundle = build_data(cfg, splits=("train", "val", "test"))
    bundle.datasets["train"]          # torch Dataset of sample dicts
    bundle.modalities                 # {"fundus": ModalitySpec(kind="image", shape=(3, 224, 224)),
                                      #  "oct": ModalitySpec(kind="volume", shape=(10, 224, 224))}
    bundle.attributes                 # evaluated attributes, e.g. ["race", "gender", ...]
    bundle.group_names                # {"race": {0: "Asian", 1: "Black", 2: "White"}, ...}
    bundle.train_attribute            # whose codes are batch["group"]; bundle.n_groups
    loader = make_loader(bundle, "train", batch_size=32, shuffle=True, seed=0)
    for batch in loader:              # uint8 images, float32 tabular, list[str] text
        batch = bundle.to_device(batch, "cuda", train=True)   # normalise + augment on the GPU
        # batch["fundus"]: float (B, 3, S, S); batch["oct"]: float (B, K, S, S);
        # batch["label"], batch["group"]: (B,) int64; batch["attributes"][a]: (B,) int64;
        # batch["sample_id"]: list[str]; batch["index"]: (B,) int64

Under DDP pass `sampler=DistributedSampler(bundle.datasets["train"], shuffle=True, seed=seed)`
to `make_loader` (and call `sampler.set_epoch(epoch)`); `bundle.collate` is the collate_fn.
Reading from the cache, `make_loader(..., num_workers=0, prefetch_thread=True)` is the fastest
(a background thread instead of worker processes; see docs/benchmarks.md "Data loading").

Fitted preprocessing (tables: encoders, imputation, standardisation, fitted on train only)
travels with the run: store `bundle.state()` (JSON-able) and rebuild with
`build_data(cfg, splits, state=saved)` - e.g. `splits=("all",)` on a new table for `predict`.

Sample arrays are loaded from the memory-mapped uint8 cache written by
`multifair data prepare ROOT [CACHE]` when one is configured (`cache: PATH`) or present under
ROOT/.multifair_cache; otherwise from the npz files. A table's image/npz path columns work
the same way (`multifair data prepare CONFIG.yaml`, default `.multifair_cache` beside the
table file). See docs/data.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from multifair.data.bundle import Collator, DataBundle, ModalitySpec, PrefetchLoader, make_loader
from multifair.data.config import (
    SPLITS,
    AttributeColumn,
    DataConfig,
    LabelSpec,
    SplitSpec,
    TableModality,
    load_data_config,
)
from multifair.errors import UserError

__all__ = [
    "SPLITS",
    "AttributeColumn",
    "Collator",
    "DataBundle",
    "DataConfig",
    "LabelSpec",
    "ModalitySpec",
    "PrefetchLoader",
    "SplitSpec",
    "TableModality",
    "build_data",
    "load_data_config",
    "make_loader",
    "prepare_cache",
]


def build_data(
    cfg: DataConfig,
    splits: Sequence[str] = SPLITS,
    state: Mapping[str, Any] | None = None,
) -> DataBundle:
    """Load the requested splits of the dataset `cfg` describes.

    `state` is a previous `bundle.state()`: its fitted preprocessing and group vocabulary are
    reused instead of fitted again (tables), so new data get the same transform.
    Bad files raise `UserError` naming file, key and value - or, with `skip_bad`, are skipped,
    counted and listed in `bundle.skipped`.
    """
    splits = tuple(dict.fromkeys(splits))
    if not splits:
        raise UserError("build_data: no split requested")
    allowed = set(SPLITS) | ({"all"} if cfg.kind == "table" else set())
    bad = [s for s in splits if s not in allowed]
    if bad:
        raise UserError(f"unknown split(s) {bad}; use {sorted(allowed)}")
    if cfg.kind == "table":
        from multifair.data import table

        return table.build(cfg, splits, state)
    if state is not None:
        from multifair.data.bundle import check_state

        check_state(state, cfg.kind)
    if cfg.kind == "fairvision":
        from multifair.data import fairvision

        return fairvision.build(cfg, splits, state)
    from multifair.data import fairvlmed

    return fairvlmed.build(cfg, splits, state)


def prepare_cache(
    cfg: DataConfig,
    cache_base: Any = None,
    splits: Sequence[str] = SPLITS,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or resume) the uint8 cache of a FairVision / FairVLMed tree, or of a table's
    image/volume path columns (`multifair data prepare`); returns a summary {directory,
    splits: {...}, seconds, bytes} - for a table {directory, stores: {modality: ...}, ...}
    (every row is cached, whatever its split, so `splits` does not apply).

    The format's reader locates and scans the files and hands the cache writer records and
    pixels (`subjects.SubjectSource`, `table.prepare_image_cache`); the cache itself knows no
    format."""
    from multifair.console import bars_enabled
    from multifair.data.cache import write_cache
    from multifair.data.subjects import SubjectSource

    if cfg.kind == "table":
        from multifair.data.table import prepare_image_cache

        return prepare_image_cache(cfg, cache_base, workers, bars_enabled(progress))
    if cfg.kind == "fairvision":
        from multifair.data.fairvision import inputs
    else:
        from multifair.data.fairvlmed import inputs
    source = SubjectSource(cfg, inputs(cfg, splits))
    return write_cache(source, cfg, cache_base, splits, workers, bars_enabled(progress))
