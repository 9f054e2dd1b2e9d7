"""Fusion of the M modality tokens h_i (B, d) into one vector (B, d), and the MLP heads.

`attention` is the released model's "multi-head attention fusion": a small transformer
encoder (post-norm, GELU, feed-forward 4d) over the M tokens, first token's output.
`concat` concatenates the tokens and maps them back to d with one Linear layer.

Missing modalities (`absent` (B, M) bool, True where sample b lacks modality m): the
classifier first replaces an absent token by its modality's learned "missing" embedding, so
no placeholder content enters fusion. Attention then also excludes absent tokens as keys:
a token attends to itself and to the present tokens only (masking its own key too would leave
a missing first token with nothing to attend to). Concat keeps the slot, holding the learned
embedding: its Linear layer learns what "m missing" means, which renormalising the present
slots could not express (each slot has its own weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FUSIONS = ("attention", "concat")


class AttentionFusion(nn.Module):
    """Transformer encoder over the modality tokens; the first token's output is the fused vector."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.heads = heads

    def forward(self, tokens: Tensor, absent: Tensor | None = None) -> Tensor:
        if absent is None:
            return self.encoder(tokens)[:, 0]  # (B, M, d) -> (B, d)
        m = tokens.shape[1]
        eye = torch.eye(m, dtype=torch.bool, device=tokens.device)
        blocked = absent[:, None, :] & ~eye  # (B, M, M): query i may not read absent key j != i
        mask = blocked.repeat_interleave(self.heads, dim=0)  # (B * heads, M, M)
        return self.encoder(tokens, mask=mask)[:, 0]  # (B, M, d) -> (B, d)


class ConcatFusion(nn.Module):
    """Concatenate the M tokens and project back to d."""

    def __init__(self, dim: int, n_modalities: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_modalities * dim, dim)

    def forward(self, tokens: Tensor, absent: Tensor | None = None) -> Tensor:
        # absent tokens already hold the learned missing embedding (see the module docstring)
        return self.proj(tokens.flatten(1))  # (B, M, d) -> (B, M*d) -> (B, d)


def build_fusion(
    name: str, dim: int, n_modalities: int, heads: int, layers: int, dropout: float
) -> nn.Module:
    if name == "attention":
        return AttentionFusion(dim, heads, layers, dropout)
    if name == "concat":
        return ConcatFusion(dim, n_modalities)
    raise ValueError(f"fusion {name!r} not found. Available: {list(FUSIONS)}")


class MLPHead(nn.Module):
    """Linear(d, d) -> [LayerNorm] -> activation -> Dropout -> Linear(d, n_classes).

    `body` gives the input of the last linear layer (`out`), which methods need for
    closed-form last-layer gradients.
    """

    def __init__(
        self, dim: int, n_classes: int, activation: str, dropout: float, norm: bool
    ) -> None:
        super().__init__()
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
        layers: list[nn.Module] = [nn.Linear(dim, dim)]
        if norm:
            layers.append(nn.LayerNorm(dim))
        layers += [act(), nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(dim, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))  # (B, d) -> (B, n_classes)
