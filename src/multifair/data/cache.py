"""The preprocessing cache: exactly the uint8 tensors the model reads, memory-mapped.

Layout (one folder per preprocessing setting, so several image sizes can coexist):

    CACHE/<signature>/meta.json              settings, attributes, per-split status
    CACHE/<signature>/<split>/records.json   ids, labels, attribute codes, age, notes
    CACHE/<signature>/<split>/sources.json   [relative path, size, mtime_ns] of every npz
    CACHE/<signature>/<split>/<modality>.npy (N, C, S, S) / (N, K, S, S) uint8, one file per array
    CACHE/<signature>/<split>/done.npy       (N,) uint8: 0 to do, 1 written, 2 bad (skipped)

Writing is resumable: a row is marked done only after its pixels were flushed, so an
interrupted `prepare` continues where it stopped. Opening verifies the settings, that every
split is complete, that the arrays have their full size, and that the source files are the
ones the cache was built from (same names, sizes, modification times) - a stale or partial
cache is reported, never trusted.

The row stores at the end are the format-agnostic part: a reader (a table with image/volume
path columns) hands over the files' fingerprints, the per-row shapes and a `load_modalities`
reader; the cache writes, verifies and opens the row-aligned arrays without knowing the format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from multifair.data.config import DataConfig
from multifair.data.formats import BadFile, Problems
from multifair.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_DIRNAME = ".multifair_cache"
FLUSH_EVERY_S = 5.0


class CacheInvalid(Exception):
    """A cache that must not be trusted (missing, partial, stale, other settings)."""


def cache_settings(cfg: DataConfig) -> dict[str, Any]:
    """Everything that changes the cached tensors or records."""
    settings: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "kind": cfg.kind,
        "image_size": cfg.image_size,
        "oct_slices": cfg.oct_slices,
        "label_key": cfg.label_key,
    }
    if cfg.kind == "fairvision":
        settings["disease"] = cfg.disease
    spec = cfg.class_spec()
    if spec is not None:  # multi-class labels are cached as class indices (binary: no key)
        settings["classes"] = spec.model_dump()
    if cfg.kind == "fairvlmed":
        settings.update(note=cfg.note, note_from=cfg.note_from, lowercase_note=cfg.lowercase_note)
        if not cfg.note_fallback:  # only when not the default, so existing caches stay valid
            settings["note_fallback"] = False
    if not cfg.absent_is_missing:  # an absent npz key is then a bad file, not absent
        settings["missing_modalities"] = "impute"
    return settings


def signature(settings: Mapping[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings['kind']}-s{settings['image_size']}-k{settings['oct_slices']}-{digest}"


def _fingerprints(root: Path, files: Sequence[Path]) -> list[list[Any]]:
    out = []
    for path in files:
        st = path.stat()
        out.append([os.path.relpath(path, root), st.st_size, st.st_mtime_ns])
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheInvalid(f"{path} is missing (partial cache)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheInvalid(f"{path} is unreadable ({exc})") from None


def _save_flags(path: Path, flags: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, flags)
    os.replace(tmp, path)


@dataclass
class CachedData:
    """A verified cache: per split the records of usable rows, their cache rows, array paths."""

    directory: Path
    attributes: list[str]
    records: dict[str, Any]  # split -> subjects.Records (usable rows only)
    rows: dict[str, np.ndarray]  # split -> cache row per record
    arrays: dict[str, dict[str, Path]]  # split -> modality -> .npy path
    bad: dict[str, list[dict[str, Any]]]  # split -> skipped files


def _signature_dir(base: Path, sig: str) -> Path:
    if (base / "meta.json").is_file():  # pointed straight at one signature folder
        return base
    target = base / sig
    if target.is_dir():
        return target
    others = (
        sorted(p.name for p in base.iterdir() if (p / "meta.json").is_file())
        if base.is_dir()
        else []
    )
    if others:
        raise CacheInvalid(
            f"{base} holds caches for other settings {others}; this config needs {sig}"
        )
    raise CacheInvalid(f"{base} holds no cache ({sig} not found)")


def open_cache(
    base: Path,
    cfg: DataConfig,
    root: Path,
    files: Mapping[str, list[Path]],
    read_records: Callable[[Any], Any],
) -> CachedData:
    """Verify and open a cache for the given split files. Raises `CacheInvalid` with the reason.

    `read_records` is the reader's: records.json -> its records (sized, with `take(rows)`)."""
    settings = cache_settings(cfg)
    directory = _signature_dir(Path(base), signature(settings))
    meta = _read_json(directory / "meta.json")
    if meta.get("settings") != settings:
        raise CacheInvalid(
            f"{directory} was built with settings {meta.get('settings')}, the config needs {settings}"
        )
    records: dict[str, Any] = {}
    rows: dict[str, np.ndarray] = {}
    arrays: dict[str, dict[str, Path]] = {}
    bad: dict[str, list[dict[str, Any]]] = {}
    for split, split_files in files.items():
        info = meta.get("splits", {}).get(split)
        if info is None:
            raise CacheInvalid(f"{directory} does not hold the {split} split")
        folder = directory / split
        if not info.get("complete"):
            flags = np.load(folder / "done.npy") if (folder / "done.npy").is_file() else np.zeros(0)
            raise CacheInvalid(
                f"{directory}: the {split} split is partial ({int((flags > 0).sum())} of "
                f"{info.get('n', '?')} samples written); run `multifair data prepare` again to resume"
            )
        sources = _read_json(folder / "sources.json")
        now = _fingerprints(root, split_files)
        if sources != now:
            old = {s[0]: s[1:] for s in sources}
            new = {s[0]: s[1:] for s in now}
            changed = sorted(set(old) ^ set(new)) or sorted(k for k in new if old.get(k) != new[k])
            raise CacheInvalid(
                f"{directory} is stale: the {split} source files changed since it was built "
                f"({len(changed)} file(s), e.g. {changed[0]}); run `multifair data prepare` again"
            )
        rec = read_records(_read_json(folder / "records.json"))
        flags = np.load(folder / "done.npy")
        if flags.shape != (len(rec),) or not np.isin(flags, (1, 2)).all():
            raise CacheInvalid(f"{folder}/done.npy does not mark every row written (partial cache)")
        arrays[split] = {}
        for name, shape in info["arrays"].items():
            path = folder / f"{name}.npy"
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CacheInvalid(f"{path} is missing or truncated ({exc})") from None
            if list(arr.shape) != [len(rec), *shape] or arr.dtype != np.uint8:
                raise CacheInvalid(
                    f"{path} has shape {arr.shape} {arr.dtype}, expected {[len(rec), *shape]} uint8"
                )
            arrays[split][name] = path
        ok = np.flatnonzero(flags == 1)
        records[split], rows[split] = rec.take(ok), ok
        bad[split] = list(info.get("bad", []))
    return CachedData(directory, list(meta["attributes"]), records, rows, arrays, bad)


