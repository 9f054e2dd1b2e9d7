"""Helpers shared by the data tests: tiny synthetic trees in the real on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multifair.data.synthetic import SynthKnobs, generate

TINY = {
    "n": 40,
    "fundus_shape": [16, 16],
    "oct_shape": [5, 16, 16],
    "split": [0.5, 0.25, 0.25],
    "group_mix": [0.3, 0.3, 0.4],
}


def make_tree(out: Path, flavour: str = "fairvision", **knobs: Any) -> dict[str, Any]:
    """Write a tiny synthetic dataset and return its synth_meta."""
    params = {**TINY, **knobs}
    if flavour == "table":
        params = {k: v for k, v in params.items() if k not in ("fundus_shape", "oct_shape")}
    if flavour == "fairvlmed":
        params.pop("oct_shape", None)
    return generate(SynthKnobs(flavour=flavour, **params), out, progress=False)


def meta_by_id(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["sample_id"]: s for s in meta["samples"]}


def read_meta(root: Path) -> dict[str, Any]:
    return json.loads((root / "synth_meta.json").read_text())
