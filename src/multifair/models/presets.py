"""Model presets: fusion sizes and a default encoder (with options) per modality kind.

- `small`: CPU-friendly (2 cores, minutes): narrow CNNs, a 1-layer slice transformer, a small
  MLP, the bundled MiniLM frozen; d = 64.
- `paper`: the released MultiFair FairVision architecture: ViT-B/16 fundus (pooled output),
  ViT-B/16 over 10 OCT slices + a 2-layer, 4-head slice transformer, BERT-base [CLS] for notes
  (max 512 tokens); d = 128, 4 heads, 2 layers. Random init wherever no local weights are
  given, logged. (FairCLIP used d = 256, 8 heads, 3 layers: set model.dim/heads/layers.)
- `custom`: each encoder's own defaults and d = 128, 4 heads, 2 layers; set what you need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    dim: int
    fusion: str
    heads: int
    layers: int
    dropout: float
    # modality kind -> {"name": encoder, **options}
    encoders: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# What every preset falls back to for a kind it does not name.
DEFAULT_ENCODERS: dict[str, str] = {
    "image": "cnn",
    "volume": "oct25d",
    "tabular": "mlp",
    "text": "text",
}

PRESETS: dict[str, Preset] = {
    "custom": Preset(
        dim=128,
        fusion="attention",
        heads=4,
        layers=2,
        dropout=0.1,
        encoders={kind: {"name": name} for kind, name in DEFAULT_ENCODERS.items()},
    ),
    "small": Preset(
        dim=64,
        fusion="attention",
        heads=4,
        layers=2,
        dropout=0.1,
        encoders={
            "image": {"name": "cnn", "width": 16, "depth": 4},
            "volume": {
                "name": "oct25d",
                "slice_encoder": "cnn",
                "slice_options": {"width": 16, "depth": 4},
                "heads": 4,
                "layers": 1,
            },
            "tabular": {"name": "mlp", "hidden": [64, 64]},
            "text": {"name": "text", "freeze": True, "max_length": 128},
        },
    ),
    "paper": Preset(
        dim=128,
        fusion="attention",
        heads=4,
        layers=2,
        dropout=0.1,
        encoders={
            "image": {"name": "vit_b16", "pool": "pooler", "layer_norm_eps": 1e-12},
            "volume": {
                "name": "oct25d",
                "slice_encoder": "vit_b16",
                "slice_options": {"pool": "pooler", "layer_norm_eps": 1e-12},
                "max_slices": 10,
                "heads": 4,
                "layers": 2,
                "dropout": 0.1,
            },
            "tabular": {"name": "mlp", "hidden": [256, 256]},
            "text": {
                "name": "text",
                "path": "bert-base-uncased",
                "pooling": "cls",
                "max_length": 512,
                "fallback": "random_bert_base",
            },
        },
    ),
}
