"""Fusion of the M modality tokens h_i (B, d) into one vector (B, d), and the MLP heads.

`attention` is the released model's "multi-head attention fusion": a small transformer
encoder (post-norm, GELU, feed-forward 4d) over the M tokens, first token's output.
`concat` concatenates the tokens and maps them back to d with one Linear layer.
"""

from __future__ import annotations

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

    def forward(self, tokens: Tensor) -> Tensor:
        return self.encoder(tokens)[:, 0]  # (B, M, d) -> (B, d)


class ConcatFusion(nn.Module):
    """Concatenate the M tokens and project back to d."""

    def __init__(self, dim: int, n_modalities: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_modalities * dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
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
