"""MultimodalClassifier: shapes, where gradients go, modality zeroing in `fuse`, parameter
ownership, concat fusion, M = 1 / 3, state_dict round trip."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from multifair.errors import UserError
from multifair.methods.base import ModelOutput
from multifair.models import InputSpec, MultimodalClassifier, build_encoder, build_model

B = 4
SPECS = {
    "fundus": SimpleNamespace(kind="image", shape=(3, 16, 16)),
    "oct": SimpleNamespace(kind="volume", shape=(3, 16, 16)),
    "labs": SimpleNamespace(kind="tabular", shape=(5,)),
}
TINY = {
    "preset": "small",
    "dim": 16,
    "heads": 2,
    "encoders": {
        "fundus": {"width": 4, "depth": 2},
        "oct": {"slice_options": {"width": 4, "depth": 2}, "heads": 2},
        "labs": {"hidden": [8]},
    },
}


def tiny_model(modalities=("fundus", "oct", "labs"), seed=0, **cfg) -> MultimodalClassifier:
    torch.manual_seed(seed)
    config = {**TINY, **cfg}
    config["encoders"] = {m: e for m, e in TINY["encoders"].items() if m in modalities}
    return build_model(config, {m: SPECS[m] for m in modalities})


def tiny_batch(modalities=("fundus", "oct", "labs"), seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "fundus": torch.randn(B, 3, 16, 16, generator=g),
        "oct": torch.randn(B, 3, 16, 16, generator=g),
        "labs": torch.randn(B, 5, generator=g),
        "label": torch.tensor([0, 1, 0, 1]),
    }
    return {k: v for k, v in batch.items() if k in modalities or k == "label"}


def test_forward_returns_model_output_with_the_contract_shapes():
    model = tiny_model().eval()
    out = model(tiny_batch())
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (B, 2) and out.head_input.shape == (B, 16)
    assert list(out.features) == ["fundus", "oct", "labs"] == model.modalities
    for m in model.modalities:
        assert out.features[m].shape == (B, 16)
        assert out.aux_logits[m].shape == (B, 2)
        assert torch.allclose(out.aux_logits[m], model.aux_heads[m](out.features[m]))
        assert model.aux_last_layer(m) is model.aux_heads[m].out
    # head_input is the input of the head's last linear layer (closed-form gradients)
    assert torch.allclose(model.head_last_layer()(out.head_input), out.logits)
    assert model.n_classes == 2 and model.dim == 16


def test_task_loss_reaches_everything_but_aux_heads_and_aux_loss_only_aux_heads():
    model = tiny_model().train()
    out = model(tiny_batch())
    F.cross_entropy(out.logits, tiny_batch()["label"]).backward(retain_graph=True)
    aux_ids = {id(p) for p in model.aux_parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in aux_ids and p.grad is None]
    assert not missing, f"Some parameters are missing gradients: {missing}"
    assert all(p.grad is None for p in model.aux_parameters())

    model.zero_grad(set_to_none=True)
    aux = sum(F.cross_entropy(u, tiny_batch()["label"]) for u in out.aux_logits.values())
    aux.backward()
    # h_i is detached before C_i: nothing reaches encoders, projections, fusion or head
    leaked = [n for n, p in model.named_parameters() if id(p) not in aux_ids and p.grad is not None]
    assert not leaked, f"auxiliary loss reached {leaked}"
    assert all(p.grad is not None for p in model.aux_parameters())


def _manual_attention_fuse(model: MultimodalClassifier, tokens: list[torch.Tensor]):
    """Fusion + head recomputed layer by layer from the model's parts (eval mode)."""
    x = torch.stack(tokens, dim=1)  # (B, M, d)
    for layer in model.fusion.encoder.layers:
        x = layer(x)
    linear, norm = model.head.body[0], model.head.body[1]
    a = F.gelu(norm(linear(x[:, 0])))
    return a, model.head.out(a)


