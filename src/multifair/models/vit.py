"""`vit_b16`: a plain Vision Transformer (ViT-B/16 by default) in pure torch.

The released MultiFair model uses `transformers.ViTModel` (google/vit-base-patch16-224-in21k)
and its pooled output: tanh(Linear(final [CLS])). This module is the same network written
with `scaled_dot_product_attention` and timm's parameter names, so it loads

- a timm ViT state dict (`vit_base_patch16_224` and friends; `head.*` is dropped),
- a Hugging Face ViTModel checkpoint (a folder with model.safetensors / pytorch_model.bin,
  or the file itself; keys are converted, q/k/v are concatenated),
- its own state dict,

from a LOCAL file or folder. Without weights it starts from random init and says so.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from multifair.errors import UserError
from multifair.models.encoders import (
    ENCODERS,
    Encoder,
    EncoderOptions,
    InputSpec,
    fold_input_channels,
)

log = logging.getLogger(__name__)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d_head)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, heads, N, d_head)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (ViT / timm / HF ViTLayer)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # (B, D, H/p, W/p)


def resample_pos_embed(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubic resize of the patch part of (1, 1 + g*g, D) position embeddings to `grid`."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = math.isqrt(patches.shape[1])
    assert g * g == patches.shape[1], "position embeddings must form a square grid"
    if (g, g) == grid:
        return pos
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
    patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([cls, patches], dim=1)


@ENCODERS.register("vit_b16")
class ViTEncoder(Encoder):
    """ViT (B/16 by default: dim 768, 12 layers, 12 heads, 224 px), one feature per image.

    pool: `pooler` = tanh(Linear([CLS])) as HF ViTModel's pooler_output (the released choice),
    `cls` = the final normed [CLS], `mean` = mean of the final normed patch tokens.
    Inputs of another size than `image_size` get bicubically resized position embeddings.
    A 1-channel input folds the pretrained RGB patch filters (equal to repeating grey to RGB).
    """

    kinds = ("image", "volume")

    class Options(EncoderOptions):
        weights: str | None = None  # local file or HF folder; None = random init (logged)
        image_size: PositiveInt = 224
        patch_size: PositiveInt = 16
        dim: PositiveInt = 768
        depth: PositiveInt = 12
        heads: PositiveInt = 12
        mlp_ratio: float = Field(4.0, gt=0)
        pool: Literal["pooler", "cls", "mean"] = "pooler"
        layer_norm_eps: float = Field(1e-6, gt=0)  # timm 1e-6; HF ViT checkpoints use 1e-12
        dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def __init__(self, options: Options, spec: InputSpec) -> None:
        super().__init__(options, spec)
        o = options
        source = spec.source
        if o.dim % o.heads:
            raise UserError(f"{source}: vit dim {o.dim} is not divisible by heads {o.heads}")
        if o.image_size % o.patch_size:
            raise UserError(
                f"{source}: vit image_size {o.image_size} is not a multiple of patch_size "
                f"{o.patch_size}"
            )
        self.in_channels = spec.in_channels
        self.patch_size = o.patch_size
        self.pool = o.pool
        grid = o.image_size // o.patch_size
        # Built on the meta device and initialised once by reset_parameters: the layers'
        # default init would double ViT-B's start-up time for values that are overwritten.
        with torch.device("meta"):
            self.patch_embed = PatchEmbed(self.in_channels, o.dim, o.patch_size)
            self.cls_token = nn.Parameter(torch.empty(1, 1, o.dim))
            self.pos_embed = nn.Parameter(torch.empty(1, 1 + grid * grid, o.dim))
            self.blocks = nn.ModuleList(
                Block(o.dim, o.heads, o.mlp_ratio, o.layer_norm_eps, o.dropout)
                for _ in range(o.depth)
            )
            self.norm = nn.LayerNorm(o.dim, eps=o.layer_norm_eps)
            self.pooler = nn.Linear(o.dim, o.dim) if o.pool == "pooler" else None
        self.to_empty(device=torch.get_default_device())
        self.pos_drop = nn.Dropout(o.dropout)
        self.out_dim = o.dim
        self.reset_parameters()
        if o.weights is None:
            log.warning(
                "%s: vit_b16 starts from RANDOM weights (no `weights` given; the released model "
                "starts from ImageNet-21k ViT-B/16 - pass a local timm or Hugging Face "
                "checkpoint as weights=PATH)",
                source,
            )
        else:
            load_vit_weights(self, o.weights, source=f"{source}.weights")

    def reset_parameters(self) -> None:
        """timm/HF-style init: normal(0, 0.02) weights and embeddings, zero biases, unit norms.

        (timm's trunc_normal_(std=0.02) truncates at +-2 absolute, i.e. 100 std: the same
        distribution, at twice the cost.)
        """
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear | nn.Conv2d):
                    module.weight.normal_(0.0, 0.02)
                    module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            self.pos_embed.normal_(0.0, 0.02)
            self.cls_token.normal_(0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_tensor(x, 4, "(B, C, H, W)")
        if x.shape[1] != self.in_channels:
            raise UserError(
                f"modality {self.spec.modality!r}: vit was built for {self.in_channels} "
                f"channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        p = self.patch_embed(x)  # (B, D, gh, gw)
        grid = (p.shape[2], p.shape[3])
        tokens = p.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, tokens], dim=1) + resample_pos_embed(self.pos_embed, grid)
        tokens = self.pos_drop(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)  # (B, 1 + N, D)
        if self.pool == "mean":
            return tokens[:, 1:].mean(dim=1)  # (B, D)
        if self.pooler is not None:
            return torch.tanh(self.pooler(tokens[:, 0]))  # (B, D)
        return tokens[:, 0]  # (B, D)


# ---- checkpoints ---------------------------------------------------------------------------

_HF_RULES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    # transformers >= 5 names the same tensors differently in memory (files keep the above)
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^layernorm\.", "norm."),
    (r"^pooler\.dense\.", "pooler."),
]
_HF_QKV = re.compile(
    r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?"
    r"(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$"
)
_QKV_PART = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def _read_state_dict(path: Path, source: str) -> dict[str, Tensor]:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return _read_state_dict(path / name, source)
        raise UserError(f"{source}: {path} holds no model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise UserError(f"{source}: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file is a user mistake here
        raise UserError(f"{source}: cannot read {path} ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{source}: {path} does not hold a state dict")
    return state


def convert_hf_vit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ViTModel keys -> this module's (timm's) keys."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if key == "embeddings.mask_token" or key.startswith("classifier."):
            continue
        m = _HF_QKV.match(key)
        if m:
            part = _QKV_PART.get(m.group(2), m.group(2))
            qkv.setdefault((m.group(1), m.group(3)), {})[part] = value
            continue
        for pattern, repl in _HF_RULES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            out[key] = value  # left for the unexpected-keys check
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


def load_vit_weights(model: ViTEncoder, path: str | Path, source: str = "weights") -> None:
    """Load a local timm / Hugging Face / own ViT checkpoint into `model` (strict, explained)."""
    state = _read_state_dict(Path(path), source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith(("embeddings.", "vit.embeddings.")) for k in state):
        state = convert_hf_vit(state)
    dropped = (
        ("head.", "fc_norm.") if model.pooler is not None else ("head.", "fc_norm.", "pooler.")
    )
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        g = math.isqrt(own["pos_embed"].shape[1] - 1)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (g, g))
    key = "patch_embed.proj.weight"
    if key in state and state[key].shape[1] != own[key].shape[1]:
        state[key] = fold_input_channels(state[key], own[key].shape[1])
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    pooler_only = all(k.startswith("pooler.") for k in missing)
    if unexpected or (missing and not pooler_only):
        raise UserError(
            f"{source}: {path} does not match this ViT (options dim/depth/heads/patch_size): "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    bad = [k for k in state if state[k].shape != own[k].shape]
    if bad:
        raise UserError(
            f"{source}: {path}: shape mismatch for {bad[0]}: checkpoint "
            f"{tuple(state[bad[0]].shape)}, model {tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict(state, strict=False)
    if missing:
        log.warning(
            "%s: %s has no pooler weights; the pooler starts from random init", source, path
        )
