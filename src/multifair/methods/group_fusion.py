"""Group-aware stacking: each group's own recombination of the fused and modality margins,
fitted on held-out data after training (`multifair_adam group_fusion: stacking`).

Why: when one modality is strong for the majority and weak for a minority (the main synthetic
scenario, the FairVision-style images), the best prediction for each group weights the
modalities differently. A model that cannot see the group has ONE weighting for everyone, and
trading between groups is all reweighting can do: plain training already sits on the ideal
group-blind curve (docs/results.md). Per group g, with x = (fused margin, each modality head's
margin) of a sample:

    margin' = W_g . x + b_g

W_g, b_g from a logistic regression on the VALIDATION split's margins of the selected
checkpoint, shrunk towards the shared model (W = (1, 0, ...), b = 0) - the modality heads read
detached features, so on held-out data they are honest single-modality predictions. A group
with too few samples of a class, and a sample of unknown group, keep the shared model. The
minority's fit leans on the modality that serves it (in the main scenario: a negative weight
on A's head).

`stacking_data: train+validation` fits in two stages (`fit_group_stacking_pooled`): the
DIRECTION of each group's weights on the training and validation margins pooled (3-4x the
samples of a minority: its within-group ranking depends on the direction only), then each
group's SCALE and INTERCEPT on validation alone - training margins are over-confident, and
the scale and intercept are what put the groups' scores on one scale for the overall ranking.

Development notes (docs/results.md): trained alternatives - a per-group FiLM on the modality
tokens, per-group weights on the modality logits trained with the model - gained less in a
pilot (+0.009, +0.011 ES-AUC against +0.024): trained on the training split, where the
minority's fused loss is already small, they see little of the held-out gap.

Missing modalities (`data.missing_modalities: mask`): a modality the sample lacks enters the
fit and the inference with head margin 0 - no evidence either way (its head read a
placeholder; its aux score is NaN in the predictions), while the fused margin already reflects
the learned missing token. One recombination per group serves every missingness pattern: the
fused head is trained on every pattern, so its margin is on the scale of each; per-pattern
intercepts or weights would multiply the parameters by the patterns, fitted on the few
minority patients of the rare patterns (30% of a minority lacking B: ~50 validation patients).

NEEDS THE SENSITIVE ATTRIBUTE AT TEST TIME, like FIN: every table marks the rows that use it.

`group_fusion: blind_stacking` is the group-BLIND counterpart (`fit_blind_stacking`,
`SharedStacking`): ONE recombination for everyone, margin' = w . x + b, whose direction is a
logistic regression in which every sample of group g weighs (N / (G n_g))^blind_power - the
group is read only to fit it, never at inference. Why (docs/results.md, the ideal-observer
front of benchmarks/blind_fusion_ceiling.py): with no group cue in the input, the group-aware
teacher's expected score given the input - what a distilled student converges to - ranks
slightly WORSE than plain training's posterior, while a group-balanced shared recombination
tilts everyone's weighting towards the modality that serves the minorities, along a front
slightly better than reweighting the training loss (minority ES-AUC for little majority AUC).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from multifair.errors import UserError
from multifair.methods.base import MethodParams
from multifair.methods.signals import group_masks

EPS = 1e-7
# the largest margin the fit can see: predictions are float32 probabilities, which saturate
MARGIN_LIMIT = float(np.log1p(-EPS) - np.log(EPS))  # logit(1 - EPS) = 16.1


class GroupFusionParams(MethodParams):
    """The options of a method that offers `group_fusion: stacking` (multifair_adam, fin)."""

    # "stacking": after selection, fit per-group weights on the fused and modality margins on
    # held-out data. Uses the sensitive attribute AT TEST TIME.
    # "blind_stacking": ONE recombination for everyone, fitted with group-balanced sample
    # weights (the group is read by the fit only): group-blind at test time.
    group_fusion: Literal["off", "stacking", "blind_stacking"] = "off"
    stacking_prior: float = Field(1.0, gt=0)  # pull of each group's fit towards the shared one
    # blind_stacking: a sample of group g weighs (N / (G n_g))^blind_power in the direction's
    # fit (0: the plain shared fit, 1: every group's total weight equal)
    blind_power: float = Field(1.0, ge=0)
    # what the stacking is fitted on: the validation split, or (two stages) the direction on
    # the training and validation splits pooled, each group's scale and intercept on validation
    stacking_data: Literal["validation", "train+validation"] = "validation"

    @model_validator(mode="after")
    def _stacking_data_needs_stacking(self) -> GroupFusionParams:
        if self.stacking_data != "validation" and self.group_fusion == "off":
            raise ValueError(
                f"stacking_data: {self.stacking_data} needs group_fusion: stacking or "
                f"blind_stacking (group_fusion is {self.group_fusion!r})"
            )
        # (a value other than the default: the trainer re-validates every field it dumped)
        if self.blind_power != 1.0 and self.group_fusion != "blind_stacking":
            raise ValueError(
                f"blind_power needs group_fusion: blind_stacking (group_fusion is "
                f"{self.group_fusion!r})"
            )
        return self

    @property
    def fits_on_train(self) -> bool:
        """Whether the fit also reads the training split's predictions."""
        return self.group_fusion != "off" and self.stacking_data != "validation"


