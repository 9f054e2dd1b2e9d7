"""`ModelConfig` (the `model:` block of a run config) and the one factory, `build_model`.

    model:
      preset: small            # small | paper | custom
      dim: 128                 # overrides the preset
      fusion: attention        # attention | concat
      encoders:
        fundus: {name: cnn, width: 32}
        oct: {name: oct25d, slice_encoder: cnn}

A modality without an `encoders` entry gets its preset's encoder for its kind (image -> cnn,
volume -> oct25d, tabular -> mlp, text -> text). An entry that keeps the preset's encoder
name is merged over the preset's options; naming another encoder starts from that encoder's
own defaults (and for oct25d, a different slice_encoder drops the preset's slice_options).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from multifair.config import deep_merge, validate
from multifair.errors import UserError
from multifair.models.classifier import MultimodalClassifier
from multifair.models.encoders import InputSpec, build_encoder
from multifair.models.presets import PRESETS


class ModelConfig(BaseModel):
    """The model block of a config. Unset sizes come from the preset."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["small", "paper", "custom"] = "small"
    dim: PositiveInt | None = None
    fusion: Literal["attention", "concat"] | None = None
    heads: PositiveInt | None = None
    layers: PositiveInt | None = None
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    # modality name -> {"name": encoder, **encoder options}
    encoders: dict[str, dict[str, Any]] = Field(default_factory=dict)


def resolve_encoder(preset: str, modality: str, kind: str, entry: Mapping[str, Any]) -> dict:
    """The encoder name and options one modality gets: preset defaults, then the user's entry."""
    default = dict(PRESETS[preset].encoders[kind])
    user = dict(entry)
    name = user.pop("name", None) or default["name"]
    if not isinstance(name, str):
        raise UserError(f"model.encoders.{modality}.name: must be a string (got {name!r})")
    if name != default.pop("name"):
        return {"name": name, **user}
    if "slice_encoder" in user and user["slice_encoder"] != default.get("slice_encoder"):
        default.pop("slice_options", None)  # options of another slice encoder do not apply
    return {"name": name, **deep_merge(default, user)}


def build_model(
    cfg: ModelConfig | Mapping[str, Any] | None,
    modalities: Mapping[str, Any] | Iterable[Any],
    *,
    dataset_modalities: Iterable[str] | None = None,
    n_classes: int = 2,
    missing: bool = False,
) -> MultimodalClassifier:
    """Build the classifier for `modalities` (name -> ModalitySpec-like: `.kind`, `.shape`,
    optional `.channels`; or an iterable of specs with `.name`).

    `dataset_modalities` lists every modality of the dataset when the model uses a subset
    (unimodal training): encoder entries for those are then ignored instead of rejected.
    `missing`: the data has missing modalities; the model gets learned missing tokens.
    """
    if cfg is None or isinstance(cfg, Mapping):
        cfg = validate(ModelConfig, dict(cfg or {}), source="model")
    if not isinstance(modalities, Mapping):
        modalities = {spec.name: spec for spec in modalities}
    known = set(modalities) | set(dataset_modalities or ())
    unknown = sorted(set(cfg.encoders) - known)
    if unknown:
        raise UserError(
            f"model.encoders: no modality named {unknown[0]!r} in the data "
            f"(modalities: {sorted(known)})"
        )
    preset = PRESETS[cfg.preset]
    encoders = {}
    for modality, spec_like in modalities.items():
        spec = InputSpec.of(modality, spec_like)
        choice = resolve_encoder(cfg.preset, modality, spec.kind, cfg.encoders.get(modality, {}))
        name = choice.pop("name")
        encoders[modality] = build_encoder(name, choice, spec, source=f"model.encoders.{modality}")
    return MultimodalClassifier(
        encoders,
        dim=cfg.dim or preset.dim,
        fusion=cfg.fusion or preset.fusion,
        heads=cfg.heads or preset.heads,
        layers=cfg.layers or preset.layers,
        dropout=preset.dropout if cfg.dropout is None else cfg.dropout,
        n_classes=n_classes,
        missing=missing,
    )
