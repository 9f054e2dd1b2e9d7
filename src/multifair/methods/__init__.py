"""Training methods. Each module registers itself in `METHODS`; importing this package
imports every method explicitly (no discovery magic)."""

# Method modules (each registers itself on import).
from multifair.methods import (  # noqa: F401
    adversarial,
    cggm,
    dgl,
    erm,
    fin,
    fis,
    groupdro,
    lr_split,
    mmpareto,
    multifair,
    multifair_adam,
    ogm_ge,
    pmr,
    reweight,
    unimodal,
)
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
