"""Per-modality encoders f_i: a registry, the shared base class and the small built-in ones.

Every encoder maps one modality's batch to a feature matrix (B, F) and states its width F in
`out_dim`, so the classifier can project it to the fusion width d. Inputs are what the data
package's device transform hands over:

- image  (B, C, H, W) float, C = 1 or 3
- volume (B, K, H, W) float, K slices (OCT B-scans)
- tabular (B, F) float, standardised numeric columns
- text   list[str] of length B (tokenisation belongs to the text encoder)

Register a new encoder with `@ENCODERS.register("name")` on an `Encoder` subclass that has a
nested `Options` (pydantic, unknown keys are errors) and add its module to the explicit
import list in `multifair/models/__init__.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor, nn

from multifair.config import validate
from multifair.errors import UserError
from multifair.registry import Registry

log = logging.getLogger(__name__)

KINDS = ("image", "volume", "tabular", "text")


@dataclass(frozen=True)
class InputSpec:
    """What an encoder needs to know about its modality, normalised from a ModalitySpec.

    `shape` is the per-sample shape the model receives: (C, H, W) for images, (K, H, W)
    for volumes, (F,) for tables, () for text. `channels`, when the data package states it,
    overrides the image channel count (fundus photos become RGB in the device transform).
    """

    modality: str
    kind: str
    shape: tuple[int, ...] = ()
    channels: int | None = None
    key: str | None = None  # config location for messages; default model.encoders.<modality>

    @classmethod
    def of(cls, modality: str, spec: Any) -> InputSpec:
        """Read any object with `.kind` and `.shape` (and optional `.channels`)."""
        kind = getattr(spec, "kind", None)
        kind = getattr(kind, "value", kind)  # accept an Enum
        if kind not in KINDS:
            raise UserError(f"modality {modality!r}: kind {kind!r} is not one of {list(KINDS)}")
        shape = tuple(int(s) for s in (getattr(spec, "shape", None) or ()))
        channels = getattr(spec, "channels", None)
        return cls(modality, str(kind), shape, None if channels is None else int(channels))

    @property
    def source(self) -> str:
        """Where this encoder is configured, for error and log messages."""
        return self.key or f"model.encoders.{self.modality}"

    @property
    def in_channels(self) -> int:
        """Channels a 2-D encoder sees: image channels, or K slices stacked as channels."""
        if self.kind == "image":
            if self.channels is not None:
                return self.channels
            return self.shape[0] if len(self.shape) == 3 else 1
        if self.kind == "volume":
            if not self.shape:
                raise UserError(f"modality {self.modality!r}: a volume needs its shape (K, H, W)")
            return self.shape[0]
        raise UserError(f"modality {self.modality!r} ({self.kind}) has no image channels")

    @property
    def spatial(self) -> tuple[int, int] | None:
        """(H, W) when the spec states it."""
        return (self.shape[-2], self.shape[-1]) if len(self.shape) >= 2 else None

    @property
    def n_features(self) -> int:
        if not self.shape:
            raise UserError(f"modality {self.modality!r}: a table needs its shape (F,)")
        return math.prod(self.shape)

    def slice_spec(self) -> InputSpec:
        """The spec of one slice of a volume: a 1-channel image."""
        h_w = self.shape[1:] if len(self.shape) == 3 else ()
        return InputSpec(self.modality, "image", (1, *h_w), 1, f"{self.source}.slice_options")


class EncoderOptions(BaseModel):
    """Base of every encoder's options; unknown keys are errors naming the key."""

    model_config = ConfigDict(extra="forbid")


class Encoder(nn.Module):
    """f_i: one modality's batch -> (B, out_dim) features."""

    Options: ClassVar[type[EncoderOptions]] = EncoderOptions
    kinds: ClassVar[tuple[str, ...]] = ()  # modality kinds this encoder accepts
    out_dim: int

    def __init__(self, options: EncoderOptions, spec: InputSpec) -> None:
        super().__init__()
        self.options = options
        self.spec = spec

    def check_tensor(self, x: Any, ndim: int, layout: str) -> Tensor:
        """Shape/dtype check at the model boundary (metadata only: no host sync)."""
        if not isinstance(x, Tensor) or x.dim() != ndim or not x.is_floating_point():
            got = (
                f"{x.dtype} tensor of shape {tuple(x.shape)}"
                if isinstance(x, Tensor)
                else type(x).__name__
            )
            raise UserError(
                f"modality {self.spec.modality!r}: the encoder expects a float {layout} "
                f"tensor, got a {got} (uint8 images must go through the data package's "
                f"device transform first)"
            )
        return x


