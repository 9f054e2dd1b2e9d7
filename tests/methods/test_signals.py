"""Device-side batch statistics against independent oracles (sklearn, float64 pair loops)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from multifair.methods.signals import (
    apply_encoder_factors,
    auc_gap,
    binary_auc,
    gather_batch,
    group_auc,
    group_masks,
    group_shares,
    pairwise_surrogate_auc,
    surrogate_scores,
)


def tied_scores(gen: torch.Generator, size: int, levels: int) -> torch.Tensor:
    """Scores on a coarse grid, so many ties."""
    return torch.randint(0, levels, (size,), generator=gen).float() / levels


@pytest.mark.parametrize("seed", range(8))
def test_binary_auc_matches_sklearn_with_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    size = int(torch.randint(5, 80, (1,), generator=gen))
    scores = tied_scores(gen, size, levels=int(torch.randint(2, 10, (1,), generator=gen)))
    labels = torch.randint(0, 2, (size,), generator=gen)
    labels[0], labels[1] = 0, 1  # both classes
    auc, valid = binary_auc(scores, labels)
    assert bool(valid)
    assert float(auc) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-6)


def test_binary_auc_batched_with_masks_matches_sklearn() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.stack([tied_scores(gen, 50, 6), torch.randn(50, generator=gen)])  # (2, 50)
    labels = torch.randint(0, 2, (50,), generator=gen)
    mask = torch.rand(2, 50, generator=gen) > 0.4
    auc, valid = binary_auc(scores, labels, mask)
    for row in range(2):
        keep = mask[row].numpy()
        expected = roc_auc_score(labels.numpy()[keep], scores[row].numpy()[keep])
        assert bool(valid[row])
        assert float(auc[row]) == pytest.approx(expected, abs=1e-6)


def test_binary_auc_one_class_is_flagged_not_raised() -> None:
    auc, valid = binary_auc(torch.rand(6), torch.zeros(6, dtype=torch.long))
    assert not bool(valid) and torch.isfinite(auc)
    auc, valid = binary_auc(torch.rand(6), torch.tensor([0, 1, 1, 0, 1, 0]), torch.zeros(6) > 0)
    assert not bool(valid) and torch.isfinite(auc)


def test_group_auc_matches_sklearn_per_group() -> None:
    gen = torch.Generator().manual_seed(2)
    scores = tied_scores(gen, 60, 5)
    labels = torch.randint(0, 2, (60,), generator=gen)
    groups = torch.randint(-1, 4, (60,), generator=gen)
    groups[:3] = 3
    labels[:3] = 1  # group 3 gets more positives ...
    labels[groups == 3] = 1  # ... and only positives: one class
    masks = group_masks(groups, 5)  # group 4 is empty
    auc, valid, count = group_auc(scores, labels, masks)
    for g in range(5):
        sel = (groups == g).numpy()
        assert int(count[g]) == sel.sum()
        both = sel.sum() > 0 and len(set(labels.numpy()[sel])) == 2
        assert bool(valid[g]) == both
        if both:
            expected = roc_auc_score(labels.numpy()[sel], scores.numpy()[sel])
            assert float(auc[g]) == pytest.approx(expected, abs=1e-6)
    # Leading dims: two score rows at once.
    auc2, _, _ = group_auc(torch.stack([scores, -scores]), labels, masks)
    assert auc2.shape == (2, 5)
    torch.testing.assert_close(auc2[0], auc)
    torch.testing.assert_close(auc2[1][valid], 1 - auc[valid])


def test_group_masks_unknown_in_no_group() -> None:
    masks = group_masks(torch.tensor([0, -1, 2, 1, 5]), 3)
    expected = torch.tensor(
        [[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(masks, expected)


def test_auc_gap_over_usable_groups_only() -> None:
    auc = torch.tensor([0.9, 0.6, 0.1, 0.75])
    assert float(auc_gap(auc, torch.tensor([True, True, False, True]))) == pytest.approx(0.3)
    assert float(auc_gap(auc, torch.tensor([True, False, False, False]))) == 0.0
    assert float(auc_gap(auc, torch.zeros(4, dtype=torch.bool))) == 0.0


def reference_surrogate(
    scores: np.ndarray, labels: np.ndarray, member: np.ndarray, form: str, temperature: float
) -> float | None:
    """The spec's formulas, one pair at a time, in float64."""
    pos = [s for s, y, m in zip(scores, labels, member) if m and y == 1]
    neg = [s for s, y, m in zip(scores, labels, member) if m and y == 0]
    if not pos or not neg:
        return None
    terms = []
    for sp, sn in itertools.product(pos, neg):
        d = float(sp) - float(sn)
        if form == "logistic":
            terms.append(math.log1p(math.exp(-d)))
        else:
            terms.append(1 / (1 + math.exp(-d / temperature)))
    mean = sum(terms) / len(terms)
    return 1 - mean if form == "logistic" else mean