def find_cache(
    cfg: DataConfig,
    root: Path,
    files: Mapping[str, list[Path]],
    read_records: Callable[[Any], Any],
) -> CachedData | None:
    """The cache the config asks for (or the default one under ROOT), verified; None to read npz."""
    if cfg.cache == "off":
        return None
    explicit = cfg.cache is not None
    base = Path(cfg.cache) if explicit else Path(root) / DEFAULT_DIRNAME  # type: ignore[arg-type]
    if not base.exists():
        if explicit:
            raise UserError(
                f"data.cache: {base} does not exist; create it with `multifair data prepare {root} {base}`"
            )
        return None
    try:
        return open_cache(base, cfg, root, files, read_records)
    except CacheInvalid as exc:
        if explicit:
            raise UserError(f"data.cache: {exc}") from None
        log.warning("not using the cache under %s: %s", base, exc)
        return None


# ---- writing --------------------------------------------------------------------------------------
class _Guarded(Dataset):
    """Yields (row, sample) or (row, BadFile) so one bad file does not kill the workers."""

    def __init__(self, dataset: Any, rows: np.ndarray) -> None:
        self.dataset = dataset
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        row = int(self.rows[i])
        try:
            return row, self.dataset.load_modalities(row)
        except BadFile as exc:
            return row, exc


class CacheSource(Protocol):
    """What a format reader hands the cache writer: its files, records and pixels. The cache
    stores them and knows no format (`multifair.data.subjects.SubjectSource` is one)."""

    root: Path
    files: Mapping[str, list[Path]]  # split -> source files, fingerprinted against staleness
    keys: Mapping[str, str]  # modality -> key in a source file, for error messages

    # records: sized, with `paths` (one per row), `to_json()` and `take(rows)`
    def attributes(self) -> list[str]: ...  # the attributes the files store
    def scan(self, split: str, attributes: list[str], problems: Problems) -> Any: ...
    def read_records(self, data: Any) -> Any: ...  # records.json -> records
    def dataset(self, records: Any) -> Any: ...  # load_modalities(row) -> {modality: uint8}
    def shapes(self, records: Any) -> dict[str, list[int]]: ...  # one cached array per row


