"""`multifair_adam` on K-class labels: the macro one-vs-rest versions of its signals (levels,
validation levels, group gaps and weights, the fused gap loss) and that binary training is
unchanged bit for bit.

Oracles: scikit-learn's macro OvR AUC (`multifair.metrics.roc_auc`), plain-Python pair loops,
and fingerprints of a binary training run recorded with the code as it was before multi-class
support (commit 295923f)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import make_ctx, one_step, tiny_batch, tiny_model
from sklearn.metrics import roc_auc_score
from torch import nn

from multifair.methods.base import ModelOutput, build_method
from multifair.methods.multifair_adam import (
    MultiFairAdam,
    balance_factors,
    group_gap_loss,
    no_signal_auc_se,
)
from multifair.methods.signals import macro_ovr_auc, macro_pairwise_surrogate_auc, ovr_margins
from multifair.metrics import roc_auc
from multifair.training.config import TrainConfig
from multifair.training.inference import Predictions
from multifair.training.trainer import build_optimizer

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
        result = one_step(
            batch, model=model, method=method, optimizer=optimizer, groups=groups, ctx=ctx
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


# ---- K = 3: the macro one-vs-rest signals -------------------------------------------------

K = 3
MODALITIES = ["good", "chance"]


def _method(**params) -> MultiFairAdam:
    method = build_method("multifair_adam", params, MODALITIES, G, n_classes=K)
    assert isinstance(method, MultiFairAdam)
    return method


def _logits(y: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """(B, K) logits: `strength` on the true class plus unit noise (0: chance)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(len(y), K, generator=gen) + strength * nn.functional.one_hot(y, K)


def _sk_macro(y: np.ndarray, logits: torch.Tensor, mask: np.ndarray | None = None) -> float:
    """Oracle: sklearn's macro one-vs-rest AUC over the classes with both sides."""
    p = torch.softmax(logits.double(), 1).numpy()
    keep = np.ones(len(y), bool) if mask is None else mask
    y, p = y[keep], p[keep]
    aucs = [roc_auc_score(y == k, p[:, k]) for k in range(K) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(aucs))


def test_ovr_margins_are_the_log_odds_of_each_class_and_the_margin_for_two():
    z = torch.randn(7, K, dtype=torch.float64)
    p = torch.softmax(z, 1)
    torch.testing.assert_close(ovr_margins(z), torch.log(p / (1 - p)).float())
    z2 = torch.randn(7, 2)
    torch.testing.assert_close(ovr_margins(z2)[:, 1], z2[:, 1] - z2[:, 0])


def test_macro_ovr_auc_matches_sklearn_with_a_mask_and_a_missing_class():
    y = torch.arange(40) % K
    logits = _logits(y, 1.0, seed=3)
    scores = ovr_margins(logits).T  # (K, B)
    auc, valid = macro_ovr_auc(scores, y)
    assert bool(valid) and float(auc) == pytest.approx(_sk_macro(y.numpy(), logits), abs=1e-6)
    sk = roc_auc_score(y.numpy(), torch.softmax(logits, 1).numpy(), multi_class="ovr")
    assert float(auc) == pytest.approx(sk, abs=1e-6)  # all classes present: sklearn's macro
    mask = (torch.arange(40) % 5 != 0) & (y != 2)  # class 2 absent: the mean of classes 0, 1
    auc, valid = macro_ovr_auc(scores, y, mask)
    assert bool(valid)
    assert float(auc) == pytest.approx(_sk_macro(y.numpy(), logits, mask.numpy()), abs=1e-6)
    one_class = y == 1
    _, valid = macro_ovr_auc(scores, y, one_class)
    assert not bool(valid)  # no class has both sides


def test_macro_pairwise_surrogate_matches_a_pair_loop():
    y = torch.arange(30) % K
    groups = torch.arange(30) % 4 - 1  # -1 unknown, groups 0..2
    scores = ovr_margins(_logits(y, 0.7, seed=4)).T  # (K, B)
    masks = groups[:, None] == torch.arange(G)[None, :]
    got, valid = macro_pairwise_surrogate_auc(scores, y, masks, form="sigmoid", temperature=0.5)
    for g in range(G):
        per_class = []
        for k in range(K):
            pos = [i for i in range(30) if groups[i] == g and y[i] == k]
            neg = [i for i in range(30) if groups[i] == g and y[i] != k]
            pairs = [torch.sigmoid((scores[k, p] - scores[k, n]) / 0.5) for p in pos for n in neg]
            per_class.append(float(sum(pairs)) / len(pairs))
        assert bool(valid[g]) and float(got[g]) == pytest.approx(np.mean(per_class), abs=1e-5)


