"""Fixtures for the data tests (tiny trees written by our own generator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datahelpers import make_tree


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fairvision_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fv") / "root"
    return root, make_tree(root, "fairvision", slo_jpg=True)


@pytest.fixture(scope="session")
def fairvlmed_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("vlm") / "root"
    return root, make_tree(root, "fairvlmed", empty_note_rate=0.2)