ENCODERS: Registry[type[Encoder]] = Registry("encoder")


def build_encoder(
    name: str, options: Mapping[str, Any] | None, spec: InputSpec, source: str | None = None
) -> Encoder:
    """Look up an encoder, validate its options and build it for one modality.

    `source` names the config location in error messages (default `spec.source`, e.g.
    `model.encoders.fundus`).
    """
    source = source or spec.source
    try:
        cls = ENCODERS.get(name)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    if spec.kind not in cls.kinds:
        raise UserError(
            f"{source}: encoder {name!r} takes {' or '.join(cls.kinds)} inputs, but modality "
            f"{spec.modality!r} is {spec.kind}"
        )
    parsed = validate(cls.Options, dict(options or {}), source=source)
    encoder = cls(parsed, spec)
    assert isinstance(encoder.out_dim, int) and encoder.out_dim > 0, name
    return encoder


def fold_input_channels(weight: Tensor, channels: int) -> Tensor:
    """Adapt a pretrained RGB stem (O, 3, kh, kw) to `channels` inputs.

    Summing the RGB filters and spreading them evenly over the new channels makes a grey
    image replicated to every channel give exactly the pretrained response - what the released
    code gets by repeating a grey slice to three channels, without the copy.
    """
    if weight.shape[1] == channels:
        return weight
    folded = weight.sum(dim=1, keepdim=True) / channels  # (O, 1, kh, kw)
    return folded.repeat(1, channels, 1, 1).contiguous()


# ---- cnn -----------------------------------------------------------------------------------


@ENCODERS.register("cnn")
class CNNEncoder(Encoder):
    """A small 2-D CNN: `depth` conv(3x3, stride 2)-BN-ReLU blocks, then global average pooling.

    Channels double each block from `width` up to `max_width`. Any input size works (>= 16 px
    keeps every block meaningful); a volume given to it directly is read as K channels.
    """

    kinds = ("image", "volume")

    class Options(EncoderOptions):
        width: PositiveInt = 32
        depth: int = Field(4, ge=1, le=8)
        max_width: PositiveInt = 256

    def __init__(self, options: Options, spec: InputSpec) -> None:
        super().__init__(options, spec)
        self.in_channels = spec.in_channels
        blocks: list[nn.Module] = []
        c_in = self.in_channels
        for i in range(options.depth):
            c_out = min(options.width * 2**i, options.max_width)
            blocks += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_tensor(x, 4, "(B, C, H, W)")
        if x.shape[1] != self.in_channels:
            raise UserError(
                f"modality {self.spec.modality!r}: cnn was built for {self.in_channels} "
                f"channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        return self.pool(self.features(x)).flatten(1)  # (B, F)


# ---- mlp -----------------------------------------------------------------------------------


@ENCODERS.register("mlp")
class MLPEncoder(Encoder):
    """An MLP for a group of numeric columns: (Linear -> ReLU -> Dropout) per hidden layer."""

    kinds = ("tabular",)

    class Options(EncoderOptions):
        hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 64], min_length=1)
        dropout: float = Field(0.1, ge=0.0, lt=1.0)

    def __init__(self, options: Options, spec: InputSpec) -> None:
        super().__init__(options, spec)
        self.in_features = spec.n_features
        layers: list[nn.Module] = []
        f_in = self.in_features
        for f_out in options.hidden:
            layers += [nn.Linear(f_in, f_out), nn.ReLU(inplace=True), nn.Dropout(options.dropout)]
            f_in = f_out
        self.layers = nn.Sequential(*layers)
        self.out_dim = f_in

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() > 2:
            x = x.flatten(1)  # (B, F)
        x = self.check_tensor(x, 2, "(B, F)")
        if x.shape[1] != self.in_features:
            raise UserError(
                f"modality {self.spec.modality!r}: mlp was built for {self.in_features} "
                f"features, got {x.shape[1]}"
            )
        return self.layers(x)  # (B, hidden[-1])


# ---- oct25d --------------------------------------------------------------------------------


