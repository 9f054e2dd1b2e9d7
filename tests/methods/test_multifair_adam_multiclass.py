"""`multifair_adam` on K-class labels: the macro one-vs-rest versions of its signals (levels,
validation levels, group gaps and weights, the fused gap loss) and that binary training is
unchanged bit for bit.

Oracles: scikit-learn's macro OvR AUC (`multifair.metrics.roc_auc`), plain-Python pair loops,
and fingerprints of a binary training run recorded with the code as it was before multi-class
support (commit 295923f)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import make_ctx, tiny_batch, tiny_model

from multifair.methods.base import build_method
from multifair.training.config import TrainConfig
from multifair.training.distributed import DistEnv
from multifair.training.inference import Predictions
from multifair.training.trainer import build_optimizer, train_step

G = 3

# ---- K = 2: exactly what the binary method did -------------------------------------------

BINARY_CONFIGS = {
    "default": {},
    "readme_val": {"levels": "validation", "group_weights": "validation"},
    "everything": {"unimodal_weight": 1.0, "gap_weight": 1.0, "guard": "off", "floor": 0.3},
}


def _binary_val_preds(seed: int, modalities: list[str]) -> tuple[Predictions, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 90
    y = np.arange(n) % 2
    codes = np.arange(n) % G

    def score(strength: float) -> np.ndarray:
        return 1 / (1 + np.exp(-(strength * (y - 0.5) * (1 + codes) + rng.normal(size=n))))

    preds = Predictions(
        index=np.arange(n),
        sample_id=[str(i) for i in range(n)],
        label=y,
        score=score(1.0),
        attributes={"attr": codes},
        aux_scores={m: score(0.5 + i) for i, m in enumerate(modalities)},
    )
    return preds, codes


def _binary_run(params: dict) -> str:
    """Six AdamW steps of the real model on binary batches with a validation after the
    second and fourth; every loss part, signal, state buffer and parameter, hashed."""
    modalities = ["a", "b"]
    torch.set_num_threads(1)
    model = tiny_model(modalities)
    method = build_method("multifair_adam", params, modalities, G, n_classes=2)
    method.setup(model)
    optimizer, groups = build_optimizer(model, method, TrainConfig(lr=1e-2), torch.device("cpu"))
    digest = hashlib.sha256()

    def put(name: str, value: torch.Tensor | float) -> None:
        digest.update(name.encode())
        digest.update(torch.as_tensor(value).detach().double().numpy().tobytes())

    model.train()
    method.train()
    for step in range(6):
        batch = tiny_batch(modalities, size=32, n_groups=G, seed=step)
        ctx = make_ctx(model, G, step=step)
        ctx.total_steps = 12
        result = train_step(
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
        put("total", result.loss.total)
        for key in sorted(result.loss.parts):
            put(key, result.loss.parts[key])
        for key in sorted(result.loss.signals):
            put(key, result.loss.signals[key])
        if step in (1, 3):
            preds, codes = _binary_val_preds(step, modalities)
            stats = method.on_validation(preds, codes)
            for key in sorted(stats):
                digest.update(f"{key}={stats[key]!r}".encode())
    for key, value in sorted(method.state_dict().items()):
        put(key, value)
    for key, value in sorted(model.state_dict().items()):
        put(key, value)
    return digest.hexdigest()


# Recorded by `_binary_run` with the binary-only method of commit 295923f (1 and 2 threads).
BINARY_FINGERPRINTS = {
    "default": "ed9aa1ed8f81952bec6f1132146e6f2023f6295c029debe3da29a75c3563a117",
    "readme_val": "68526e283b93fa4e2961c8a14d9a92715d81c85a1b7575e145c90b8107f3719e",
    "everything": "8d112c865bb79a4c4dfb89cf74733b8345964b2a82349feab57192de39781f35",
}


@pytest.mark.parametrize("name", sorted(BINARY_CONFIGS))
def test_binary_training_is_unchanged_bit_for_bit(name):
    # losses, every signal (levels, factors, gate, gap), validation stats, the method's state
    # and the model's parameters after six steps: identical to the binary-only method's
    assert _binary_run(BINARY_CONFIGS[name]) == BINARY_FINGERPRINTS[name]
