"""ModelConfig + build_model: default encoder per kind, preset merging, validation at the
boundary, and the `paper` preset's released architecture."""

from __future__ import annotations

import enum
import logging
from types import SimpleNamespace

import pytest
import torch

from multifair.config import resolve
from multifair.errors import UserError
from multifair.models import ModelConfig, build_model
from multifair.models.efficientnet import EfficientNetLite0Encoder
from multifair.models.encoders import CNNEncoder, MLPEncoder, OCT25DEncoder
from multifair.models.text import TextEncoder
from multifair.models.vit import ViTEncoder


def spec(kind, shape=(), **extra):
    return SimpleNamespace(kind=kind, shape=shape, **extra)


IMAGE = spec("image", (3, 16, 16))
VOLUME = spec("volume", (4, 16, 16))
TABLE = spec("tabular", (6,))


def test_small_preset_picks_an_encoder_per_kind():
    model = build_model(
        {"preset": "small"},
        {"fundus": IMAGE, "oct": VOLUME, "labs": TABLE, "note": spec("text")},
    )
    enc = model.encoders
    assert isinstance(enc["fundus"], CNNEncoder) and enc["fundus"].options.width == 16
    assert isinstance(enc["oct"], OCT25DEncoder)
    assert isinstance(enc["oct"].slice_encoder, CNNEncoder)
    assert len(enc["oct"].aggregator.layers) == 1
    assert isinstance(enc["labs"], MLPEncoder) and enc["labs"].out_dim == 64
    assert isinstance(enc["note"], TextEncoder) and enc["note"].frozen
    assert model.dim == 64 and model.fusion_name == "attention"


def test_user_entries_merge_over_the_preset_and_other_encoders_start_fresh():
    cfg = {
        "preset": "small",
        "dim": 32,
        "fusion": "concat",
        "encoders": {
            "fundus": {"width": 8},  # same encoder: merged (depth stays the preset's 4)
            "oct": {
                "slice_encoder": "vit_b16",
                "slice_options": {
                    "image_size": 16,
                    "patch_size": 8,
                    "dim": 16,
                    "depth": 1,
                    "heads": 2,
                },
            },
        },
    }
    model = build_model(cfg, {"fundus": IMAGE, "oct": VOLUME})
    fundus = model.encoders["fundus"]
    assert fundus.options.width == 8 and fundus.options.depth == 4
    assert isinstance(model.encoders["oct"].slice_encoder, ViTEncoder)  # cnn options dropped
    assert model.dim == 32 and model.fusion_name == "concat"

    grey = spec("image", (1, 32, 32))
    model = build_model({"encoders": {"fundus": {"name": "efficientnet_lite0"}}}, {"fundus": grey})
    assert isinstance(model.encoders["fundus"], EfficientNetLite0Encoder)
    assert model.encoders["fundus"].in_channels == 1


def test_custom_preset_uses_the_encoders_own_defaults():
    model = build_model({"preset": "custom"}, {"fundus": IMAGE, "labs": TABLE})
    assert model.encoders["fundus"].options == CNNEncoder.Options()
    assert model.encoders["labs"].options == MLPEncoder.Options()
    assert model.dim == 128


def test_specs_may_be_objects_with_names_channels_and_enum_kinds():
    class Kind(enum.Enum):
        IMAGE = "image"

    fundus = SimpleNamespace(name="fundus", kind=Kind.IMAGE, shape=(200, 200), channels=3)
    model = build_model(None, [fundus])
    assert model.modalities == ["fundus"] and model.encoders["fundus"].in_channels == 3
    out = model(dict(fundus=torch.randn(2, 3, 20, 20)))
    assert out.logits.shape == (2, 2)


