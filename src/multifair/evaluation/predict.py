"""`multifair evaluate` / `multifair predict`: scores and metrics of a finished run.

`evaluate_run` / `predict_run` rebuild data, model and method from a run directory and load
its selected checkpoint; the batching, score collection and metrics summary are the inference
core the trainer uses too (`multifair.training.inference`: `predict`, `Predictions`,
`evaluate_predictions`, `predictions_frame`), so a run evaluates exactly as it validated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multifair.errors import UserError, writing
from multifair.training.distributed import DistEnv
from multifair.training.inference import (
    Predictions,
    evaluate_predictions,
    make_loader,
    predict,
    predictions_frame,
    resolve_amp,
)

# ---------------------------------------------------------------------------------------
# from a run directory (multifair evaluate / predict)


@dataclass
class LoadedRun:
    cfg: Any
    data: Any
    model: nn.Module
    method: nn.Module
    modalities: list[str]
    device: torch.device
    checkpoint: str


def load_run(
    run_dir: str | Path,
    *,
    which: str = "best",
    data_override: Any | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    device: str = "auto",
) -> LoadedRun:
    """Rebuild a run's data, model and method and load `checkpoints/<which>.pt`.

    `data_override` (a DataConfig) replaces the run's data section, e.g. new data of the same
    kind; the preprocessing state fitted at training time is restored from the checkpoint."""
    import multifair.methods  # noqa: F401
    from multifair.data import build_data
    from multifair.training import checkpoint, run
    from multifair.training.config import resolve_run_config
    from multifair.training.distributed import resolve_device
    from multifair.training.trainer import build_model_and_method, run_modalities

    run_dir = Path(run_dir)
    cfg = resolve_run_config(base=run.read_config(run_dir), source=run.config_source(run_dir))
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise UserError(f"{run_dir}: no checkpoints/{which}.pt (has the run finished an epoch?)")
    state = checkpoint.load(path)
    data_cfg = data_override if data_override is not None else cfg.data
    data = build_data(data_cfg, splits, state=state.get("data_state"))
    modalities = run_modalities(cfg, data)
    dev = resolve_device(device)
    # the learned missing tokens exist when the run was trained on data with missing modalities
    missing = "missing_tokens" in state.get("model", {})
    model, method = build_model_and_method(cfg, data, modalities, missing, dev)
    checkpoint.load_model(model, state, path)
    method.load_state_dict(state["method"])
    return LoadedRun(cfg, data, model, method, modalities, dev, str(path))


def _predict_split(loaded: Any, split: str) -> Any:
    """Predictions of a loaded run's selected model on one split of its data."""
    env = DistEnv(device=loaded.device)
    tc = loaded.cfg.train
    loader, _ = make_loader(
        loaded.data,
        split,
        env,
        batch_size=tc.eval_batch_size or tc.batch_size,
        train=False,
        seed=tc.seed,
    )
    return predict(
        loaded.model,
        loaded.method,
        loader,
        to_device=loaded.data.to_device,
        env=env,
        amp_dtype=resolve_amp(tc.amp, loaded.device),
        classes=loaded.data.classes,
    )


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    *,
    which: str = "best",
    n_boot: int = 0,
    device: str = "auto",
) -> tuple[dict[str, Any], Predictions, LoadedRun]:
    """The metrics summary of a trained run on one split of its own data."""
    if split not in ("train", "val", "test"):
        raise UserError(f"--split {split!r}: not one of ['test', 'train', 'val']")
    loaded = load_run(run_dir, which=which, splits=(split,), device=device)
    tc = loaded.cfg.train
    preds = _predict_split(loaded, split)
    summary = evaluate_predictions(
        preds,
        loaded.data.group_names,
        loaded.data.train_attribute,
        n_boot=n_boot,
        seed=tc.seed,
        min_group_size=loaded.data.config.min_group_size,
    )
    return summary, preds, loaded


def data_config_for(base: Any, data: str | Path) -> Any:
    """The DataConfig for `multifair predict RUN_DIR DATA`: DATA is a YAML file with a data
    section (same kind as the run), or a dataset folder / table file that replaces the run's
    `root` / `path` (every other data setting, e.g. image size, stays the run's)."""
    from multifair.config import validate
    from multifair.data import DataConfig, load_data_config

    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        cfg = load_data_config(path)
    else:
        if not path.exists():
            raise UserError(f"DATA {str(path)!r}: no such folder or file")
        raw = base.model_dump()
        raw["path" if base.kind == "table" else "root"] = str(path)
        raw["cache"] = None  # the run's cache belongs to the run's data
        cfg = validate(DataConfig, raw, source=f"DATA {path}")
    if cfg.kind != base.kind:
        raise UserError(f"DATA {str(path)!r}: kind {cfg.kind!r}, but the run was trained on {base.kind!r}")  # fmt: skip
    return cfg


def predict_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    splits: Sequence[str] | None = None,
    which: str = "best",
    device: str = "auto",
):
    """Scores of a trained run on new data of the same kind, written as one CSV (with a split
    column). Tables default to all rows (`all`), npz trees to the three split folders."""
    import pandas as pd

    from multifair.training import run
    from multifair.training.config import resolve_run_config

    cfg = resolve_run_config(base=run.read_config(run_dir), source=run.config_source(run_dir))
    data_cfg = data_config_for(cfg.data, data)
    splits = list(splits or (["all"] if data_cfg.kind == "table" else ["train", "val", "test"]))
    loaded = load_run(run_dir, which=which, data_override=data_cfg, splits=splits, device=device)
    frames = []
    for split in splits:
        preds = _predict_split(loaded, split)
        frames.append(predictions_frame(preds, split, loaded.data.group_names))
    frame = pd.concat(frames, ignore_index=True)
    with writing(out):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False, float_format="%.8g")
    return frame