def test_fuse_zeroes_a_modality_like_a_manual_computation():
    model = tiny_model().eval()
    with torch.no_grad():
        h = model.encode(tiny_batch())
        zero = torch.zeros_like(h["oct"])

        # whole-batch zeroing with a Python bool
        a, z = model.fuse(h, present={"oct": False})
        a_ref, z_ref = _manual_attention_fuse(model, [h["fundus"], zero, h["labs"]])
        assert torch.allclose(a, a_ref, atol=1e-5) and torch.allclose(z, z_ref, atol=1e-5)

        # all present is the forward pass
        assert torch.allclose(model.fuse(h, present={"oct": True})[1], model(tiny_batch()).logits)

        # per-sample (B,) bool tensor: rows pick from the two manual results
        keep = torch.tensor([True, False, False, True])
        _, z_mix = model.fuse(h, present={"oct": keep})
        _, z_all = _manual_attention_fuse(model, [h["fundus"], h["oct"], h["labs"]])
        expected = torch.where(keep[:, None], z_all, z_ref)
        assert torch.allclose(z_mix, expected, atol=1e-5)

        # a (B,) float weight scales the token
        w = torch.tensor([1.0, 0.0, 0.5, 2.0])
        _, z_w = model.fuse(h, present={"oct": w})
        _, z_w_ref = _manual_attention_fuse(model, [h["fundus"], h["oct"] * w[:, None], h["labs"]])
        assert torch.allclose(z_w, z_w_ref, atol=1e-5)

        # two modalities at once
        _, z2 = model.fuse(h, present={"fundus": False, "labs": torch.zeros(B, dtype=torch.bool)})
        _, z2_ref = _manual_attention_fuse(model, [torch.zeros_like(zero), h["oct"], zero])
        assert torch.allclose(z2, z2_ref, atol=1e-5)
    with pytest.raises(KeyError, match="unknown modalities"):
        model.fuse(h, present={"text": False})


def test_concat_fusion_is_a_linear_map_of_the_concatenated_tokens_and_trains():
    model = tiny_model(fusion="concat").eval()
    with torch.no_grad():
        h = model.encode(tiny_batch())
        a, z = model.fuse(h, present={"fundus": False})
        cat = torch.cat([torch.zeros_like(h["fundus"]), h["oct"], h["labs"]], dim=1)  # (B, 3d)
        fused = cat @ model.fusion.proj.weight.T + model.fusion.proj.bias
        linear, norm = model.head.body[0], model.head.body[1]
        a_ref = F.gelu(norm(linear(fused)))
        assert torch.allclose(a, a_ref, atol=1e-5)
        assert torch.allclose(z, model.head.out(a_ref), atol=1e-5)
    model.train()
    out = model(tiny_batch())
    (out.logits.sum() + sum(u.sum() for u in out.aux_logits.values())).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"Some parameters are missing gradients: {missing}"


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_a_single_modality_model_works(fusion):
    model = tiny_model(modalities=("labs",), fusion=fusion)
    out = model(tiny_batch(("labs",)))
    assert out.logits.shape == (B, 2) and list(out.features) == ["labs"]
    _, z = model.eval().fuse(model.encode(tiny_batch(("labs",))), present={"labs": False})
    assert z.shape == (B, 2)


def test_parameter_sets_are_disjoint_and_cover_the_model():
    model = tiny_model()
    per_modality = model.modality_parameters()
    sets = [{id(p) for p in ps} for ps in per_modality.values()]
    sets += [{id(p) for p in model.other_parameters()}, {id(p) for p in model.aux_parameters()}]
    union = set().union(*sets)
    assert sum(len(s) for s in sets) == len(union), "parameter sets overlap"
    assert union == {id(p) for p in model.parameters()}, "parameter sets do not cover the model"
    # the right things on the right side (by object identity, never by name)
    oct_ids = {id(p) for p in per_modality["oct"]}
    assert id(model.encoders["oct"].pos_embed) in oct_ids
    assert all(id(p) in oct_ids for p in model.encoders["oct"].aggregator.parameters())
    other = {id(p) for p in model.other_parameters()}
    for module in (model.projections, model.fusion, model.head):
        assert all(id(p) in other for p in module.parameters())
    assert {id(p) for p in model.aux_parameters()} == {id(p) for p in model.aux_heads.parameters()}


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    model = tiny_model(seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = tiny_model(seed=1).eval()
    batch = tiny_batch()
    with torch.no_grad():
        assert not torch.allclose(other(batch).logits, model(batch).logits)
        other.load_state_dict(state)
        assert torch.equal(other(batch).logits, model(batch).logits)


def test_bad_batches_and_names_are_user_errors():
    model = tiny_model()
    with pytest.raises(UserError, match="no entry for modality 'oct'"):
        model({"fundus": torch.randn(2, 3, 16, 16), "labs": torch.randn(2, 5)})
    batch = tiny_batch()
    batch["fundus"] = torch.zeros(B, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(UserError, match=r"'fundus'.*uint8"):
        model(batch)
    enc = build_encoder("mlp", {}, InputSpec("a.b", "tabular", (3,)))
    with pytest.raises(UserError, match="module keys"):
        MultimodalClassifier({"a.b": enc})
    with pytest.raises(UserError, match=r"model\.dim: 10 is not divisible by model\.heads=4"):
        MultimodalClassifier({"labs": enc}, dim=10, heads=4)
