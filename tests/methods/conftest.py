"""Fixtures for the method tests: the real `MultimodalClassifier` with tiny MLP encoders over
tabular modalities, synthetic batches in the contract's dict format, and a `StepContext` for
one process (gather and scale are the identity)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from multifair.methods.base import StepContext
from multifair.models.classifier import MultimodalClassifier
from multifair.models.factory import build_model
from multifair.training.distributed import DistEnv
from multifair.training.trainer import train_step

IN_FEATURES = 5


def tiny_model(
    modalities: Sequence[str] = ("a", "b"),
    *,
    seed: int = 0,
    dim: int = 8,
    fusion: str = "attention",
    dropout: float = 0.0,
) -> MultimodalClassifier:
    """The project's model, built through its factory with one-hidden-layer MLP encoders."""
    torch.manual_seed(seed)
    specs = {m: SimpleNamespace(kind="tabular", shape=(IN_FEATURES,)) for m in modalities}
    cfg = {
        "preset": "small",
        "dim": dim,
        "heads": 2,
        "layers": 1,
        "fusion": fusion,
        "dropout": dropout,
        "encoders": {m: {"hidden": [8], "dropout": dropout} for m in modalities},
    }
    return build_model(cfg, specs)


def tiny_batch(
    modalities: Sequence[str] = ("a", "b"),
    *,
    size: int = 24,
    n_groups: int = 3,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> dict[str, Any]:
    """A batch in the contract's format; the label shifts every modality's mean, so the model
    has something to learn. Group -1 (unknown) appears when n_groups > 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (size,), generator=g) if labels is None else labels
    if groups is None:
        groups = torch.randint(-1, max(n_groups, 1), (size,), generator=g)
        if n_groups == 0:
            groups = torch.full((size,), -1)
    batch: dict[str, Any] = {
        m: torch.randn(size, IN_FEATURES, generator=g) + 0.8 * y[:, None].float()
        for m in modalities
    }
    batch.update(
        label=y,
        group=groups,
        attributes={"attr": groups},
        sample_id=[f"s{i:03d}" for i in range(size)],
        index=torch.arange(size),
    )
    return batch


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make_ctx(model: torch.nn.Module, n_groups: int, step: int = 0) -> StepContext:
    return StepContext(
        step=step,
        epoch=0,
        total_steps=100,
        n_groups=n_groups,
        gather=identity,
        scale=identity,
        model=model,
    )


def one_step(batch: dict[str, Any], *, model, method, optimizer, groups, ctx: StepContext):
    """One `train_step` on one batch in one process: no AMP, no loss scaling, clipping 0.8."""
    return train_step(
        [batch],
        model=model,
        method=method,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        groups=groups,
        ctx=ctx,
        lr_scale=1.0,
        clip=0.8,
        amp_dtype=None,
        env=DistEnv(),
    )


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The models here are tiny: intra-op threads only add contention (on a loaded 2-core
    machine 12 AdamW steps took 12 s with 2 threads, 0.4 s with 1). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model_factory() -> Callable[..., MultimodalClassifier]:
    return tiny_model


@pytest.fixture
def batch_factory() -> Callable[..., dict[str, Any]]:
    return tiny_batch