def write_cache(
    source: CacheSource,
    cfg: DataConfig,
    cache_base: Path | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or resume) the cache of what `source` reads; returns a summary {directory, splits: {...}}.

    Every modality of the dataset is cached, so any `data.modalities` subset can use it.
    Bad files raise unless `cfg.skip_bad`, in which case they are recorded in meta.json.
    `multifair.data.prepare_cache(cfg)` finds the source for `cfg.kind`.
    """
    root = source.root
    base = Path(cache_base) if cache_base is not None else root / DEFAULT_DIRNAME
    settings = cache_settings(cfg)
    directory = base / signature(settings)
    directory.mkdir(parents=True, exist_ok=True)
    keys = source.keys
    attributes = source.attributes()
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("settings") != settings or meta.get("attributes") != attributes:
        meta = {"settings": settings, "attributes": attributes, "splits": {}, "root": str(root)}
    summary: dict[str, Any] = {"directory": str(directory), "splits": {}}
    t0 = time.perf_counter()
    for split in splits:
        folder = directory / split
        sources = _fingerprints(root, source.files[split])
        info = meta["splits"].get(split)
        resume = (
            info is not None
            and (folder / "sources.json").is_file()
            and _read_json(folder / "sources.json") == sources
            and (folder / "done.npy").is_file()
        )
        if info is not None and info.get("complete") and resume:
            summary["splits"][split] = {
                "n": info["n"],
                "written": 0,
                "bad": len(info.get("bad", [])),
            }
            continue
        split_problems = Problems(skip=cfg.skip_bad)
        if resume:  # same sources: the records written before the interruption still hold
            records = source.read_records(_read_json(folder / "records.json"))
        else:
            records = source.scan(split, attributes, split_problems)
        if len(records) == 0:
            raise UserError(f"{root}: no readable sample in the {split} split")
        n = len(records)
        ds = source.dataset(records)
        shapes = source.shapes(records)
        if not resume:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            _write_json(folder / "records.json", records.to_json())
            flags = np.zeros(n, dtype=np.uint8)
            _save_flags(folder / "done.npy", flags)
            for m, shape in shapes.items():
                np.lib.format.open_memmap(folder / f"{m}.npy", "w+", np.uint8, (n, *shape)).flush()
            _write_json(folder / "sources.json", sources)
            bad_list = [p.as_dict() for p in split_problems.items]
        else:
            flags = np.load(folder / "done.npy")
            bad_list = list(info.get("bad", []))  # type: ignore[union-attr]
        meta["splits"][split] = {"n": n, "complete": False, "arrays": shapes, "bad": bad_list}
        _write_json(meta_path, meta)
        arrays = {m: np.lib.format.open_memmap(folder / f"{m}.npy", "r+") for m in shapes}
        todo = np.flatnonzero(flags == 0)
        loader = DataLoader(
            _Guarded(ds, todo),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )
        written, last_flush = 0, time.perf_counter()
        bar = tqdm(
            total=n,
            initial=n - len(todo),
            desc=f"prepare {split}",
            unit="sample",
            disable=not progress,
        )
        for row, sample in loader:
            if isinstance(sample, BadFile):
                split_problems.add(sample)
                bad_list.append(sample.as_dict())
                flags[row] = 2
            else:
                for m in shapes:
                    t = sample[m].numpy()
                    if list(t.shape) != shapes[m]:
                        exc = BadFile(
                            records.paths[row],
                            keys[m],
                            f"preprocessed shape {list(t.shape)} differs from the first file's {shapes[m]}",
                        )
                        split_problems.add(exc)
                        bad_list.append(exc.as_dict())
                        flags[row] = 2
                        break
                    arrays[m][row] = t
                else:
                    flags[row] = 1
            written += 1
            bar.update(1)
            if time.perf_counter() - last_flush > FLUSH_EVERY_S:
                for arr in arrays.values():
                    arr.flush()
                _save_flags(folder / "done.npy", flags)
                meta["splits"][split]["bad"] = bad_list
                _write_json(meta_path, meta)
                last_flush = time.perf_counter()
        bar.close()
        for arr in arrays.values():
            arr.flush()
        del arrays
        _save_flags(folder / "done.npy", flags)
        meta["splits"][split] = {"n": n, "complete": True, "arrays": shapes, "bad": bad_list}
        _write_json(meta_path, meta)
        summary["splits"][split] = {"n": n, "written": written, "bad": len(bad_list)}
    summary["seconds"] = time.perf_counter() - t0
    summary["bytes"] = sum(p.stat().st_size for p in directory.rglob("*.npy"))
    return summary


# ---- row stores: uint8 arrays a reader hands over (format-agnostic) --------------------------------
# The reader (e.g. a table with image-path columns) decides which files, in which order, at
# which shape; this part only writes, verifies and opens row-aligned arrays:
#
#     CACHE/<signature>/meta.json             settings; per store n, complete, arrays, bad files
#     CACHE/<signature>/<store>/sources.json  [relative path, size, mtime_ns] per row
#     CACHE/<signature>/<store>/<array>.npy   (N, ...) uint8, one per array
#     CACHE/<signature>/<store>/done.npy      (N,) uint8: 0 to do, 1 written, 2 bad
def fingerprint_files(root: Path, files: Sequence[str | Path]) -> list[list[Any]]:
    """[path relative to root, size, mtime_ns] per file; size and mtime None when it is missing
    (the reader reports that file as bad when it is decoded)."""
    out = []
    for path in map(Path, files):
        try:
            st = path.stat()
        except FileNotFoundError:
            out.append([os.path.relpath(path, root), None, None])
            continue
        out.append([os.path.relpath(path, root), st.st_size, st.st_mtime_ns])
    return out


@dataclass
class RowStore:
    """One store as a reader hands it over: the fingerprint of each row's source file, the
    per-row shape of each uint8 array, and `reader.load_modalities(row)` -> {array: uint8
    tensor}, raising `BadFile` for a file it cannot use."""

    name: str
    sources: list[list[Any]]
    shapes: dict[str, list[int]]
    reader: Any


@dataclass
class OpenStore:
    """A verified store: its array files, per-row flags (1 written, 2 bad) and bad files."""

    arrays: dict[str, Path]
    flags: np.ndarray
    bad: list[dict[str, Any]]


def _changed_files(old: list[list[Any]], new: list[list[Any]]) -> list[str]:
    before = {s[0]: s[1:] for s in old}
    now = {s[0]: s[1:] for s in new}
    return sorted(set(before) ^ set(now)) or sorted(k for k in now if before.get(k) != now[k])


def _open_array(path: Path, shape: list[int]) -> None:
    """Check that a cached array is there in full, with this shape and uint8."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CacheInvalid(f"{path} is missing or truncated ({exc})") from None
    if list(arr.shape) != shape or arr.dtype != np.uint8:
        raise CacheInvalid(f"{path} has shape {arr.shape} {arr.dtype}, expected {shape} uint8")


