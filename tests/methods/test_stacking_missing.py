"""`group_fusion: stacking` / `blind_stacking` on data with missing modalities
(methods/group_fusion.py): an absent modality's head margin enters the fit and the inference
as 0. The tests put garbage (NaN, confident random scores) where a modality is absent and
require the same fit and the same predictions; the same garbage without the mask moves them
(so the tests can fail)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model

from multifair.methods.base import build_method
from multifair.methods.group_fusion import GroupStacking, SharedStacking, _margins
from multifair.training.inference import Predictions

G = 2


def _sig(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


def _preds(n: int = 600, seed: int = 0, absent: str = "nan") -> tuple[Predictions, np.ndarray]:
    """Held-out predictions where b is absent for ~30% of group 1 and ~5% of group 0; a is
    strong for group 0, weak for group 1; b moderate for everyone. `absent`: what an absent b
    carries - "nan" (as `predict` writes it) or "garbage" (a confident random score)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    groups = rng.integers(0, G, n)
    sign = 2 * y - 1
    a = rng.normal(size=n) + sign * np.where(groups == 0, 1.2, 0.1)
    b = rng.normal(size=n) + sign * 0.8
    have_b = rng.random(n) > np.where(groups == 1, 0.3, 0.05)
    fused = a + np.where(have_b, b, 0.0)  # the fused model reads b only where it is present
    score_b = _sig(b)
    if absent == "nan":
        score_b = np.where(have_b, score_b, np.nan)
    else:
        score_b = np.where(have_b, score_b, _sig(rng.choice([-9.0, 9.0], n)))
    preds = Predictions(
        index=np.arange(n),
        sample_id=[str(i) for i in range(n)],
        label=y,
        score=_sig(fused),
        aux_scores={"a": _sig(a), "b": score_b},
        present={"b": have_b},
    )
    return preds, groups


def _fit(fusion: str, preds: Predictions, groups: np.ndarray, **params) -> dict:
    method = build_method("multifair_adam", {"group_fusion": fusion, **params}, ["a", "b"], G)
    method.setup(tiny_model(("a", "b")))
    return method.on_selected(preds, groups, preds, groups)


def _values(fit: dict) -> np.ndarray:
    return np.array(
        [v for k, d in fit.items() if k.startswith("stacking/") for v in d.values()], float
    )


@pytest.mark.parametrize(
    "fusion, params",
    [
        ("stacking", {}),
        ("stacking", {"stacking_data": "train+validation"}),
        ("blind_stacking", {"stacking_data": "train+validation", "blind_power": 0.7}),
    ],
)
def test_the_fit_reads_an_absent_margin_as_zero_whatever_the_placeholder_says(fusion, params):
    nan, groups = _preds(absent="nan")
    garbage, _ = _preds(absent="garbage")
    fit_nan = _values(_fit(fusion, nan, groups, **params))
    fit_garbage = _values(_fit(fusion, garbage, groups, **params))
    assert np.isfinite(fit_nan).all()
    np.testing.assert_allclose(fit_garbage, fit_nan, atol=1e-9)
    # the same garbage read as present moves the fit (the mask is what keeps it out)
    leaked = Predictions(**{**garbage.__dict__, "present": {}})
    assert np.abs(_values(_fit(fusion, leaked, groups, **params)) - fit_nan).max() > 1e-2


def test_margins_of_an_absent_modality_are_zero():
    preds, _ = _preds()
    x = _margins(preds, ["a", "b"])
    have = preds.present["b"]
    assert np.isfinite(x).all()
    assert (x[~have, 2] == 0).all()
    np.testing.assert_allclose(x[have, 2], np.log(preds.aux_scores["b"][have] / (1 - preds.aux_scores["b"][have])))  # fmt: skip


def test_zeroed_margins_fit_like_complete_rows_when_the_absent_modality_is_uninformative():
    """b says nothing about the label: its absent rows zeroed (fused margin unchanged), the fit
    equals the fit on the same rows with b's head reading 0 everywhere - a NaN or a placeholder
    that leaked would differ."""
    rng = np.random.default_rng(1)
    n = 800
    y = rng.integers(0, 2, n)
    groups = rng.integers(0, G, n)
    a = rng.normal(size=n) + (2 * y - 1) * np.where(groups == 0, 1.2, 0.4)
    have_b = rng.random(n) > 0.3
    flat = Predictions(
        index=np.arange(n),
        sample_id=[str(i) for i in range(n)],
        label=y,
        score=_sig(a),
        aux_scores={"a": _sig(a), "b": np.full(n, 0.5)},  # complete, margin 0 everywhere
    )
    missing = Predictions(
        **{
            **flat.__dict__,
            "aux_scores": {"a": _sig(a), "b": np.where(have_b, 0.5, np.nan)},
            "present": {"b": have_b},
        }
    )
    for fusion in ("stacking", "blind_stacking"):
        np.testing.assert_allclose(
            _values(_fit(fusion, missing, groups)), _values(_fit(fusion, flat, groups)), atol=1e-12
        )


