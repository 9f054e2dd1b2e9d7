"""What every loader returns: a `DataBundle` of split datasets plus what the model builder,
the trainer and the reports need to know about them.

Samples are dicts (one entry per modality, plus label, group, attributes, sample_id, index);
`Collator` stacks them into the batch of docs/architecture.md, and `DataBundle.to_device`
finishes the preprocessing on the device.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from multifair.data.config import DataConfig
from multifair.data.transforms import to_model
from multifair.errors import UserError

log = logging.getLogger(__name__)

ModalityKind = Literal["image", "volume", "tabular", "text"]
STATE_VERSION = 1


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality looks like, so the model builder can pick an encoder.

    `shape` is the per-sample shape the MODEL receives after `to_device`:
    image (C, H, W) float, volume (K, H, W) float (K slices), tabular (F,) float, text () -
    a string. `stored_shape`/`stored_dtype` describe the collated batch before `to_device`
    (uint8 images stay uint8 until they reach the device).
    """

    name: str
    kind: ModalityKind
    shape: tuple[int, ...]
    channels: int  # image: C; volume: K slices; tabular: F features; text: 0
    stored_shape: tuple[int, ...]
    stored_dtype: str  # "uint8" | "float32" | "str"
    features: tuple[str, ...] = ()  # tabular: the encoded feature names (len F)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["stored_shape"] = list(self.stored_shape)
        out["features"] = list(self.features)
        return out


def batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; inside a DataLoader worker it lives in shared memory, so handing
    it to the main process costs no copy (what torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(*shape)


class CollatedSamples(list):
    """Sample dicts from a batched read whose tensors are rows of ready batch tensors
    (`tensors[modality]`, (B, ...)): `Collator` uses those instead of stacking again."""

    tensors: dict[str, torch.Tensor]


@dataclass
class Collator:
    """Stacks sample dicts into a batch dict (picklable, so DataLoader workers can run it)."""

    kinds: dict[str, ModalityKind]
    attributes: list[str]
    # emit batch["present"] = {modality: (B,) bool} for these modalities: those some sample of
    # the data lacks (`data.missing_modalities: mask`); a modality left out is present in every
    # sample, so its encoder runs on the whole batch (no gather, no host sync)
    presence: tuple[str, ...] = ()

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        ready = samples.tensors if isinstance(samples, CollatedSamples) else {}
        batch: dict[str, Any] = {}
        for name, kind in self.kinds.items():
            if name in ready:
                batch[name] = ready[name]
                continue
            items = [s[name] for s in samples]
            if kind == "text":
                batch[name] = list(items)
            else:
                out = batch_tensor((len(items), *items[0].shape), items[0].dtype)
                batch[name] = torch.stack(items, 0, out=out)
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
        batch["group"] = torch.tensor([s["group"] for s in samples], dtype=torch.int64)
        batch["attributes"] = {
            a: torch.tensor([s["attributes"][a] for s in samples], dtype=torch.int64)
            for a in self.attributes
        }
        if self.presence:
            batch["present"] = {
                m: torch.tensor([s.get("present", {}).get(m, True) for s in samples])
                for m in self.presence
            }
        batch["sample_id"] = [s["sample_id"] for s in samples]
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
        return batch


@dataclass
class DataBundle:
    """The loaded data: split datasets plus their description.

    datasets: split -> torch Dataset of sample dicts.
    modalities: name -> ModalitySpec (insertion order is the dataset's modality order).
    attributes: evaluated attributes; train_attribute: the one whose codes are batch["group"].
    group_names: attribute -> {code: name} (code -1 = unknown is not listed).
    source: "npz", "cache" or "table" - where the samples are read from.
    skipped: the files skipped under `skip_bad` (file, key, problem), for reports.
    intersections: intersectional attribute -> its fitted groups and size rule
    (data/intersections.py: names, training counts, merged groups).
    """

    config: DataConfig
    datasets: dict[str, Dataset]
    modalities: dict[str, ModalitySpec]
    attributes: list[str]
    group_names: dict[str, dict[int, str]]
    train_attribute: str
    source: str
    skipped: list[dict[str, Any]] = field(default_factory=list)
    fitted: dict[str, Any] | None = None  # table preprocessing fitted on train (see table.py)
    intersections: dict[str, dict[str, Any]] = field(default_factory=dict)
    # missing modalities (`data.missing_modalities`): per split, modality -> samples lacking it,
    # and the samples dropped (no modality present, or `drop`); see `describe_missing`
    missing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.collate = Collator(
            kinds={m: s.kind for m, s in self.modalities.items()},
            attributes=list(self.attributes),
            presence=tuple(m for m in self.modalities if m in self.lacking),
        )

    @property
    def classes(self) -> list[str] | None:
        """The class names of a multi-class label (`data.classes`, in logit order); None: binary."""
        spec = self.config.class_spec()
        return None if spec is None else list(spec.names)

    @property
    def n_classes(self) -> int:
        """Logits the model needs: 2 for a binary label, K for a K-class one."""
        classes = self.classes
        return 2 if classes is None else len(classes)

    @property
    def lacking(self) -> set[str]:
        """The modalities some kept sample of some split lacks."""
        counts = self.missing.get("absent", {})
        return {m for per_split in counts.values() for m, n in per_split.items() if n}

    @property
    def has_missing(self) -> bool:
        """True when some kept sample of some split lacks a modality (batches then carry
        `present` for the `lacking` modalities)."""
        return bool(self.lacking)

    def describe_missing(self) -> str:
        """One line: samples lacking each modality, per split."""
        parts = []
        for split, counts in self.missing.get("absent", {}).items():
            absent = ", ".join(f"{m} {n}" for m, n in counts.items() if n)
            if absent:
                parts.append(f"{split}: {absent}")
        return "; ".join(parts) or "none"

    def present(self, split: str) -> dict[str, np.ndarray]:
        """modality -> (N,) bool: which samples of a split have it (all True when none is
        missing)."""
        ds = self.datasets[split]
        n = len(ds)  # type: ignore[arg-type]
        stored = getattr(ds, "present", None) or {}
        return {
            m: np.asarray(stored.get(m, np.ones(n, dtype=bool)), dtype=bool)
            for m in self.modalities
        }

    @property
    def n_groups(self) -> int:
        """Number of groups of the training attribute (codes 0..n_groups-1)."""
        return len(self.group_names[self.train_attribute])

    def to_device(
        self,
        batch: Mapping[str, Any],
        device: torch.device | str,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Move a batch to `device` and finish preprocessing there.

        image: uint8 (B, C, H, W) -> float (B, channels, H, W), gray -> RGB, train-only flip +
        colour jitter (when `augment`), ImageNet normalisation. volume: uint8 (B, K, H, W) ->
        float, per-slice z-score. tabular: float32 (B, F) as is. text: list[str] as is.
        `generator` (on `device`) makes the augmentation reproducible.
        """
        return to_model(
            batch,
            {m: s.kind for m, s in self.modalities.items()},
            device,
            train,
            channels=self.config.channels,
            augment=self.config.augment,
            generator=generator,
        )

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 labels of a split (no sample loading)."""
        return np.asarray(self.datasets[split].labels, dtype=np.int64)  # type: ignore[attr-defined]

    def groups(self, split: str, attribute: str | None = None) -> np.ndarray:
        """(N,) int64 codes of an attribute (default: the training one) for a split."""
        ds = self.datasets[split]
        return np.asarray(ds.codes[attribute or self.train_attribute], dtype=np.int64)  # type: ignore[attr-defined]

    def sample_ids(self, split: str) -> list[str]:
        return list(self.datasets[split].sample_ids)  # type: ignore[attr-defined]

    def metadata(self, split: str) -> Any:
        """A pandas DataFrame per sample: sample_id, label, every attribute's code and name,
        and extra columns the source provides (FairVision/FairVLMed: age)."""
        import pandas as pd

        ds = self.datasets[split]
        frame = pd.DataFrame({"sample_id": self.sample_ids(split), "label": self.labels(split)})
        for a in self.attributes:
            codes = self.groups(split, a)
            frame[a] = codes
            frame[f"{a}_name"] = [self.group_names[a].get(int(c), "unknown") for c in codes]
        for name, values in getattr(ds, "extra", {}).items():
            frame[name] = values
        return frame

    def state(self) -> dict[str, Any]:
        """JSON-able description to store with a run: the config, the group vocabulary and any
        preprocessing fitted on the training split. `build_data(cfg, splits, state=...)` reuses
        it, so predictions on new data go through exactly the same transform."""
        return {
            "version": STATE_VERSION,
            "kind": self.config.kind,
            "config": self.config.model_dump(mode="json"),
            "attributes": list(self.attributes),
            "train_attribute": self.train_attribute,
            "group_names": {
                a: {str(code): name for code, name in names.items()}
                for a, names in self.group_names.items()
            },
            "modalities": {m: s.to_dict() for m, s in self.modalities.items()},
            "fitted": self.fitted,
            "intersections": self.intersections,
        }

    def describe(self) -> str:
        """A few lines for logs: sizes, modalities, groups."""
        lines = [f"data: {self.config.kind} ({self.source})"]
        for split, ds in self.datasets.items():
            lines.append(f"  {split}: {len(ds)} samples")  # type: ignore[arg-type]
        for m, s in self.modalities.items():
            lines.append(f"  {m}: {s.kind} {tuple(s.shape)}")
        names = self.group_names[self.train_attribute]
        lines.append(f"  groups ({self.train_attribute}): {names}")
        for attribute, fitted in self.intersections.items():
            merged = [f"{m['group']} -> {m['into']}" for m in fitted["merged"]]
            if merged:
                lines.append(f"  {attribute}: merged (< {fitted['min_group_size']}): {merged}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} bad file(s)")
        if self.has_missing:
            lines.append(f"  missing modalities (samples): {self.describe_missing()}")
        for split, n in self.missing.get("dropped", {}).items():
            if n:
                lines.append(f"  {split}: dropped {n} sample(s) ({self.missing.get('policy')})")
        return "\n".join(lines)


def missing_policy(
    present: Mapping[str, np.ndarray], policy: str, where: Any, source: str, split: str
) -> tuple[np.ndarray, int]:
    """Apply `data.missing_modalities` to one split's presence: (N,) bool rows to keep, and
    how many were dropped. `present`: modality -> (N,) bool; `where(i)` names sample i in an
    error. "error" refuses the first absent modality; "drop" keeps complete samples; "mask"
    (and "impute", whose loaders mark absent only what they cannot impute) drops the samples
    with no modality at all, with a warning, since nothing is left to predict from."""
    if not present:
        return np.ones(0, dtype=bool), 0
    stacked = np.stack([np.asarray(p, dtype=bool) for p in present.values()])  # (M, N)
    names = list(present)
    if split == "train" and stacked.shape[1] and policy != "drop":
        never = [m for m, row in zip(names, stacked) if not row.any()]
        if never:  # nothing to learn it from: a wrong folder or key, or a modality to leave out
            raise UserError(
                f"{source}: split 'train': no sample has modality {never[0]!r}; check where its "
                "files come from, or leave it out (data.modalities lists the ones to read)"
            )
    if policy == "error" and not stacked.all():
        m, i = (int(v[0]) for v in np.nonzero(~stacked))
        raise UserError(
            f"{source}: {where(i)}: modality {names[m]!r} is missing; set "
            "data.missing_modalities to mask (the model leaves it out), drop or impute"
        )
    keep = stacked.all(0) if policy == "drop" else stacked.any(0)
    dropped = int((~keep).sum())
    if dropped:
        why = "a missing modality" if policy == "drop" else "no modality present"
        log.warning("%s: %s: dropped %d sample(s) with %s", source, split, dropped, why)
    return keep, dropped


def check_state(state: Mapping[str, Any], kind: str) -> None:
    """Refuse a state from another kind or format version (a user mixing runs)."""
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise UserError(
            f"data state: unsupported version {state.get('version') if isinstance(state, Mapping) else state!r}"
        )
    if state.get("kind") != kind:
        raise UserError(f"data state is for kind {state.get('kind')!r}, the config says {kind!r}")


def state_group_names(state: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    return {
        a: {int(code): name for code, name in names.items()}
        for a, names in state["group_names"].items()
    }


class PrefetchLoader:
    """Iterates a DataLoader in a background thread, `depth` batches ahead.

    For the memory-mapped cache a batch is a few large memcpys, which release the GIL: a
    thread overlaps them with the training step without the shared-memory hand-over that
    worker processes pay per batch (see docs/benchmarks.md, "Data loading"). Everything else
    (len, sampler, dataset, batch_size) is the wrapped DataLoader's.
    """

    _DONE = object()

    def __init__(self, loader: DataLoader, depth: int = 4) -> None:
        self.loader = loader
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self.loader:
                    while not stop.is_set():
                        try:
                            batches.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                batches.put(self._DONE)
            except BaseException as exc:  # hand the error (e.g. a BadFile) to the consumer
                batches.put(exc)

        thread = threading.Thread(target=produce, name="multifair-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = batches.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)


def make_loader(
    bundle: DataBundle,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    sampler: Sampler[int] | None = None,
    num_workers: int | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    prefetch_thread: bool = False,
) -> DataLoader | PrefetchLoader:
    """A DataLoader over one split that yields collated (uint8) batches.

    Pass a `sampler` (e.g. `DistributedSampler(bundle.datasets[split], shuffle=True,
    seed=seed)`, with `sampler.set_epoch(epoch)` each epoch) to shard across ranks; then
    `shuffle` must be False. `num_workers` defaults to the config's. `prefetch_thread=True`
    (with `num_workers=0`) reads batches in a background thread instead - the fastest way to
    read the memory-mapped cache (see `PrefetchLoader`).
    """
    if split not in bundle.datasets:
        raise UserError(f"split {split!r} was not loaded (loaded: {sorted(bundle.datasets)})")
    if sampler is not None and shuffle:
        raise ValueError("give either a sampler or shuffle=True, not both")
    workers = bundle.config.num_workers if num_workers is None else num_workers
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        bundle.datasets[split],
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=bundle.collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return PrefetchLoader(loader) if prefetch_thread else loader