def open_stores(
    base: Path, settings: Mapping[str, Any], sources: Mapping[str, list[list[Any]]]
) -> dict[str, OpenStore]:
    """Verify and open the stores named in `sources` (store -> current fingerprints): same
    settings, complete, arrays in full, built from exactly these files. Raises `CacheInvalid`."""
    directory = _signature_dir(Path(base), signature(settings))
    meta = _read_json(directory / "meta.json")
    if meta.get("settings") != settings:
        raise CacheInvalid(
            f"{directory} was built with settings {meta.get('settings')}, the config needs {settings}"
        )
    out = {}
    for name, now in sources.items():
        info = meta.get("stores", {}).get(name)
        folder = directory / name
        if info is None:
            raise CacheInvalid(f"{directory} does not hold {name}")
        if not info.get("complete"):
            raise CacheInvalid(f"{folder} is partial; run `multifair data prepare` again to resume")
        changed = _changed_files(_read_json(folder / "sources.json"), now)
        if changed:
            raise CacheInvalid(
                f"{directory} is stale: the {name} source files changed since it was built "
                f"({len(changed)} file(s), e.g. {changed[0]}); run `multifair data prepare` again"
            )
        try:
            flags = np.load(folder / "done.npy")
        except (OSError, ValueError) as exc:
            raise CacheInvalid(f"{folder}/done.npy is missing or unreadable ({exc})") from None
        if flags.shape != (len(now),) or not np.isin(flags, (1, 2)).all():
            raise CacheInvalid(f"{folder}/done.npy does not mark every row written (partial cache)")
        for array, shape in info["arrays"].items():
            _open_array(folder / f"{array}.npy", [len(now), *shape])
        arrays = {array: folder / f"{array}.npy" for array in info["arrays"]}
        out[name] = OpenStore(arrays, flags, list(info.get("bad", [])))
    return out


