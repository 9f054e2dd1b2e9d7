"""Checkpoints: written atomically, loadable with `torch.load(weights_only=True)`.

A training checkpoint holds everything `--resume` needs to continue to the same result: model,
optimizer, GradScaler, schedule, the method's state (its buffers: EMAs, previous AUCs), the RNG
states (python, numpy, torch, cuda), the data position (completed epochs, global step, the
sampler seed) and the best-so-far bookkeeping. Only tensors and primitive containers are stored
(weights_only refuses anything else), so numpy's RNG state is converted to a tensor + ints.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multifair.errors import UserError

FORMAT_VERSION = 1


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then `os.replace`: a kill during
    the write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or foreign file: a user-facing problem, not a bug
        raise UserError(f"{path}: not a readable multifair checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: not a multifair checkpoint (format {FORMAT_VERSION} expected)")
    return ckpt


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