def logit(p: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Margins from positive-class probabilities (clipped: a saturated float32 softmax)."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def fit_group_stacking(
    x: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    prior: float,
    min_per_class: int = 5,
    iterations: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group g, a logistic regression of the label on held-out margins x (N, K) - column 0
    the fused prediction's, then one per modality head - shrunk towards the shared model:

        minimise  sum_{n in g} CE(y_n, theta_g . [x_n, 1])  +  prior * |theta_g - theta_0|^2
        theta_0 = (1, 0, ..., 0 | 0): the fused margin unchanged

    by Newton's method with a backtracking line search (K + 1 unknowns; the penalty makes it
    strictly convex, the line search makes every step lower the objective: plain Newton steps
    diverge on saturated margins, where p(1 - p) ~ 0 leaves the Hessian near its prior part).
    A group with fewer than `min_per_class` samples of either class keeps theta_0, and so does
    an unknown code. Returns the weights (G, K), the intercepts (G,) and which groups were
    fitted (G,).
    """
    x = np.asarray(x, dtype=np.float64)
    labels, groups = np.asarray(labels), np.asarray(groups)
    k = x.shape[1]
    theta0 = np.zeros(k + 1)
    theta0[0] = 1.0
    weights = np.tile(theta0[:k], (n_groups, 1))
    bias = np.zeros(n_groups)
    fitted = np.zeros(n_groups, dtype=bool)
    for g in range(n_groups):
        member = groups == g
        y = labels[member].astype(np.float64)
        if min(int(y.sum()), int(len(y) - y.sum())) < min_per_class:
            continue
        design = np.concatenate([x[member], np.ones((len(y), 1))], axis=1)  # (n, K + 1)
        theta = _penalised_logistic(design, y, theta0, prior, iterations)
        weights[g], bias[g], fitted[g] = theta[:k], theta[k], True
    return weights, bias, fitted


def _penalised_logistic(
    design: np.ndarray,
    y: np.ndarray,
    theta0: np.ndarray,
    prior: float,
    iterations: int,
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """argmin_theta sum_n s_n CE(y_n, design_n @ theta) + prior |theta - theta0|^2: damped
    Newton (s_n = 1 unless `sample_weight`)."""
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)

    def objective(theta: np.ndarray) -> float:
        z = design @ theta  # CE = softplus(z) - y z, computed without overflow
        ce = np.logaddexp(0.0, z) - y * z
        return float(np.sum(s * ce) + prior * np.sum((theta - theta0) ** 2))

    eye = 2 * prior * np.eye(len(theta0))
    theta, value = theta0.copy(), objective(theta0)
    for _ in range(iterations):
        p = 0.5 * (1 + np.tanh(0.5 * (design @ theta)))  # sigmoid, stable
        grad = design.T @ (s * (p - y)) + 2 * prior * (theta - theta0)
        step = np.linalg.solve((design * (s * p * (1 - p))[:, None]).T @ design + eye, grad)
        t, decrease = 1.0, float(grad @ step)  # >= 0: the Hessian is positive definite
        while t > 1e-10:  # backtracking (Armijo): every accepted step lowers the objective
            candidate = objective(theta - t * step)
            if candidate <= value - 1e-4 * t * decrease:
                break
            t *= 0.5
        else:
            break  # no decrease along the Newton direction: at the optimum to precision
        theta, value = theta - t * step, candidate
        if np.abs(t * step).max() < 1e-10:
            break
    return theta


def stacked_margins(
    x: np.ndarray, groups: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> np.ndarray:
    """W_g . x + b_g per sample (N,); a sample of unknown group keeps the fused margin x[:, 0]."""
    x = np.clip(np.asarray(x, dtype=np.float64), -MARGIN_LIMIT, MARGIN_LIMIT)
    groups = np.asarray(groups)
    known = (groups >= 0) & (groups < len(bias))
    g = np.where(known, groups, 0)
    return np.where(known, (weight[g] * x).sum(1) + bias[g], x[:, 0])


def fit_group_stacking_pooled(
    x_train: np.ndarray,
    y_train: np.ndarray,
    g_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    g_val: np.ndarray,
    n_groups: int,
    prior: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`stacking_data: train+validation`: each group's direction from the training and
    validation margins pooled, then its scale a_g and intercept c_g on validation alone
    (the same penalised fit on the one stacked margin, towards a = 1, c = 0):

        margin' = a_g (W_g . x + b_g) + c_g

    A group without enough validation samples of a class keeps the pooled fit as it is."""
    weight, bias, fitted = fit_group_stacking(
        np.concatenate([x_train, x_val]),
        np.concatenate([y_train, y_val]),
        np.concatenate([g_train, g_val]),
        n_groups,
        prior,
    )
    s = stacked_margins(x_val, g_val, weight, bias)
    scale, shift, _ = fit_group_stacking(s[:, None], y_val, g_val, n_groups, prior)
    return scale[:, :1] * weight, scale[:, 0] * bias + shift, fitted


