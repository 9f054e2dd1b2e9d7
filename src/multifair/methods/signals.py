"""Batch statistics that methods compute on the device, once per step, without host syncs.

Everything here is written for the hot path (performance.md): no `.item()`, no boolean-mask
indexing (its output shape depends on tensor values, which forces a sync), no Python branch on a
tensor value. Subsets (a group, the positives) are expressed as masks that multiply or that
`torch.where` selects with, so every tensor shape depends only on the batch size, the number of
groups and the number of modalities. A statistic that is undefined on a batch (AUC of a
one-class batch) comes back with a `valid` flag instead of an exception, and the caller decides
what to use in its place with `torch.where`.

Vocabulary: `scores` (..., B) real-valued predictions (higher = more positive), `labels` (B,) in
{0, 1} (class indices 0..K-1 for the multi-class `macro_*` statistics), `groups` (B,) int codes
(-1 = unknown), `masks` (B, G) bool, True where sample b is in group g.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

SurrogateForm = Literal["sigmoid", "logistic"]


def onehot(labels: Tensor, n_classes: int) -> Tensor:
    """(B,) int -> (B, C) float. Unlike `F.one_hot` this never checks the range on the host."""
    classes = torch.arange(n_classes, device=labels.device)
    return (labels[:, None] == classes[None, :]).float()


def group_masks(groups: Tensor, n_groups: int) -> Tensor:
    """(B,) codes -> (B, G) bool membership; unknown (-1) and out-of-range codes are in no group."""
    codes = torch.arange(n_groups, device=groups.device)
    return groups[:, None] == codes[None, :]


def group_weighted_ce(logits: Tensor, labels: Tensor, groups: Tensor, weights: Tensor) -> Tensor:
    """mean_n w_{g(n)} CE(z_n, y_n): each sample's cross-entropy weighted by its group's weight
    (`weights` (G,)); a sample of unknown group (-1, or a code outside 0..G-1) weighs 1."""
    member = group_masks(groups, weights.shape[0]).to(weights.dtype)  # (B, G)
    per_sample_weight = member @ weights + (1 - member.sum(1))  # (B,)
    per_sample = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return (per_sample_weight * per_sample).mean()


def binary_auc(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ROC-AUC from ranks (Mann-Whitney U), ties counted as one half, batched over leading dims.

    scores (..., B); labels (B,) or (..., B); mask (..., B) bool selects the samples that count
    (None: all). Returns (auc (...,), valid (...,)); `valid` is False where the selection lacks
    a positive or a negative, and `auc` is then 0 (meaningless) - use `torch.where(valid, ...)`.

    Ranks come from one sort: the average 1-based rank of a score among the selected samples is
    (#{< s} + #{<= s} + 1) / 2, both counts read off the sorted scores with `searchsorted`.
    Unselected samples are moved to +inf, above every (finite) selected score, so they never
    enter the counts of a selected one. Scores must be finite.
    """
    s = scores.float()
    y = labels.bool().expand_as(s)
    mask = torch.ones_like(y) if mask is None else mask.expand_as(s)
    key = torch.where(mask, s, torch.full_like(s, float("inf"))).contiguous()
    ordered, _ = torch.sort(key, dim=-1)
    below = torch.searchsorted(ordered, key, right=False)  # (..., B) #{selected < s}
    at_or_below = torch.searchsorted(ordered, key, right=True)  # (..., B) #{selected <= s}
    rank = (below + at_or_below + 1).float() / 2  # (..., B) average rank, ties averaged
    positive = mask & y
    negative = mask & ~y
    n_pos = positive.sum(-1).float()
    n_neg = negative.sum(-1).float()
    rank_sum = (rank * positive).sum(-1)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp_min(1.0)
    valid = (n_pos > 0) & (n_neg > 0)
    return auc, valid


