"""Training methods. Each module registers itself in `METHODS`; importing this package
imports every method explicitly (no discovery magic)."""

# Method modules (each registers itself on import).
from multifair.methods import lr_split, multifair_adam  # noqa: F401
from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    MethodParams,
    ModelOutput,
    StepContext,
    build_method,
)

__all__ = [
    "METHODS",
    "LossOutput",
    "Method",
    "MethodParams",
    "ModelOutput",
    "StepContext",
    "build_method",
]