def group_balance_weights(groups: np.ndarray, n_groups: int, power: float) -> np.ndarray:
    """Per-sample weights (N / (G n_g))^power, G the groups present: at power 1 every group's
    total weight is N / G. A sample of unknown group (code outside 0..n_groups-1) weighs 1."""
    groups = np.asarray(groups)
    known = (groups >= 0) & (groups < n_groups)
    counts = np.bincount(groups[known], minlength=n_groups).astype(np.float64)
    present = counts > 0
    if not present.any() or power == 0:
        return np.ones(len(groups))
    per_group = np.ones(n_groups)
    per_group[present] = (known.sum() / (present.sum() * counts[present])) ** power
    return np.where(known, per_group[np.where(known, groups, 0)], 1.0)


def fit_blind_stacking(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    g_fit: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_groups: int,
    prior: float,
    power: float,
    iterations: int = 100,
) -> tuple[np.ndarray, float]:
    """`group_fusion: blind_stacking`: ONE recombination margin' = a (w . x + b) + c for every
    sample, whatever its group.

    Stage 1, the direction (w, b): the penalised logistic regression of `fit_group_stacking`
    (towards the fused margin unchanged) on (x_fit, y_fit) - the validation margins, or the
    training and validation ones pooled - with each sample of group g weighted
    (N / (G n_g))^power (`group_balance_weights`): at power 1 each group counts as much as any
    other, so the direction leans towards the modality that serves the minorities.
    Stage 2, the scale a and intercept c: the same fit, unweighted, of the one stacked margin
    on validation alone (towards a = 1, c = 0), which puts the score back on the scale of the
    validation labels (thresholded metrics). The group is read by the fit only.
    Returns the weights (K,) and the bias."""
    x_fit = np.clip(np.asarray(x_fit, dtype=np.float64), -MARGIN_LIMIT, MARGIN_LIMIT)
    x_val = np.clip(np.asarray(x_val, dtype=np.float64), -MARGIN_LIMIT, MARGIN_LIMIT)
    k = x_fit.shape[1]
    theta0 = np.zeros(k + 1)
    theta0[0] = 1.0
    sample_weight = group_balance_weights(g_fit, n_groups, power)
    design = np.concatenate([x_fit, np.ones((len(x_fit), 1))], axis=1)
    theta = _penalised_logistic(
        design, np.asarray(y_fit, np.float64), theta0, prior, iterations, sample_weight
    )
    s = x_val @ theta[:k] + theta[k]
    scale = _penalised_logistic(
        np.stack([s, np.ones_like(s)], axis=1),
        np.asarray(y_val, np.float64),
        np.array([1.0, 0.0]),
        prior,
        iterations,
    )
    return scale[0] * theta[:k], float(scale[0] * theta[k] + scale[1])