def _step(method: MultiFairAdam, aux: dict[str, torch.Tensor], y, groups, fused=None, step=0):
    out = ModelOutput(
        logits=_logits(y, 1.0, seed=9) if fused is None else fused,
        features={m: torch.zeros(len(y), 4) for m in MODALITIES},
        aux_logits=aux,
        head_input=torch.zeros(len(y), 4),
    )
    ctx = make_ctx(None, G, step=step)
    ctx.total_steps = 100
    return method.loss(out, {"label": y, "group": groups}, ctx)


def test_batch_levels_are_macro_aucs_and_the_chance_head_gets_the_larger_factor():
    method = _method(guard="off")
    method.train()
    y = torch.arange(48) % K
    groups = torch.arange(48) % G
    for step in range(30):
        aux = {"good": _logits(y, 6.0, seed=step), "chance": _logits(y, 0.0, seed=100 + step)}
        with torch.enable_grad():
            loss = _step(method, aux, y, groups, step=step)
    for m in MODALITIES:  # the last batch's A_i is the sklearn macro AUC of that head
        assert float(loss.signals[f"aux_auc/{m}"]) == pytest.approx(
            _sk_macro(y.numpy(), aux[m]), abs=1e-6
        )
    assert float(loss.signals["level/good"]) > 0.85 > 0.65 > float(loss.signals["level/chance"])
    assert float(loss.signals["lr_factor/chance"]) > 1 > float(loss.signals["lr_factor/good"])
    assert float(loss.signals["lr_factor/good"]) + float(
        loss.signals["lr_factor/chance"]
    ) == pytest.approx(2.0)


def test_missing_modality_levels_use_only_the_present_samples():
    method = _method(guard="off")
    y = torch.arange(48) % K
    good = _logits(y, 6.0, seed=1)
    present = torch.arange(48) % 3 != 0
    scrambled = torch.where(present[:, None], good, -10 * good)  # placeholders: wrong scores
    out = ModelOutput(
        logits=_logits(y, 1.0, seed=9),
        features={m: torch.zeros(48, 4) for m in MODALITIES},
        aux_logits={"good": scrambled, "chance": _logits(y, 0.0, seed=2)},
        head_input=torch.zeros(48, 4),
    )
    batch = {
        "label": y,
        "group": torch.arange(48) % G,
        "present": {"good": present, "chance": torch.ones(48, dtype=torch.bool)},
    }
    loss = method.loss(out, batch, make_ctx(None, G))
    expected = _sk_macro(y.numpy(), good, present.numpy())
    assert float(loss.signals["aux_auc/good"]) == pytest.approx(expected, abs=1e-6)