def test_config_mistakes_are_one_line_user_errors():
    with pytest.raises(UserError, match=r"model: fusoin: unknown key"):
        build_model({"fusoin": "concat"}, {"fundus": IMAGE})
    with pytest.raises(UserError, match=r"model: preset: .*'huge'"):
        build_model({"preset": "huge"}, {"fundus": IMAGE})
    with pytest.raises(UserError, match=r"model.encoders.fundus: widht: unknown key"):
        build_model({"encoders": {"fundus": {"widht": 3}}}, {"fundus": IMAGE})
    with pytest.raises(UserError, match=r"model.encoders.fundus: encoder 'resnet' not found"):
        build_model({"encoders": {"fundus": {"name": "resnet"}}}, {"fundus": IMAGE})
    with pytest.raises(UserError, match="takes tabular inputs, but modality 'fundus' is image"):
        build_model({"encoders": {"fundus": {"name": "mlp"}}}, {"fundus": IMAGE})
    with pytest.raises(UserError, match="no modality named 'fundsu'"):
        build_model({"encoders": {"fundsu": {"width": 8}}}, {"fundus": IMAGE})
    with pytest.raises(UserError, match="kind 'video' is not one of"):
        build_model(None, {"clip": spec("video", (3, 8, 8))})
    with pytest.raises(UserError, match=r"model\.dim: 30 is not divisible by model\.heads=4"):
        build_model({"dim": 30}, {"fundus": IMAGE})


def test_entries_for_modalities_of_the_dataset_but_not_the_model_are_ignored():
    cfg = {"encoders": {"oct": {"layers": 1}, "fundus": {"width": 8}}}
    model = build_model(cfg, {"fundus": IMAGE}, dataset_modalities=["fundus", "oct"])
    assert model.modalities == ["fundus"]


def test_model_config_resolves_from_overrides():
    cfg = resolve(
        ModelConfig, {"preset": "small"}, overrides=["dim=32", "encoders.labs.hidden=[8]"]
    )
    assert cfg.dim == 32 and cfg.encoders == {"labs": {"hidden": [8]}}
    model = build_model(cfg, {"labs": TABLE})
    assert model.encoders["labs"].out_dim == 8


PAPER_MODALITIES = {
    "fundus": spec("image", (3, 224, 224)),
    "oct": spec("volume", (10, 224, 224)),
    "note": spec("text"),
}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def paper_build():
    """The paper preset built once (about 300M parameters), with the warnings it logged."""
    records = _Records()
    logger = logging.getLogger("multifair.models")
    logger.addHandler(records)
    try:
        torch.manual_seed(0)
        model = build_model({"preset": "paper"}, PAPER_MODALITIES)
    finally:
        logger.removeHandler(records)
    return model, "\n".join(records.messages)


def test_paper_preset_is_the_released_architecture(paper_build):
    model, _ = paper_build
    fundus, oct_, note = (model.encoders[m] for m in ("fundus", "oct", "note"))
    for vit in (fundus, oct_.slice_encoder):
        assert isinstance(vit, ViTEncoder)
        o = vit.options
        assert (o.dim, o.depth, o.heads, o.patch_size, o.image_size) == (768, 12, 12, 16, 224)
        assert vit.pool == "pooler" and vit.out_dim == 768
    assert oct_.slice_encoder.in_channels == 1 and fundus.in_channels == 3
    assert oct_.pos_embed.shape == (1, 10, 768)
    assert len(oct_.aggregator.layers) == 2
    assert oct_.aggregator.layers[0].self_attn.num_heads == 4
    assert type(note.model).__name__ == "BertModel" and note.pooling == "cls"
    assert note.model.config.hidden_size == 768 and note.model.config.num_hidden_layers == 12
    assert note.max_length == 512 and not note.frozen
    assert model.dim == 128 and len(model.fusion.encoder.layers) == 2
    assert model.fusion.encoder.layers[0].self_attn.num_heads == 4
    # ViT-B/16 shape check on one real 224 px image, no backward (CPU time)
    with torch.no_grad():
        assert fundus.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 768)
        assert note.eval()(["iop 21, cup to disc 0.6"]).shape == (1, 768)


def test_paper_preset_says_when_weights_are_random(paper_build):
    _, logged = paper_build
    assert "model.encoders.fundus: vit_b16 starts from RANDOM weights" in logged
    assert "model.encoders.oct.slice_options: vit_b16 starts from RANDOM weights" in logged
    assert "model.encoders.note: no local files for 'bert-base-uncased'" in logged
    assert "RANDOMLY initialised BERT-base (nothing can be downloaded)" in logged


@pytest.mark.slow
def test_paper_preset_forward_at_224px(paper_build):
    paper_model, _ = paper_build
    batch = {
        "fundus": torch.randn(2, 3, 224, 224),
        "oct": torch.randn(2, 10, 224, 224),
        "note": ["no clinical notes available", "glaucoma suspect, elevated iop"],
    }
    with torch.no_grad():
        out = paper_model.eval()(batch)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
