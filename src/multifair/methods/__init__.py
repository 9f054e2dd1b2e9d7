"""Training methods. Each module registers itself in `METHODS`; importing this package
imports every method explicitly (no discovery magic)."""

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
