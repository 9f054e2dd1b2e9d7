"""Fusion with missing modalities (batch["present"]): no placeholder content reaches the
prediction, for attention and concat fusion, in training and eval mode."""

from __future__ import annotations

import pytest
import torch
from test_classifier import B, tiny_batch, tiny_model

MODS = ("fundus", "labs")


def _model(fusion: str) -> torch.nn.Module:
    return tiny_model(MODS, fusion=fusion, dropout=0.0)


def _run(model, batch):
    torch.manual_seed(0)  # the encoders' own dropout draws the same masks in training mode
    with torch.no_grad():
        return model(batch)


def _missing_model(fusion: str):
    from test_classifier import SPECS, TINY

    from multifair.models import build_model

    torch.manual_seed(0)
    cfg = {**TINY, "fusion": fusion, "dropout": 0.0}
    cfg["encoders"] = {m: e for m, e in TINY["encoders"].items() if m in MODS}
    model = build_model(cfg, {m: SPECS[m] for m in MODS}, missing=True)
    with torch.no_grad():  # a non-zero missing token, as after training
        model.missing_tokens.normal_()
    return model


@pytest.mark.parametrize("fusion", ["attention", "concat"])
@pytest.mark.parametrize("train", [True, False])
def test_placeholder_content_does_not_reach_the_prediction(fusion, train):
    model = _missing_model(fusion).train(train)
    batch = tiny_batch(MODS)
    present = torch.tensor([True, False, True, False])
    batch["present"] = {"fundus": present, "labs": torch.ones(B, dtype=torch.bool)}
    other = dict(batch)
    other["fundus"] = batch["fundus"].clone()
    other["fundus"][~present] = torch.randn(int((~present).sum()), 3, 16, 16) * 50
    a, b = _run(model, batch), _run(model, other)
    # samples without a fundus: identical predictions whatever the placeholder holds
    assert torch.allclose(a.logits[~present], b.logits[~present], atol=1e-6)
    # the test can fail: where the fundus IS present, changing it changes the prediction
    changed = dict(batch)
    changed["fundus"] = batch["fundus"] + 5 * torch.randn_like(batch["fundus"])
    c = _run(model, changed)
    assert not torch.allclose(a.logits[present], c.logits[present], atol=1e-4)
    # ... and without the mask the placeholder leaks (what masking prevents)
    no_mask = {k: v for k, v in batch.items() if k != "present"}
    no_mask_other = {k: v for k, v in other.items() if k != "present"}
    d, e = _run(model, no_mask), _run(model, no_mask_other)
    assert not torch.allclose(d.logits[~present], e.logits[~present], atol=1e-4)


def test_placeholders_stay_out_of_batch_statistics():
    """In training mode a BatchNorm encoder normalises over the batch: the samples that HAVE
    the modality must not depend on the absent samples' placeholders (nor may the running
    statistics)."""
    model = _missing_model("attention").train()
    norms = [m for m in model.encoders["fundus"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms, "the tiny fundus encoder must carry a BatchNorm for this test to mean anything"
    batch = tiny_batch(MODS)
    present = torch.tensor([True, False, True, False])
    batch["present"] = {"fundus": present, "labs": torch.ones(B, dtype=torch.bool)}
    other = dict(batch)
    other["fundus"] = batch["fundus"].clone()
    other["fundus"][~present] = torch.randn(int((~present).sum()), 3, 16, 16) * 50 + 20
    a = _run(model, batch)
    stats_a = [n.running_mean.clone() for n in norms]
    b = _run(model, other)
    stats_b = [n.running_mean.clone() for n in norms]
    assert torch.allclose(a.logits[present], b.logits[present], atol=1e-5)
    # the two forward passes each updated the running mean by the same present-only batch
    delta_a = stats_a[0]
    delta_b = stats_b[0] - stats_a[0] * (1 - norms[0].momentum)
    assert torch.allclose(delta_b, delta_a * 1.0, atol=1e-5)
    # a batch where no sample has the fundus still trains (zero rows through the encoder)
    none = dict(batch)
    none["present"] = {"fundus": torch.zeros(B, dtype=torch.bool), "labs": present | ~present}
    out = model(none)
    torch.nn.functional.cross_entropy(out.logits, batch["label"]).backward()
    assert all(torch.isfinite(n.running_mean).all() for n in norms)


def test_attention_excludes_absent_tokens_as_keys():
    """A present token's output must not depend on the absent token, even the learned one."""
    model = _missing_model("attention").eval()
    fusion = model.fusion
    tokens = torch.randn(B, 2, model.dim)
    absent = torch.tensor([[False, True]] * B)
    other = tokens.clone()
    other[:, 1] = torch.randn(B, model.dim)
    with torch.no_grad():
        assert torch.allclose(fusion(tokens, absent), fusion(other, absent), atol=1e-6)
        assert not torch.allclose(fusion(tokens, None), fusion(other, None), atol=1e-4)


def test_missing_token_is_learnt_and_owned_by_the_rest():
    model = _missing_model("attention").train()
    batch = tiny_batch(MODS)
    batch["present"] = {"fundus": torch.tensor([True, False, True, True])}
    out = model(batch)
    torch.nn.functional.cross_entropy(out.logits, batch["label"]).backward()
    assert model.missing_tokens.grad is not None
    assert model.missing_tokens.grad[0].abs().sum() > 0  # fundus' token was used
    assert any(p is model.missing_tokens for p in model.other_parameters())
    assert all(p is not model.missing_tokens for ps in model.modality_parameters().values() for p in ps)  # fmt: skip


def test_model_without_missing_tokens_still_masks():
    """A model trained without missing modalities, predicting on data with some: a zero token
    and masked attention, still independent of the placeholder."""
    model = _model("attention").eval()
    assert model.missing_tokens is None
    batch = tiny_batch(MODS)
    present = torch.tensor([False, True, True, True])
    batch["present"] = {"fundus": present}
    other = dict(batch, fundus=batch["fundus"] * 7 + 3)
    with torch.no_grad():
        assert torch.allclose(model(batch).logits[0], model(other).logits[0], atol=1e-6)
