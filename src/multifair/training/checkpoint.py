"""Checkpoints: written atomically, loadable with `torch.load(weights_only=True)`.

A training checkpoint holds everything `--resume` needs to continue to the same result: model,
optimizer, GradScaler, schedule, the method's state (its buffers: EMAs, previous AUCs), the RNG
states (python, numpy, torch, cuda), the data position (completed epochs, global step, the
sampler seed) and the best-so-far bookkeeping. Only tensors and primitive containers are stored
(weights_only refuses anything else), so numpy's RNG state is converted to a tensor + ints.

Frozen parameters (requires_grad False, e.g. a frozen pretrained text encoder: ~90 MB for
MiniLM) are not stored: the model rebuilds them from their source (package or local path), and
loading checks them against the sha256 recorded at save time (`model_state` / `load_model`).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from multifair.errors import UserError

FORMAT_VERSION = 1


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then `os.replace`: a kill during
    the write leaves the previous checkpoint intact. A failed write (disk full, read-only
    folder) is one line naming the file; the previous checkpoint is kept then too."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
        raise UserError(
            f"{path}: cannot write the checkpoint ({exc.strerror or exc}); {kept}"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes), not a multifair checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or foreign file: a user-facing problem, not a bug
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable multifair checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        if isinstance(found, int):  # ours, from another version of multifair
            raise UserError(
                f"{path}: checkpoint format {found}, written by another multifair version; "
                f"this version reads format {FORMAT_VERSION}"
            )
        raise UserError(f"{path}: not a multifair checkpoint (format {FORMAT_VERSION} expected)")
    return ckpt


def tensors_digest(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over named tensors (names, dtypes, shapes, bytes), in the order given."""
    h = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def frozen_signature(model: nn.Module) -> dict[str, Any]:
    """The model's frozen parameters (requires_grad False): their names and sha256. Computed once
    per run (frozen weights do not change) and stored with every checkpoint."""
    state = model.state_dict(keep_vars=True)
    keys = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    return {"keys": keys, "sha256": tensors_digest((k, state[k]) for k in keys) if keys else ""}


def model_state(model: nn.Module, frozen: dict[str, Any]) -> dict[str, Any]:
    """`{"model": state_dict without the frozen parameters, "frozen": their signature}`."""
    skip = set(frozen["keys"])
    return {
        "model": {k: v for k, v in model.state_dict().items() if k not in skip},
        "frozen": frozen,
    }


def load_model(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights into `model`, whose frozen parameters were rebuilt from their
    source; they must be the ones the checkpoint was trained with."""
    frozen = ckpt.get("frozen") or {"keys": [], "sha256": ""}
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as exc:  # shapes differ: trained with another model config
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), exc)
        raise UserError(
            f"{path}: the checkpoint does not fit this model ({first}): was the model config "
            "changed?"
        ) from None
    if unexpected or set(missing) != set(frozen["keys"]):
        absent = sorted(set(missing) - set(frozen["keys"]))
        raise UserError(
            f"{path}: the checkpoint does not fit this model (missing {absent[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}): was the model config changed?"
        )
    if frozen["keys"] and frozen_signature(model)["sha256"] != frozen["sha256"]:
        raise UserError(
            f"{path}: the frozen weights ({len(frozen['keys'])} tensors, e.g. "
            f"{frozen['keys'][0]}) differ from those the run was trained with: the frozen "
            "encoder's source (installed package or local path) has changed"
        )


def rng_state() -> dict[str, Any]:
    """Every RNG the step touches, as tensors and plain ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002  (the legacy global RNG is what user code seeds)
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x: Any) -> Any:
    # python's random state is (version, tuple of 625 ints, gauss or None): store lists
    if isinstance(x, tuple):
        return [_to_plain(v) for v in x]
    return x


def _to_tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x