def _scrambled(aux: torch.Tensor, have: torch.Tensor, nan: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    noise = torch.full_like(aux, float("nan")) if nan else 20 * torch.randn(aux.shape, generator=g)
    return torch.where(have[:, None], aux, noise)


@pytest.mark.parametrize("module", ["group", "shared"])
def test_predictions_of_an_absent_modality_do_not_depend_on_its_placeholder(module):
    torch.manual_seed(0)
    n = 24
    stack = GroupStacking(G, ["a", "b"]) if module == "group" else SharedStacking(["a", "b"])
    stack.weight.copy_(torch.randn_like(stack.weight))
    stack.bias.copy_(torch.randn_like(stack.bias))
    logits, aux = torch.randn(n, 2), {m: torch.randn(n, 2) for m in ("a", "b")}
    groups = torch.arange(n) % G
    have = torch.arange(n) % 3 != 0
    present = {"a": torch.ones(n, dtype=torch.bool), "b": have}
    base = stack(logits, aux, groups, present)
    for nan in (True, False):
        other = {**aux, "b": _scrambled(aux["b"], have, nan)}
        got = stack(logits, other, groups, present)
        assert torch.isfinite(got).all()
        assert torch.equal(got, base)
    # by hand: b's margin 0 where absent
    w = stack.weight[groups] if module == "group" else stack.weight.expand(n, -1)
    b = stack.bias[groups] if module == "group" else stack.bias
    margins = torch.stack([v[:, 1] - v[:, 0] for v in (logits, aux["a"], aux["b"])], 1)
    margins[~have, 2] = 0
    torch.testing.assert_close(base[:, 1], (w * margins).sum(1) + b)
    # without the mask the placeholder moves them
    unmasked = stack(logits, {**aux, "b": _scrambled(aux["b"], have, False)}, groups)
    assert (unmasked[~have, 1] - base[~have, 1]).abs().min() > 1e-3


def test_multifair_adam_passes_the_batch_presence_to_the_stacking():
    method = build_method("multifair_adam", {"group_fusion": "stacking"}, ["a", "b"], G)
    model = tiny_model(("a", "b"))
    method.setup(model)
    method.group_stack.weight.copy_(torch.tensor([[1.0, 0.5, 2.0], [0.7, -0.5, 3.0]]))
    method.eval()
    model.eval()
    batch = tiny_batch(("a", "b"), size=24, n_groups=G, seed=2)
    have = torch.arange(24) % 3 != 0
    batch["present"] = {"a": torch.ones(24, dtype=torch.bool), "b": have}
    with torch.no_grad():
        out = model(batch)
        got = method(model, batch).logits
    want = method.group_stack(out.logits, out.aux_logits, batch["group"], batch["present"])
    torch.testing.assert_close(got, want)
    ignored = method.group_stack(out.logits, out.aux_logits, batch["group"])
    assert (got[~have, 1] - ignored[~have, 1]).abs().max() > 1e-3


def _table(tmp_path, n: int = 360):
    import pandas as pd

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    sex = rng.choice(["F", "M"], n)
    frame = pd.DataFrame(
        {
            "y": y,
            "sex": sex,
            "a1": rng.normal(size=n) + (2 * y - 1) * np.where(sex == "F", 1.0, 0.2),
            "b1": rng.normal(size=n) + (2 * y - 1) * 0.8,
        }
    )
    frame.loc[rng.random(n) < np.where(sex == "M", 0.3, 0.05), "b1"] = np.nan  # the b block
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "fusion, extra",
    [
        ("stacking", ["method.stacking_data=train+validation"]),
        ("blind_stacking", ["method.stacking_data=train+validation", "method.blind_power=0.7"]),
    ],
)
def test_training_with_stacking_on_a_table_with_a_missing_block(tmp_path, fusion, extra):
    import pandas as pd
    import yaml

    from multifair.cli import main

    config = {
        "data": {
            "kind": "table",
            "path": str(_table(tmp_path)),
            "label": "y",
            "attribute": "sex",
            "attribute_columns": {"sex": "sex"},
            "columns": {"a": {"columns": ["a1"]}, "b": {"columns": ["b1"]}},
            "min_group_size": 0,
            "num_workers": 0,
        },
        "model": {"preset": "small", "dim": 8, "heads": 2, "layers": 1},
        "method": {"name": "multifair_adam", "temperature": float("inf")},
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run"), "n_boot": 0, "predictions": ["test"]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["train", str(tmp_path / "c.yaml"), f"method.group_fusion={fusion}", *extra]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    fits = [v for k, v in metrics["posthoc"].items() if k.startswith("stacking/")]
    assert fits and all(f is not None and np.isfinite(list(f.values())).all() for f in fits)
    # fitted, not left at the identity (a NaN margin stalls the Newton fit there)
    assert any(abs(f["fused"] - 1) > 1e-3 or abs(f["bias"]) > 1e-3 for f in fits)
    assert "b missing" in json.dumps(metrics["test"]["missingness"])
    frame = pd.read_csv(tmp_path / "run" / "predictions_test.csv")
    assert (frame["present_b"] == 0).any() and np.isfinite(frame["score"]).all()