def group_auc(scores: Tensor, labels: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group ROC-AUC. scores (..., B), labels (B,), masks (B, G).

    Returns (auc (..., G), valid (G,) both classes present, count (G,) samples in the group).
    """
    by_group = masks.T  # (G, B)
    s = scores.float().unsqueeze(-2).expand(*scores.shape[:-1], *by_group.shape)  # (..., G, B)
    auc, _ = binary_auc(s, labels, by_group)
    y = labels.bool()
    valid = (by_group & y).any(-1) & (by_group & ~y).any(-1)  # (G,)
    return auc, valid, by_group.sum(-1)


def auc_gap(auc: Tensor, usable: Tensor) -> Tensor:
    """max_g auc_g - min_g auc_g over the usable groups (last dim); 0 with fewer than two."""
    neg_inf = torch.full_like(auc, float("-inf"))
    pos_inf = torch.full_like(auc, float("inf"))
    highest = torch.where(usable, auc, neg_inf).amax(-1)
    lowest = torch.where(usable, auc, pos_inf).amin(-1)
    enough = usable.sum(-1) >= 2
    return torch.where(enough, highest - lowest, torch.zeros_like(highest))


def surrogate_scores(logits: Tensor, form: SurrogateForm) -> Tensor:
    """What a pairwise surrogate compares: (B, 2) logits -> (B,) scores.

    "logistic" (paper / released code): the positive-class softmax probability.
    "sigmoid" (recommended): the logit margin u_1 - u_0, unbounded, so the surrogate can reach
    the AUC's full range.
    """
    z = logits.float()
    if form == "logistic":
        return torch.softmax(z, dim=-1)[..., 1]
    return z[..., 1] - z[..., 0]


def ovr_margins(logits: Tensor) -> Tensor:
    """One-vs-rest log-odds of each class: (B, K) logits -> (B, K), column k = z_k -
    logsumexp_{j != k} z_j = log(p_k / (1 - p_k)). Monotone in the softmax probability p_k (the
    score the macro one-vs-rest AUC ranks) and unbounded like the binary margin z_1 - z_0,
    which column 1 equals for K = 2 (up to rounding)."""
    z = logits.float()
    k = z.shape[-1]
    own = torch.eye(k, dtype=torch.bool, device=z.device)  # (K, K) True at j == k
    others = torch.where(own, float("-inf"), z.unsqueeze(-2))  # (B, K, K) row k: z_j, j != k
    return z - torch.logsumexp(others, dim=-1)


def macro_ovr_auc(
    scores: Tensor, labels: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Macro one-vs-rest ROC-AUC from ranks, batched: mean over classes k of the AUC of
    scores[..., k, :] for class k against the rest (`binary_auc` per class).

    scores (..., K, B); labels (B,) class indices; mask (..., B) bool or None. On a batch the
    mean runs over the classes whose one-vs-rest split has both sides among the selected
    samples (a class absent from a batch has no AUC). Returns (auc (...,), valid (...,)),
    valid where at least one class counts; auc is 0 elsewhere."""
    n_classes = scores.shape[-2]
    is_class = onehot(labels, n_classes).T  # (K, B)
    per_class_mask = None if mask is None else mask.unsqueeze(-2).expand_as(scores)
    auc, valid = binary_auc(scores, is_class, per_class_mask)  # (..., K)
    weight = valid.float()
    return (auc * weight).sum(-1) / weight.sum(-1).clamp_min(1.0), valid.any(-1)


def pairwise_surrogate_auc(
    scores: Tensor,
    labels: Tensor,
    masks: Tensor,
    *,
    form: SurrogateForm,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Differentiable per-group AUC surrogates from every (positive, negative) pair of a group.

    scores (..., B) from `surrogate_scores`; labels (B,); masks (B, G). With d = s_p - s_n:
      "logistic": S_g = 1 - mean_{p,n} log(1 + exp(-d))   (chance 1 - log 2; released code)
      "sigmoid":  S_g = mean_{p,n} sigmoid(d / T)         (chance 0.5; AUC as T -> 0)
    The pair kernel K (..., B, B) is computed once for all groups; the group's pairs are the
    outer product of its positive and negative masks, summed with one einsum (no indexing).
    Returns (S (..., G), valid (G,)): valid where the group has both classes; S is 0 elsewhere.
    """
    s = scores.float()
    diff = s.unsqueeze(-1) - s.unsqueeze(-2)  # (..., B, B) s_p - s_n for row p, column n
    if form == "logistic":
        kernel = 1 - nn.functional.softplus(-diff)  # softplus(x) = log(1 + exp(x)), stable
    else:
        kernel = torch.sigmoid(diff / temperature)
    y = labels.bool()
    positive = (masks & y[:, None]).T.float()  # (G, B)
    negative = (masks & ~y[:, None]).T.float()  # (G, B)
    pair_sum = torch.einsum("gp,...pn,gn->...g", positive, kernel, negative)  # (..., G)
    pairs = positive.sum(-1) * negative.sum(-1)  # (G,)
    return pair_sum / pairs.clamp_min(1.0), pairs > 0


def macro_pairwise_surrogate_auc(
    scores: Tensor, labels: Tensor, masks: Tensor, *, form: SurrogateForm, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-group macro one-vs-rest surrogate: S_g = mean over the classes k with both sides in
    group g of `pairwise_surrogate_auc` on scores[k] (class k positive, the rest negative).

    scores (K, B) (e.g. `ovr_margins(logits).T`); labels (B,) class indices; masks (B, G).
    Returns (S (G,), valid (G,)): valid where some class counts in the group; S is 0 elsewhere.
    One (B, B) pair kernel per class; K is a shape, so the loop is static."""
    total = torch.zeros(masks.shape[1], device=scores.device)
    counted = torch.zeros(masks.shape[1], device=scores.device)
    for k in range(scores.shape[0]):
        surrogate, valid = pairwise_surrogate_auc(
            scores[k], labels == k, masks, form=form, temperature=temperature
        )  # (G,), (G,)
        total = total + surrogate * valid
        counted = counted + valid.float()
    return total / counted.clamp_min(1.0), counted > 0


def group_shares(masks: Tensor) -> tuple[Tensor, Tensor]:
    """p_g = share of group g among the samples with a known group. masks (B, G).

    Returns (shares (G,), any_known ()): shares are all 0 when no sample has a known group.
    """
    counts = masks.sum(0).float()  # (G,)
    total = counts.sum()
    return counts / total.clamp_min(1.0), total > 0


def gather_batch(
    gather: Callable[[Tensor], Tensor], columns: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """All-gather several per-sample tensors with ONE collective, detached.

    columns: name -> (B,) or (B, k) tensors (labels and group codes are exact as float32 up to
    2**24). They are packed into one (B, K) float32 tensor, gathered along dim 0 (the global
    batch under DDP; the identity in one process) and unpacked; integer columns come back as
    int64.
    """
    pieces: list[Tensor] = []
    widths: list[int] = []
    for value in columns.values():
        col = value.detach().float()
        col = col[:, None] if col.dim() == 1 else col
        pieces.append(col)
        widths.append(col.shape[1])
    packed = gather(torch.cat(pieces, dim=1))  # (B_global, K)
    out: dict[str, Tensor] = {}
    for (name, value), part in zip(columns.items(), packed.split(widths, dim=1)):
        part = part.squeeze(1) if value.dim() == 1 else part
        out[name] = part.round().long() if not value.is_floating_point() else part
    return out


def apply_encoder_factors(
    modality_parameters: Mapping[str, Iterable[nn.Parameter]], factors: Mapping[str, Tensor]
) -> None:
    """grad(theta_m) *= factor_m for every encoder parameter that has a gradient, in place.

    One fused foreach multiply per modality; the factor stays a device tensor (no sync).
    Modalities missing from `factors` are left alone.
    """
    for modality, params in modality_parameters.items():
        if modality not in factors:
            continue
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            factor = torch.as_tensor(factors[modality], device=grads[0].device)
            torch._foreach_mul_(grads, factor)


def constant_factors(method: str, factors: Mapping[str, float], modalities: list[str]) -> Tensor:
    """(M,) per-modality constants from a `{modality: factor}` mapping (missing ones: 1), for
    the control methods; an unknown modality is a user error naming it."""
    from multifair.errors import UserError

    unknown = sorted(set(factors) - set(modalities))
    if unknown:
        raise UserError(
            f"method {method!r}: factors: unknown modality {unknown[0]!r}. "
            f"Available: {list(modalities)}"
        )
    return torch.tensor([float(factors.get(m, 1.0)) for m in modalities])


def unwrap_model(model: nn.Module | None) -> nn.Module:
    """The model itself, also when wrapped in DistributedDataParallel."""
    assert model is not None, "the trainer must set StepContext.model"
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
