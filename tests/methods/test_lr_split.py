"""`lr_split` (constant per-encoder learning-rate split) and the behaviour it rests on: under
AdamW a factor on an encoder's learning rate scales its update, a factor on its gradient does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _adam_tiny import TinyMultimodal, make_batches, train_steps

from multifair.errors import UserError
from multifair.methods.base import METHODS, Method, MethodParams, build_method

MODALITIES = ["lead", "lag"]


def _model(seed: int = 0) -> TinyMultimodal:
    torch.manual_seed(seed)
    return TinyMultimodal({"lead": 4, "lag": 4})


def test_factors_are_returned_per_modality_and_missing_ones_are_one():
    method = build_method("lr_split", {"factors": {"lead": 0.64}}, MODALITIES, n_groups=3)
    factors = method.lr_factors(None, None)  # type: ignore[arg-type]
    assert set(factors) == set(MODALITIES)
    assert float(factors["lead"]) == pytest.approx(0.64)
    assert float(factors["lag"]) == 1.0
    assert METHODS.get("lr_split").acts_on_step_size


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"factors": {"oct": 0.5}}, "unknown modality 'oct'"),
        ({"factors": {"lead": 0.0}}, "factors.lead"),
        ({"factors": {"lead": -1.0}}, "factors.lead"),
        ({"factor": {"lead": 0.5}}, "factor: unknown key"),
    ],
)
def test_bad_params_are_user_errors_naming_the_key(params, message):
    with pytest.raises(UserError, match=message):
        build_method("lr_split", params, MODALITIES, n_groups=3)


def test_lr_factor_halves_update_norm_under_adamw_while_grad_factor_does_not():
    """The core claim of method.md section 7, on a real torch.optim.AdamW with one param group
    per encoder + the rest, lr set each step after a cosine schedule (trainer contract)."""
    batches = make_batches(12, seed=1)
    base = _model()
    runs = {}
    for name, method, grad_factors in [
        ("plain", Method(MethodParams(), MODALITIES, 3), None),
        ("lr_half", build_method("lr_split", {"factors": {"lead": 0.5}}, MODALITIES, 3), None),
        ("grad_half", Method(MethodParams(), MODALITIES, 3), {"lead": 0.5}),
    ]:
        torch.manual_seed(123)  # same dropout stream for every run
        runs[name] = train_steps(method, copy.deepcopy(base), batches, grad_factors=grad_factors)

    def total(name: str, modality: str) -> float:
        return sum(row[f"update_norm/{modality}"] for row in runs[name])

    # First step, from identical weights and gradients: Adam's first update is
    # lr * g / (|g| + eps), so the lr factor halves it exactly, the gradient factor only
    # moves it through eps.
    first = {k: v[0]["update_norm/lead"] for k, v in runs.items()}
    assert first["lr_half"] / first["plain"] == pytest.approx(0.5, rel=1e-4)
    assert first["grad_half"] / first["plain"] == pytest.approx(1.0, rel=1e-3)
    # Over the whole run (trajectories drift apart, so looser bounds).
    lr_ratio = total("lr_half", "lead") / total("plain", "lead")
    grad_ratio = total("grad_half", "lead") / total("plain", "lead")
    assert 0.45 < lr_ratio < 0.55, lr_ratio
    assert 0.95 < grad_ratio < 1.05, grad_ratio
    # The factor acts on the named encoder only.
    other = total("lr_half", "lag") / total("plain", "lag")
    assert 0.85 < other < 1.15, other
