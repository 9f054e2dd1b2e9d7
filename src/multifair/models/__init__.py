"""Models: an encoder registry, fusion, `MultimodalClassifier`, presets and `build_model`.

Importing this package registers every encoder (explicit imports, no discovery magic).
"""

from multifair.models import efficientnet, text, vit  # noqa: F401  (register encoders)
from multifair.models.classifier import MultimodalClassifier
from multifair.models.encoders import (
    ENCODERS,
    Encoder,
    EncoderOptions,
    InputSpec,
    build_encoder,
)
from multifair.models.factory import ModelConfig, build_model, resolve_encoder
from multifair.models.presets import PRESETS, Preset

__all__ = [
    "ENCODERS",
    "PRESETS",
    "Encoder",
    "EncoderOptions",
    "InputSpec",
    "ModelConfig",
    "MultimodalClassifier",
    "Preset",
    "build_encoder",
    "build_model",
    "resolve_encoder",
]