@ENCODERS.register("oct25d")
class OCT25DEncoder(Encoder):
    """2.5-D OCT encoder (the paper's): one shared 2-D encoder over the K slices, a learned
    slice position embedding, a small transformer over the slices, first position's output.

    The slice encoder is any registered image encoder (`cnn` by default; the `paper` preset
    uses `vit_b16`); it sees each slice as a 1-channel image. All of it - slice encoder,
    position embedding and aggregator - is this modality's f_i.
    """

    kinds = ("volume",)

    class Options(EncoderOptions):
        slice_encoder: str = "cnn"
        slice_options: dict[str, Any] = Field(default_factory=dict)
        max_slices: PositiveInt | None = None  # position embeddings; default: K of the spec
        dim: PositiveInt | None = None  # aggregator width; default: the slice feature width
        heads: PositiveInt = 4
        layers: PositiveInt = 2
        dropout: float = Field(0.1, ge=0.0, lt=1.0)

    def __init__(self, options: Options, spec: InputSpec) -> None:
        super().__init__(options, spec)
        source = spec.source
        if options.slice_encoder == "oct25d":
            raise UserError(f"{source}.slice_encoder: must be a 2-D image encoder, not 'oct25d'")
        k = spec.shape[0] if spec.shape else None
        max_slices = options.max_slices or k
        if max_slices is None:
            raise UserError(f"{source}.max_slices: needed when the volume's shape is unknown")
        if k is not None and k > max_slices:
            raise UserError(
                f"{source}.max_slices: {max_slices} is fewer than the volume's {k} slices"
            )
        self.slice_encoder = build_encoder(
            options.slice_encoder,
            options.slice_options,
            spec.slice_spec(),
        )
        width = options.dim or self.slice_encoder.out_dim
        if width % options.heads:
            raise UserError(
                f"{source}: the slice transformer width {width} is not divisible by heads="
                f"{options.heads} (set dim or heads)"
            )
        # A projection only when a width different from the slice features is asked for.
        self.slice_proj = (
            nn.Identity()
            if width == self.slice_encoder.out_dim
            else nn.Linear(self.slice_encoder.out_dim, width)
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, max_slices, width))
        nn.init.normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, options.heads, 4 * width, options.dropout, activation="gelu", batch_first=True
        )
        self.aggregator = nn.TransformerEncoder(layer, options.layers, enable_nested_tensor=False)
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_tensor(x, 4, "(B, K, H, W)")
        b, k, h, w = x.shape
        if k > self.pos_embed.shape[1]:
            raise UserError(
                f"modality {self.spec.modality!r}: {k} slices, but the oct25d encoder has "
                f"position embeddings for {self.pos_embed.shape[1]} (max_slices)"
            )
        s = self.slice_encoder(x.reshape(b * k, 1, h, w))  # (B*K, F)
        s = self.slice_proj(s).reshape(b, k, -1) + self.pos_embed[:, :k]  # (B, K, D)
        return self.aggregator(s)[:, 0]  # (B, D): first slice position


# ---- timm ----------------------------------------------------------------------------------


@ENCODERS.register("timm")
class TimmEncoder(Encoder):
    """Any timm backbone by name, pooled features (`num_classes=0`). Needs timm importable.

    Nothing is downloaded: pretrained weights come only from a local `weights` file.
    """

    kinds = ("image", "volume")

    class Options(EncoderOptions):
        model: str
        weights: str | None = None
        kwargs: dict[str, Any] = Field(default_factory=dict)  # extra timm.create_model arguments

    def __init__(self, options: Options, spec: InputSpec) -> None:
        super().__init__(options, spec)
        source = spec.source
        try:
            import timm
        except Exception as exc:  # ImportError, or a torchvision that does not match torch
            raise UserError(
                f"{source}: encoder 'timm' needs the timm package, which is not importable "
                f"here ({type(exc).__name__}: {exc}); install it with "
                f"`pip install 'multifair[timm]'` and a torchvision matching torch"
            ) from None
        kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": spec.in_channels, **options.kwargs}
        if options.weights is not None:
            if not Path(options.weights).is_file():
                raise UserError(f"{source}.weights: file not found: {options.weights}")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": options.weights})
        else:
            log.warning(
                "%s: timm %r starts from random weights (no local `weights` file given; nothing "
                "is downloaded)",
                source,
                options.model,
            )
        try:
            self.backbone = timm.create_model(options.model, **kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"{source}: timm model {options.model!r}: {exc}") from None
        self.out_dim = int(self.backbone.num_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_tensor(x, 4, "(B, C, H, W)")
        return self.backbone(x)  # (B, F) pooled: num_classes=0 removes the classifier