@pytest.mark.parametrize(("form", "temperature"), [("logistic", 1.0), ("sigmoid", 0.7)])
def test_pairwise_surrogate_matches_pair_loop(form: str, temperature: float) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 2, generator=gen) * 2
    labels = torch.randint(0, 2, (30,), generator=gen)
    groups = torch.randint(-1, 3, (30,), generator=gen)
    groups[labels == 0] = torch.where(groups[labels == 0] == 2, 0, groups[labels == 0])  # g2: pos
    scores = surrogate_scores(logits, form)  # type: ignore[arg-type]
    values, valid = pairwise_surrogate_auc(
        scores,
        labels,
        group_masks(groups, 3),
        form=form,  # type: ignore[arg-type]
        temperature=temperature,
    )
    for g in range(3):
        expected = reference_surrogate(
            scores.double().numpy(), labels.numpy(), (groups == g).numpy(), form, temperature
        )
        assert bool(valid[g]) == (expected is not None)
        if expected is not None:
            assert float(values[g]) == pytest.approx(expected, abs=1e-5)
    assert not bool(valid[2])


def test_sigmoid_surrogate_tends_to_the_auc_as_temperature_vanishes() -> None:
    gen = torch.Generator().manual_seed(4)
    margins = tied_scores(gen, 40, 7)  # ties: the surrogate gives them 1/2, like the AUC
    labels = torch.randint(0, 2, (40,), generator=gen)
    groups = torch.randint(0, 2, (40,), generator=gen)
    masks = group_masks(groups, 2)
    auc, _, _ = group_auc(margins, labels, masks)
    errors = []
    for temperature in (1.0, 0.1, 0.01, 1e-4):
        values, _ = pairwise_surrogate_auc(
            margins, labels, masks, form="sigmoid", temperature=temperature
        )
        errors.append(float((values - auc).abs().max()))
    assert errors[-1] < 1e-5
    assert errors == sorted(errors, reverse=True)  # monotone approach on this grid
    assert errors[0] > 0.05  # at T = 1 it is a smooth proxy, not the AUC


def test_surrogate_chance_levels() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    masks = torch.ones(4, 1, dtype=torch.bool)
    flat = torch.zeros(4)
    sig, _ = pairwise_surrogate_auc(flat, labels, masks, form="sigmoid", temperature=0.3)
    log, _ = pairwise_surrogate_auc(flat, labels, masks, form="logistic")
    assert float(sig) == pytest.approx(0.5)
    assert float(log) == pytest.approx(1 - math.log(2))


def test_surrogate_is_differentiable() -> None:
    scores = torch.randn(10, requires_grad=True)
    labels = torch.tensor([0, 1] * 5)
    values, _ = pairwise_surrogate_auc(
        scores, labels, torch.ones(10, 1, dtype=torch.bool), form="sigmoid"
    )
    (grad,) = torch.autograd.grad(values.sum(), scores)
    assert (grad[labels == 1] > 0).all() and (grad[labels == 0] < 0).all()


def test_group_shares_known_groups_only() -> None:
    shares, known = group_shares(group_masks(torch.tensor([0, 0, 1, -1, 2, 0]), 3))
    torch.testing.assert_close(shares, torch.tensor([0.6, 0.2, 0.2]))
    assert bool(known)
    shares, known = group_shares(group_masks(torch.tensor([-1, -1]), 3))
    assert not bool(known) and float(shares.sum()) == 0.0


def test_gather_batch_packs_once_and_unpacks_aligned() -> None:
    calls = []

    def two_ranks(x: torch.Tensor) -> torch.Tensor:
        # What all_gather over two ranks returns: this rank's rows then the other's.
        calls.append(x.shape)
        return torch.cat([x, x.flip(0) + 0])

    probs = torch.rand(4, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0])
    groups = torch.tensor([2, -1, 0, 1])
    out = gather_batch(two_ranks, {"p": probs, "label": labels, "group": groups})
    assert len(calls) == 1 and calls[0] == (4, 4)  # one collective, K = 2 + 1 + 1 columns
    assert out["label"].dtype == torch.long and out["group"].dtype == torch.long
    assert torch.equal(out["label"], torch.cat([labels, labels.flip(0)]))
    assert torch.equal(out["group"], torch.cat([groups, groups.flip(0)]))
    torch.testing.assert_close(out["p"], torch.cat([probs, probs.flip(0)]).detach())
    assert not out["p"].requires_grad


def test_apply_encoder_factors_scales_named_modalities_only() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((2,), 3.0)
    apply_encoder_factors({"a": [a, frozen], "b": [b]}, {"a": torch.tensor(0.5)})
    assert torch.equal(a.grad, torch.ones(3)) and torch.equal(b.grad, torch.full((2,), 3.0))
    assert frozen.grad is None
