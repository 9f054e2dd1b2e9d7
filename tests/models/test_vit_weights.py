"""vit_b16 against an independent implementation: Hugging Face's ViTModel (the released
model's encoder). A tiny random HF ViT saved to disk must give the same pooled output
through our pure-torch ViT once its checkpoint is loaded."""

from __future__ import annotations

import logging

import pytest
import torch

from multifair.errors import UserError
from multifair.models import InputSpec, build_encoder

TINY = {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2}


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )
    model = ViTModel(config).eval()  # layer_norm_eps 1e-12, pooler tanh(Linear([CLS]))
    folder = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(folder)
    return model, folder


def _ours(weights, pool="pooler", channels=3, **extra):
    options = {**TINY, "weights": str(weights), "pool": pool, "layer_norm_eps": 1e-12, **extra}
    return build_encoder("vit_b16", options, InputSpec("f", "image", (channels, 32, 32))).eval()


def test_hf_checkpoint_folder_gives_the_same_pooled_output(hf_vit):
    model, folder = hf_vit
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model(pixel_values=x)
        assert torch.allclose(_ours(folder)(x), reference.pooler_output, atol=1e-5)
        cls = _ours(folder, pool="cls")(x)
        assert torch.allclose(cls, reference.last_hidden_state[:, 0], atol=1e-5)


def test_grey_input_with_rgb_weights_equals_repeating_grey_to_rgb(hf_vit, tmp_path):
    model, _ = hf_vit
    path = tmp_path / "vit.bin"  # the HF state dict as a single file, with the "vit." prefix
    torch.save({f"vit.{k}": v for k, v in model.state_dict().items()}, path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ours = _ours(path, channels=1)(x)
        assert torch.allclose(
            ours, model(pixel_values=x.repeat(1, 3, 1, 1)).pooler_output, atol=1e-5
        )


def test_own_state_dict_round_trips_and_other_sizes_are_resampled(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_encoder("vit_b16", TINY, InputSpec("f", "image", (3, 32, 32))).eval()
    path = tmp_path / "own.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_ours(path, layer_norm_eps=1e-6)(x), source(x))
        # a 48 px model from 32 px weights: position embeddings resampled from 4x4 to 6x6
        bigger = _ours(path, layer_norm_eps=1e-6, image_size=48)
        assert bigger.pos_embed.shape == (1, 1 + 36, 32)
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 32)
    # a timm-style checkpoint without a pooler: loads, and the random pooler is announced
    no_pooler = {k: v for k, v in source.state_dict().items() if not k.startswith("pooler.")}
    torch.save(no_pooler, path)
    with caplog.at_level(logging.WARNING):
        _ours(path, layer_norm_eps=1e-6)
    assert "no pooler weights" in caplog.text


def test_random_init_is_announced_and_wrong_checkpoints_are_user_errors(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        build_encoder("vit_b16", TINY, InputSpec("fundus", "image", (3, 32, 32)))
    assert "RANDOM weights" in caplog.text
    with pytest.raises(UserError, match="file not found"):
        _ours(tmp_path / "missing.pt")
    torch.manual_seed(0)
    wide = build_encoder("vit_b16", {**TINY, "dim": 16}, InputSpec("f", "image", (3, 32, 32)))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(UserError, match="shape mismatch"):
        _ours(tmp_path / "wide.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not match this ViT"):
        _ours(tmp_path / "other.pt")
