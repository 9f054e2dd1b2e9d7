"""RunConfig = data + model + method + train + output, resolved defaults -> file -> overrides.

Every section forbids unknown keys, so a typo (`train.learning_rate`) fails naming the key. The
`method` section is `name` plus that method's own hyper-parameters (its `Params` model), so it
is validated against the method that is named: `method.tua=0.1` on `multifair` fails as
`method.tua: unknown key`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from multifair import config as _config
from multifair.errors import UserError


class TrainConfig(BaseModel):
    """The optimisation recipe. Defaults are the released MultiFair FairVision run (method.md 3)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 42
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)  # default: batch_size
    drop_last: bool = True  # a 1-sample last batch has no batch AUC and breaks BatchNorm
    accumulate: int = Field(1, ge=1)  # micro-batches per optimisation step
    # AdamW: one group per modality encoder and one for the rest at lr / weight_decay; the
    # auxiliary heads get aux_lr / aux_weight_decay
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(6e-3, ge=0)
    aux_lr: float = Field(1e-5, gt=0)
    aux_weight_decay: float = Field(3e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    # lr schedule: linear warm-up, then cosine to min_lr_ratio * lr, a plateau reduction on the
    # validation selection metric, or constant
    schedule: Literal["cosine", "plateau", "constant"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(1, ge=0)
    clip: float | None = Field(0.8, gt=0)  # global grad-norm clip, AFTER gradient edits
    # auto: bf16 on GPUs that support it, fp16 + GradScaler on other GPUs, off on CPU
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    select_by: Literal["auc", "es_auc"] = "auc"  # validation metric that picks the checkpoint
    # a burn-in for that choice: epochs before this one (0-based) are validated and logged but
    # never selected, so a noisy early peak cannot win before slower parts of the model (a
    # weak encoder, a method that acts from its first validation on) have trained
    select_from: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1)  # torch CPU threads (None: torch's default)
    progress: bool = True  # tqdm bars (rank 0 only, and only on a terminal: multifair.console)
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboard is installed
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU reproducibility)
    # stop (with a full checkpoint) once this many epochs are complete; `--resume` continues.
    # For interrupting a run on purpose (tests, time-limited jobs).
    stop_after_epoch: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _selectable(self) -> TrainConfig:
        if self.select_from >= self.epochs:
            raise ValueError(
                f"select_from ({self.select_from}) must be below epochs ({self.epochs}): "
                "no epoch could be selected"
            )
        return self


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the run directory itself (config.yaml, log.jsonl, checkpoints/, ...); default:
    # runs/<method>-<timestamp>. An existing non-empty directory is an error (use --resume).
    dir: str | None = None
    # splits whose predictions are written as predictions_<split>.csv with the selected model
    predictions: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    # bootstrap resamples for the test summary's CIs (0: none); on by default so every group's
    # AUC is printed with its interval (a small group's AUC means little without it)
    n_boot: int = Field(1000, ge=0)


class RunConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()


DEFAULT_METHOD = "multifair"


@cache
def run_config_model(method: str) -> type[BaseModel]:
    """The RunConfig pydantic model for one method (its Params become the `method` section)."""
    import multifair.methods  # noqa: F401  (registers every method)
    from multifair.data.config import DataConfig
    from multifair.methods.base import METHODS
    from multifair.models import ModelConfig

    params_cls = METHODS.get(method).Params
    section = create_model(
        f"MethodSection_{method}",
        __base__=params_cls,
        name=(Literal[method], method),  # type: ignore[valid-type]
    )
    return create_model(
        f"RunConfig_{method}",
        __base__=RunConfigBase,
        data=(DataConfig, ...),
        model=(ModelConfig, ModelConfig()),
        method=(section, section()),
    )


def method_params(cfg: BaseModel) -> dict[str, Any]:
    """The method section without its `name`: what `build_method` validates again."""
    params = cfg.method.model_dump()  # type: ignore[attr-defined]
    params.pop("name", None)
    return params


def resolve_run_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Any:
    """defaults -> `base` (e.g. a run directory's config) -> YAML file -> key=value overrides.

    Switching methods on the command line (`method.name=erm` on a MultiFair recipe) keeps the
    recipe's method parameters that the new method also has and drops the others, saying so;
    parameters given on the command line are always checked strictly. `source` names the
    config in errors (default: `path`, else "config")."""
    source = source or (str(path) if path is not None else "config")
    merged: dict[str, Any] = dict(base or {})
    if path is not None:
        merged = _config.deep_merge(merged, _config.load_yaml(path))
    given = _config.parse_overrides(overrides) if overrides else {}
    for layer in (merged, given):
        if not isinstance(layer.get("method", {}), Mapping):
            raise UserError(
                f"{source}: method: must be a mapping with a name (got {layer['method']!r})"
            )
    before = dict(merged.get("method", {}))
    name = given.get("method", {}).get("name", before.get("name", DEFAULT_METHOD))
    if not isinstance(name, str):
        raise UserError(f"{source}: method.name: must be a string (got {name!r})")
    try:
        model = run_config_model(name)
    except UserError as exc:  # "method 'x' not found. Available: [...]", said where
        raise UserError(f"{source}: method.name: {exc}") from None
    if before.get("name", DEFAULT_METHOD) != name:
        accepted = set(model.model_fields["method"].annotation.model_fields)
        dropped = sorted(k for k in before if k not in accepted)
        if dropped:
            print(
                f"note: method.name={name}: ignoring the config's {before.get('name')} "
                f"parameters {dropped}"
            )
        merged["method"] = {k: v for k, v in before.items() if k in accepted}
    merged = _config.deep_merge(merged, given)
    merged.setdefault("method", {})["name"] = name
    return _config.validate(model, merged, source=source)


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-able data (written to config.yaml)."""
    return cfg.model_dump(mode="json")