def _val_preds(n: int = 300, seed: int = 0, groups_strength=(2.0, 2.0, 2.0)):
    """3-class validation predictions: the fused head's strength varies by group; aux head
    `good` is perfect, `chance` is noise."""
    y = torch.arange(n) % K
    codes = (torch.arange(n) // K) % G
    strength = torch.tensor(groups_strength)[codes]
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(n, K, generator=gen) + strength[:, None] * nn.functional.one_hot(y, K)
    preds = Predictions(
        index=np.arange(n),
        sample_id=[str(i) for i in range(n)],
        label=y.numpy(),
        score=torch.softmax(fused.double(), 1).numpy(),
        attributes={"attr": codes.numpy()},
        aux_scores={
            "good": torch.softmax(_logits(y, 20.0, seed + 1).double(), 1).numpy(),
            "chance": torch.softmax(_logits(y, 0.0, seed + 2).double(), 1).numpy(),
        },
        classes=["x", "y", "z"],
    )
    return preds, codes.numpy()


def test_no_signal_se_is_the_binary_formula_for_two_and_the_simulated_spread_for_three():
    n_pos, n_neg = 37, 55
    binary = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    assert no_signal_auc_se(np.array([n_neg, n_pos])) == pytest.approx(binary, rel=1e-12)
    rng = np.random.default_rng(0)
    counts = np.array([70, 50, 30])
    y = np.repeat(np.arange(K), counts)
    draws = [roc_auc(y, rng.dirichlet(np.ones(K), len(y))) for _ in range(400)]
    assert no_signal_auc_se(counts) == pytest.approx(np.std(draws), rel=0.15)


def test_validation_levels_are_macro_aucs_and_push_the_chance_head_after_the_trial():
    method = _method(levels="validation")
    preds, codes = _val_preds()
    stats = method.on_validation(preds, codes)
    for m in MODALITIES:
        assert stats[f"val_level/{m}"] == pytest.approx(roc_auc(preds.label, preds.aux_scores[m]))
    assert stats["val_level/good"] > 0.99 and abs(stats["val_level/chance"] - 0.5) < 0.06
    assert float(method.val_noise) == pytest.approx(no_signal_auc_se(np.array([100] * 3)))
    expected = balance_factors(method.val_level, temperature=0.2, floor=0.5)
    in_trial = method.observe(torch.tensor([0.6, 0.6]), torch.tensor([True, True]), in_trial=True)
    factors = torch.stack([in_trial[f"lr_factor/{m}"] for m in MODALITIES])
    torch.testing.assert_close(factors, expected)
    assert float(factors[1]) > 1 > float(factors[0])  # the chance head gets the steps
    # after the trial window a head at chance (within level_z_on no-signal SEs) is not pushed
    after = method.observe(torch.tensor([0.6, 0.6]), torch.tensor([True, True]), in_trial=False)
    assert float(after["active"]) == 0.0 and float(after["lr_factor/chance"]) == 1.0


def test_validation_split_missing_a_class_changes_nothing():
    method = _method(levels="validation")
    preds, codes = _val_preds()
    keep = preds.label != 2
    preds = Predictions(
        index=preds.index[keep],
        sample_id=[s for s, k in zip(preds.sample_id, keep) if k],
        label=preds.label[keep],
        score=preds.score[keep],
        aux_scores={m: s[keep] for m, s in preds.aux_scores.items()},
    )
    stats = method.on_validation(preds, codes[keep])
    assert "skipped" in stats["val_levels"] and float(method.val_seen) == 0.0


def test_group_weights_follow_the_macro_auc_gap():
    method = _method(group_weights="validation")
    preds, codes = _val_preds(n=600, groups_strength=(0.5, 2.0, 2.0))  # group 0 served worst
    stats = method.on_validation(preds, codes)
    # hand computation: macro OvR gaps soft-thresholded by one no-signal SE, exp(gap / 0.1)
    overall = roc_auc(preds.label, preds.score)
    gaps, counts = [], []
    for g in range(G):
        member = codes == g
        gap = overall - roc_auc(preds.label[member], preds.score[member])
        se = no_signal_auc_se(np.bincount(preds.label[member], minlength=K))
        gaps.append(math.copysign(max(abs(gap) - se, 0.0), gap))
        counts.append(member.sum())
    raw = np.exp(np.array(gaps) / 0.1)
    weights = raw / (raw * np.array(counts) / sum(counts)).sum()
    assert [stats[f"group_gap/{g}"] for g in range(G)] == pytest.approx(gaps, abs=1e-6)
    assert method.group_weight.tolist() == pytest.approx(weights.tolist(), rel=1e-6)
    assert weights[0] > 1.5 and weights[1] < 1 and weights[2] < 1
    # the weights reach the task loss: a group-0 sample's CE counts weights[0] times
    y = torch.arange(48) % K
    groups = torch.arange(48) % G
    fused = _logits(y, 1.0, seed=9)
    aux = {m: _logits(y, 1.0, seed=i) for i, m in enumerate(MODALITIES)}
    loss = _step(method, aux, y, groups, fused=fused)
    per_sample = nn.functional.cross_entropy(fused, y, reduction="none")
    expected = (method.group_weight[groups] * per_sample).mean()
    torch.testing.assert_close(loss.parts["task"], expected)


def test_gap_loss_is_zero_for_identical_groups_and_grows_with_a_lagging_group():
    y_half = torch.arange(30) % K
    base = _logits(y_half, 2.0, seed=5)  # (30, K)
    y = torch.cat([y_half, y_half])
    groups = torch.cat([torch.zeros(30), torch.ones(30)]).long()
    gap = group_gap_loss(torch.cat([base, base]), y, groups, 2, temperature=1.0)
    assert float(gap) == pytest.approx(0.0, abs=1e-6)  # same scores and labels in both groups
    weak = torch.cat([base, _logits(y_half, 0.0, seed=6)])  # group 1 at chance
    logits = weak.clone().requires_grad_(True)
    gap = group_gap_loss(logits, y, groups, 2, temperature=1.0)
    assert float(gap.detach()) > 0.1
    gap.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_k_class_step_has_no_host_sync_on_meta_tensors():
    """Meta tensors have no values: any .item(), bool(tensor) or boolean-mask indexing in the
    K-class step raises."""
    params = {"preset": "fair", "levels": "validation", "group_weights": "validation"}
    b = 16
    for extra in ({}, {"levels": "train", "group_weights": "off"}):
        method = _method(**{**params, **extra}).to("meta")
        out = ModelOutput(
            logits=torch.empty(b, K, device="meta", requires_grad=True),
            features={m: torch.empty(b, 8, device="meta") for m in MODALITIES},
            aux_logits={m: torch.empty(b, K, device="meta") for m in MODALITIES},
            head_input=torch.empty(b, 8, device="meta"),
        )
        batch = {
            "label": torch.empty(b, dtype=torch.long, device="meta"),
            "group": torch.empty(b, dtype=torch.long, device="meta"),
            "present": {m: torch.empty(b, dtype=torch.bool, device="meta") for m in MODALITIES},
        }
        loss = method.loss(out, batch, make_ctx(None, G))
        factors = method.lr_factors(loss, make_ctx(None, G))
        assert loss.total.device.type == "meta"
        assert all(f.device.type == "meta" for f in factors.values())