def stack_inputs(
    logits: Tensor,
    aux_logits: Mapping[str, Tensor],
    modalities: Sequence[str],
    present: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """(B, 1 + M) float: the fused margin, then each modality head's, clamped to the range the
    fit saw (its margins come from probabilities). A modality the sample lacks
    (`present[m]` False, data with missing modalities) contributes 0 - no evidence: its head
    read a placeholder - as in `_margins`; on the device, no host sync."""
    margins = [logits[:, 1] - logits[:, 0]]  # (B,) each
    for m in modalities:
        margin = aux_logits[m][:, 1] - aux_logits[m][:, 0]
        have = None if present is None else present.get(m)
        if have is not None:  # where, not a product: a NaN placeholder margin must not leak
            margin = torch.where(have.to(margin.device), margin, torch.zeros_like(margin))
        margins.append(margin)
    return torch.stack(margins, dim=1).float().clamp(-MARGIN_LIMIT, MARGIN_LIMIT)


class SharedStacking(nn.Module):
    """`group_fusion: blind_stacking`: one recombination for everyone,

        margin' = sum_k w_k x_k + b,   x = (fused margin, each modality head's margin)

    The forward never reads the group (an argument accepted and ignored, so that a method calls
    either module alike). Identity (w = (1, 0, ...), b = 0) until fitted."""

    def __init__(self, modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities = list(modalities)
        weight = torch.zeros(1 + len(self.modalities))
        weight[0] = 1.0
        self.register_buffer("weight", weight)  # (1 + M,)
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(
        self,
        logits: Tensor,
        aux_logits: Mapping[str, Tensor],
        groups: Tensor | None = None,
        present: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        x = stack_inputs(logits, aux_logits, self.modalities, present)  # (B, 1 + M)
        margin = x @ self.weight + self.bias  # (B,)
        return torch.stack([torch.zeros_like(margin), margin], dim=1).to(logits.dtype)


class GroupStacking(nn.Module):
    """The fitted per-group recombination, applied to a binary prediction's margin:

        margin' = sum_k W[g, k] x_k + b_g,   x = (fused margin, each modality head's margin)

    Buffers (not trained by the loss); identity (W = (1, 0, ...), b = 0) until fitted and for
    a sample of unknown group."""

    def __init__(self, n_groups: int, modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities = list(modalities)
        weight = torch.zeros(n_groups, 1 + len(self.modalities))
        weight[:, 0] = 1.0
        self.register_buffer("weight", weight)  # (G, 1 + M)
        self.register_buffer("bias", torch.zeros(n_groups))  # (G,)
        # which groups have their own fit (the others, and unknown codes, keep the shared model)
        self.register_buffer("fitted", torch.zeros(n_groups, dtype=torch.bool))

    def forward(
        self,
        logits: Tensor,
        aux_logits: Mapping[str, Tensor],
        groups: Tensor,
        present: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        x = stack_inputs(logits, aux_logits, self.modalities, present)  # (B, 1 + M)
        member = group_masks(groups, self.weight.shape[0]).to(x.dtype)  # (B, G)
        known = member.sum(1)  # (B,) 1 or 0
        w = member @ self.weight + (1 - known)[:, None] * self._identity(x)  # (B, 1 + M)
        margin = (w * x).sum(1) + member @ self.bias  # (B,)
        return torch.stack([torch.zeros_like(margin), margin], dim=1).to(logits.dtype)

    def _identity(self, x: Tensor) -> Tensor:
        eye = torch.zeros_like(x[0])
        eye[0] = 1.0
        return eye  # (1 + M,)


# ---- the pieces a method needs to offer `group_fusion: stacking` ------------------------------
def check_fusion_classes(method: str, params: Any, n_classes: int) -> None:
    """A method's `check_classes` part for `group_fusion`: stacking recombines binary logit
    margins, so a K-class run refuses it when the method is built, before any data is read."""
    fusion = getattr(params, "group_fusion", "off")
    if n_classes != 2 and fusion != "off":
        raise UserError(
            f"method {method!r}: group_fusion: {fusion} needs a binary label (data has "
            f"{n_classes} classes): it recombines the heads' binary logit margins; set "
            "method.group_fusion: off (the rest of the method trains K classes)"
        )


def build_stacking(
    model: nn.Module, n_groups: int, method: str, fusion: str = "stacking"
) -> GroupStacking | SharedStacking:
    """The (identity) stacking for a model - per group (`stacking`) or shared
    (`blind_stacking`); clear errors where it cannot apply."""
    if model.n_classes != 2:
        raise UserError(
            f"{method} group_fusion: {fusion} needs binary labels "
            f"(the model has {model.n_classes} classes)"
        )
    if n_groups < 1:
        why = (
            "it fits one recombination per group"
            if fusion == "stacking"
            else "it weights the groups in the fit of the shared recombination"
        )
        raise UserError(
            f"{method} group_fusion: {fusion} needs a sensitive attribute "
            f"(data.attributes / train.attribute): {why}"
        )
    device = next(model.parameters()).device
    if fusion == "blind_stacking":
        return SharedStacking(model.modalities).to(device)
    return GroupStacking(n_groups, model.modalities).to(device)


def fit_stacking(
    stack: GroupStacking | SharedStacking,
    params: GroupFusionParams,
    preds: Any,
    groups: np.ndarray | None,
    train_preds: Any | None = None,
    train_groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """A method's `on_selected` for `group_fusion: stacking`: fit `stack` on the selected
    checkpoint's validation predictions - with `stacking_data: train+validation` on the
    training split's too (`fit_group_stacking_pooled`). Fits once: a state that already holds
    a fit - a resumed run's best.pt - keeps it; its predictions are stacked ones. Returns the
    fit per group for metrics.json (`None`: kept at the shared model); for a `SharedStacking`
    (`blind_stacking`) the one fit, as `stacking/shared`."""
    if isinstance(stack, SharedStacking):
        return _fit_shared(stack, params, preds, groups, train_preds, train_groups)
    if not bool(stack.fitted.any()):
        if groups is None or (
            params.fits_on_train and (train_preds is None or train_groups is None)
        ):
            raise ValueError(
                "group_fusion: stacking needs each fitted split's predictions and groups"
            )
        n_groups, prior = stack.weight.shape[0], params.stacking_prior
        x = _margins(preds, stack.modalities)
        if not params.fits_on_train:
            weight, bias, fitted = fit_group_stacking(
                x, preds.label, np.asarray(groups), n_groups, prior
            )
        else:
            weight, bias, fitted = fit_group_stacking_pooled(
                _margins(train_preds, stack.modalities),
                train_preds.label,
                np.asarray(train_groups),
                x,
                preds.label,
                np.asarray(groups),
                n_groups,
                prior,
            )
        stack.weight.copy_(torch.as_tensor(weight, dtype=stack.weight.dtype))
        stack.bias.copy_(torch.as_tensor(bias, dtype=stack.bias.dtype))
        stack.fitted.copy_(torch.as_tensor(fitted))
    weight = stack.weight.detach().cpu().double().numpy()
    bias = stack.bias.detach().cpu().double().numpy()
    fitted = stack.fitted.detach().cpu().numpy()
    columns = ["fused", *stack.modalities, "bias"]
    return {
        "stacking_data": params.stacking_data,
        **{
            f"stacking/{g}": (
                dict(zip(columns, [*map(float, weight[g]), float(bias[g])])) if fitted[g] else None
            )
            for g in range(len(fitted))
        },
    }


def _fit_shared(
    stack: SharedStacking,
    params: GroupFusionParams,
    preds: Any,
    groups: np.ndarray | None,
    train_preds: Any | None,
    train_groups: np.ndarray | None,
) -> dict[str, Any]:
    """`fit_stacking` for `blind_stacking` (`fit_blind_stacking`); fits once, like it."""
    if not bool(stack.fitted):
        if groups is None or (
            params.fits_on_train and (train_preds is None or train_groups is None)
        ):
            raise ValueError(
                "group_fusion: blind_stacking needs each fitted split's predictions and groups"
            )
        x_val = _margins(preds, stack.modalities)
        x_fit, y_fit, g_fit = x_val, np.asarray(preds.label), np.asarray(groups)
        if params.fits_on_train:
            x_fit = np.concatenate([_margins(train_preds, stack.modalities), x_val])
            y_fit = np.concatenate([np.asarray(train_preds.label), y_fit])
            g_fit = np.concatenate([np.asarray(train_groups), g_fit])
        n_groups = int(max(g_fit.max(initial=-1) + 1, 1))
        weight, bias = fit_blind_stacking(
            x_fit,
            y_fit,
            g_fit,
            x_val,
            preds.label,
            n_groups,
            params.stacking_prior,
            params.blind_power,
        )
        stack.weight.copy_(torch.as_tensor(weight, dtype=stack.weight.dtype))
        stack.bias.fill_(bias)
        stack.fitted.fill_(True)
    weight = stack.weight.detach().cpu().double().numpy()
    columns = ["fused", *stack.modalities, "bias"]
    values = [*map(float, weight), float(stack.bias)]
    return {
        "stacking_data": params.stacking_data,
        "blind_power": params.blind_power,
        "stacking/shared": dict(zip(columns, values)),
    }


class GroupStackingHook:
    """`on_selected` of a method that offers `group_fusion: stacking` (mixed in before
    `Method`; the method sets `group_stack` in setup and has `GroupFusionParams`): fit each
    group's recombination of the fused and modality margins on the selected checkpoint's
    validation predictions (with `stacking_data: train+validation` its training ones too; made
    before any fit: the stacking is the identity until now). Fits once: when the loaded state
    already holds a fit (a run resumed after the trainer re-saved best.pt), `preds` are
    stacked ones and the fit is kept."""

    group_stack: GroupStacking | SharedStacking | None
    params: Any  # GroupFusionParams

    @property
    def fits_on_train(self) -> bool:
        """Whether `on_selected` needs the training split's predictions: with `stacking_data:
        train+validation`, until a fit is held (a resumed run's best.pt skips that pass)."""
        stack = self.group_stack
        return self.params.fits_on_train and not (stack is not None and bool(stack.fitted.any()))

    def on_selected(
        self,
        preds: Any,
        groups: np.ndarray | None = None,
        train_preds: Any | None = None,
        train_groups: np.ndarray | None = None,
    ) -> dict[str, Any]:
        if self.group_stack is None:
            return {}
        return fit_stacking(self.group_stack, self.params, preds, groups, train_preds, train_groups)


def _margins(preds: Any, modalities: Sequence[str]) -> np.ndarray:
    """(N, 1 + M): the fused margin, then each modality head's. A modality the sample lacks
    (data with missing modalities: `preds.present[m]` False, its aux score NaN) contributes 0,
    as at inference (`stack_inputs`): no evidence either way - its head read a placeholder,
    and the fused margin already reflects the missing token."""
    present = getattr(preds, "present", None) or {}
    columns = [logit(preds.score)]
    for m in modalities:
        score = np.asarray(preds.aux_scores[m], dtype=np.float64)
        have = np.isfinite(score)
        if m in present:
            have &= np.asarray(present[m], dtype=bool)
        columns.append(np.where(have, logit(np.where(have, score, 0.5)), 0.0))
    return np.stack(columns, axis=1)