def find_stores(
    cache: str | None,
    default: Path,
    settings: Mapping[str, Any],
    sources: Callable[[], Mapping[str, list[list[Any]]]],
    prepare: str,
) -> dict[str, OpenStore] | None:
    """The stores `data.cache` asks for (None: `default` when it holds a valid cache; "off":
    none), verified against `sources()` (store -> fingerprints; only computed when there is a
    cache to check). An explicit cache that is missing or invalid is an error; a default one
    is skipped with a warning. `prepare` is the command that builds it, for the message."""
    if cache == "off":
        return None
    base = Path(cache) if cache is not None else default
    if not base.exists():
        if cache is not None:
            raise UserError(f"data.cache: {base} does not exist; create it with `{prepare}`")
        return None
    try:
        return open_stores(base, settings, sources())
    except CacheInvalid as exc:
        if cache is not None:
            raise UserError(f"data.cache: {exc}") from None
        log.warning("not using the cache under %s: %s", base, exc)
        return None


def prepare_stores(
    base: Path,
    settings: Mapping[str, Any],
    stores: Sequence[RowStore],
    skip_bad: bool = False,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or resume) the stores; returns {directory, stores: {name: {n, written, bad}},
    seconds, bytes}. A bad file raises unless `skip_bad`; then it is flagged and recorded."""
    directory = Path(base) / signature(settings)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("settings") != settings:
        meta = {"settings": dict(settings), "stores": {}}
    summary: dict[str, Any] = {"directory": str(directory), "stores": {}}
    t0 = time.perf_counter()
    for store in stores:
        folder, n = directory / store.name, len(store.sources)
        info = meta["stores"].get(store.name)
        resume = (
            info is not None
            and info["arrays"] == store.shapes
            and (folder / "done.npy").is_file()
            and (folder / "sources.json").is_file()
            and _read_json(folder / "sources.json") == store.sources
        )
        if resume and info["complete"]:
            summary["stores"][store.name] = {"n": n, "written": 0, "bad": len(info["bad"])}
            continue
        if not resume:  # new or changed sources: start this store over
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            _save_flags(folder / "done.npy", np.zeros(n, dtype=np.uint8))
            for array, shape in store.shapes.items():
                np.lib.format.open_memmap(
                    folder / f"{array}.npy", "w+", np.uint8, (n, *shape)
                ).flush()
            _write_json(folder / "sources.json", store.sources)
        entry = {
            "n": n,
            "complete": False,
            "arrays": store.shapes,
            "bad": info["bad"] if resume else [],
        }
        meta["stores"][store.name] = entry
        _write_json(meta_path, meta)
        written = _fill_store(folder, store, entry, lambda: _write_json(meta_path, meta), skip_bad, workers, progress)  # fmt: skip
        entry["complete"] = True
        _write_json(meta_path, meta)
        summary["stores"][store.name] = {"n": n, "written": written, "bad": len(entry["bad"])}
    summary["seconds"] = time.perf_counter() - t0
    summary["bytes"] = sum(p.stat().st_size for p in directory.rglob("*.npy"))
    return summary


def _fill_store(
    folder: Path,
    store: RowStore,
    entry: dict[str, Any],
    save_meta: Any,
    skip_bad: bool,
    workers: int,
    progress: bool,
) -> int:
    """Decode the rows not yet done into the store's arrays; returns how many were handled.
    Rows are flagged done only after their pixels are flushed, so an interruption resumes."""
    flags = np.load(folder / "done.npy")
    arrays = {a: np.lib.format.open_memmap(folder / f"{a}.npy", "r+") for a in store.shapes}

    def flush() -> None:
        for arr in arrays.values():
            arr.flush()
        _save_flags(folder / "done.npy", flags)
        save_meta()

    todo = np.flatnonzero(flags == 0)
    loader = DataLoader(
        _Guarded(store.reader, todo),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    last_flush = time.perf_counter()
    for row, sample in tqdm(loader, total=len(todo), desc=f"prepare {store.name}", disable=not progress):  # fmt: skip
        if not isinstance(sample, BadFile):
            shapes = {a: list(sample[a].shape) for a in arrays}
            if shapes != store.shapes:
                sample = BadFile(store.sources[row][0], None, f"preprocessed shape {shapes} differs from the store's {store.shapes}")  # fmt: skip
        if isinstance(sample, BadFile):
            if not skip_bad:
                flush()
                raise sample
            entry["bad"].append(sample.as_dict())
            flags[row] = 2
        else:
            for a, arr in arrays.items():
                arr[row] = sample[a].numpy()
            flags[row] = 1
        if time.perf_counter() - last_flush > FLUSH_EVERY_S:
            flush()
            last_flush = time.perf_counter()
    flush()
    return len(todo)
