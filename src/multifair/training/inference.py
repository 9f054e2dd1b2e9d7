"""The inference core: batch a loader through a model, collect scores, summarise them.

Both sides of a run use it: the trainer (validation every epoch, the selected checkpoint on
test, the predictions CSVs) and `multifair evaluate` / `predict` (`evaluation/predict.py`,
which rebuilds a run from its directory first). It imports nothing from either, so the
evaluation layer sits on top of training without the loop reaching back up into it.

`predict` runs the method's forward (so a method that reads the attribute at test time gets
it) in eval mode and returns one row per sample. Under torchrun every rank predicts its part
of the split (the sampler pads the last rank by repeating samples); the parts are gathered
with their dataset indices, duplicates dropped, and rows sorted by index, so the metrics are
over the whole split exactly once. `evaluate_predictions` calls `metrics.summarize`, the same
function `audit`, the report and the benchmark use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from multifair.csvcheck import AUX_SCORE_PREFIX, PRESENT_PREFIX, SCORE_PREFIX
from multifair.errors import UserError
from multifair.training.distributed import DistEnv

CPU = DistEnv()


# ---------------------------------------------------------------------------------------
# loaders and AMP (the trainer's and `multifair evaluate`'s)


def make_loader(
    data: Any,
    split: str,
    env: DistEnv,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    drop_last: bool = False,
) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled (train) or ordered loader over one split; the sampler shards it across ranks.

    The same DistributedSampler is used with one process: its permutation is seeded by
    (seed, epoch) through `set_epoch`, so the data order of an epoch does not depend on what
    ran before - which is what makes `--resume` continue bit-identically. Ordered loaders pad
    the last rank by repeating samples; `predict` drops the repeats."""
    from multifair.data.bundle import make_loader as data_loader

    sampler = DistributedSampler(
        data.datasets[split], num_replicas=env.world_size, rank=env.rank, shuffle=train, seed=seed
    )
    loader = data_loader(
        data,
        split,
        batch_size,
        sampler=sampler,
        seed=seed,
        drop_last=drop_last,
        pin_memory=env.device.type == "cuda",
    )
    return loader, sampler


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the GPU supports it, fp16 (+ GradScaler) on other GPUs, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp: fp16 needs a CUDA device (use bf16 or off on CPU)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# ---------------------------------------------------------------------------------------
# predictions


@dataclass
class Predictions:
    """One row per sample of a split, sorted by dataset index."""

    index: np.ndarray  # (N,) int64 position in the dataset
    sample_id: list[str]
    label: np.ndarray  # (N,) int64 (-1 when the data has no label)
    # (N,) float64 probability of the positive class; multi-class: (N, K) class probabilities
    score: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) int64 codes, -1 unknown
    aux_scores: dict[str, np.ndarray] = field(default_factory=dict)  # per-modality aux heads
    classes: list[str] | None = None  # multi-class: the class names, in column order
    # modality -> (N,) bool, only for data with missing modalities (an absent modality's aux
    # score is NaN: its head read a placeholder)
    present: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)


@torch.no_grad()
def predict(
    model: nn.Module,
    method: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    to_device: Callable[..., Mapping[str, Any]],
    env: DistEnv = CPU,
    amp_dtype: torch.dtype | None = None,
    classes: Sequence[str] | None = None,
) -> Predictions:
    """Positive-class probabilities of the fused head (and of each auxiliary head) for a split;
    with more than two logits, every class's probability (`classes` names them)."""
    model.eval()
    method.eval()
    device = env.device
    parts: dict[str, list] = {"index": [], "sample_id": [], "label": [], "score": []}
    attrs: dict[str, list[np.ndarray]] = {}
    aux: dict[str, list[np.ndarray]] = {}
    have: dict[str, list[np.ndarray]] = {}
    amp = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else torch.autocast(device_type=device.type, enabled=False)
    )
    for raw in loader:
        batch = to_device(raw, device, train=False)
        with amp:
            out = method.forward(model, batch)
        parts["score"].append(_probabilities(out.logits))
        present = raw.get("present") or {}
        for m, u in out.aux_logits.items():
            score = _probabilities(u)
            if m in present:  # an absent modality's head read a placeholder: no score
                keep = present[m].cpu().numpy()
                score = np.where(keep if score.ndim == 1 else keep[:, None], score, np.nan)
            aux.setdefault(m, []).append(score)
        for m, p in present.items():
            have.setdefault(m, []).append(p.cpu().numpy().astype(bool))
        n = out.logits.shape[0]
        parts["index"].append(_numpy(raw.get("index"), n, default=-1))
        parts["label"].append(_numpy(raw.get("label"), n, default=-1))
        parts["sample_id"].extend(str(s) for s in raw.get("sample_id", [""] * n))
        for name, codes in (raw.get("attributes") or {}).items():
            attrs.setdefault(name, []).append(_numpy(codes, n, default=-1))
    local = {
        "index": _cat(parts["index"], np.int64),
        "sample_id": parts["sample_id"],
        "label": _cat(parts["label"], np.int64),
        "score": _cat(parts["score"], np.float64),
        "attributes": {k: _cat(v, np.int64) for k, v in attrs.items()},
        "aux": {k: _cat(v, np.float64) for k, v in aux.items()},
        "present": {k: _cat(v, bool) for k, v in have.items()},
    }
    if env.distributed:
        from multifair.training.distributed import all_gather_objects

        local = _merge(all_gather_objects(local, env))
    order = np.argsort(local["index"], kind="stable")
    return Predictions(
        index=local["index"][order],
        sample_id=[local["sample_id"][i] for i in order],
        label=local["label"][order],
        score=local["score"][order],
        attributes={k: v[order] for k, v in local["attributes"].items()},
        aux_scores={k: v[order] for k, v in local["aux"].items()},
        classes=None if classes is None else list(classes),
        present={k: v[order] for k, v in local["present"].items()},
    )


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    """Two logits: the positive-class probability (N,), as always; K > 2: softmax (N, K)."""
    prob = torch.softmax(logits.float(), dim=1)
    return (prob[:, 1] if prob.shape[1] == 2 else prob).cpu().numpy()


def _numpy(x: Any, n: int, default: int) -> np.ndarray:
    if x is None:
        return np.full(n, default, dtype=np.int64)
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def _cat(chunks: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype=dtype)


def _merge(per_rank: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate the ranks' rows and drop the sampler's padding (repeated indices)."""
    index = np.concatenate([r["index"] for r in per_rank])
    _, keep = np.unique(index, return_index=True)  # first occurrence of each sample
    keep.sort()
    cat = lambda key: np.concatenate([r[key] for r in per_rank])[keep]  # noqa: E731
    ids = [s for r in per_rank for s in r["sample_id"]]
    return {
        "index": index[keep],
        "sample_id": [ids[i] for i in keep],
        "label": cat("label"),
        "score": cat("score"),
        "attributes": {
            k: np.concatenate([r["attributes"][k] for r in per_rank])[keep]
            for k in per_rank[0]["attributes"]
        },
        "aux": {
            k: np.concatenate([r["aux"][k] for r in per_rank])[keep] for k in per_rank[0]["aux"]
        },
        "present": {
            k: np.concatenate([r["present"][k] for r in per_rank])[keep]
            for k in per_rank[0]["present"]
        },
    }


def names_map(group_names: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    """attribute -> {code: name}, from either {code: name} mappings or lists indexed by code."""
    out: dict[str, dict[int, str]] = {}
    for attribute, names in group_names.items():
        if isinstance(names, Mapping):
            out[attribute] = {int(k): str(v) for k, v in names.items()}
        else:
            out[attribute] = {i: str(v) for i, v in enumerate(names)}
    return out


def evaluate_predictions(
    preds: Predictions,
    group_names: Mapping[str, Any],
    attribute: str | None = None,
    *,
    n_boot: int = 0,
    seed: int = 0,
    threshold: float = 0.5,
    min_group_size: int | None = None,
) -> dict[str, Any]:
    """`metrics.summarize` over every attribute that has at least two known groups in the split.

    The training `attribute` must have two; other attributes with fewer are left out (a small
    split may not contain every group) rather than failing the run. `min_group_size`
    (`data.min_group_size`) flags the groups smaller than that in this split."""
    from multifair.metrics import summarize

    if len(preds) == 0:
        raise UserError("the split is empty: nothing to evaluate")
    if np.any(preds.label < 0):
        raise UserError(
            "the split has samples without a label: predictions can be written but not evaluated"
        )
    features = {}
    for name, codes in preds.attributes.items():
        if len(np.unique(codes[codes >= 0])) >= 2:
            features[name] = codes
        elif name == attribute:
            raise UserError(
                f"data.attribute={attribute!r}: fewer than two known groups in this split, so "
                "group fairness metrics are undefined"
            )
    summary = summarize(
        preds.label,
        preds.score,
        sensitive_features=features,
        group_names=names_map(group_names),
        threshold=threshold,
        n_boot=n_boot,
        seed=seed,
        min_group_size=min_group_size,
        class_names=class_names(preds) if preds.score.ndim == 2 else None,
    )
    if preds.present:  # missing modalities: metrics per missingness pattern, rates by group
        from multifair.metrics import summarize_missingness

        summary["missingness"] = summarize_missingness(
            preds.label,
            preds.score,
            preds.present,
            sensitive_features=features,
            group_names=names_map(group_names),
            threshold=threshold,
        )
    return summary


def val_record(
    summary: Mapping[str, Any], attribute: str, preds: Predictions, modalities: Sequence[str]
) -> dict[str, Any]:
    """The compact validation entry of an epoch record in log.jsonl (docs/architecture.md)."""

    entry = summary["attributes"][attribute]
    return {
        "auc": summary["overall"]["auc"],
        "acc": summary["overall"]["acc"],
        "es_auc": entry["es_auc"],
        "es_acc": entry["es_acc"],
        "group_auc": {g["name"]: g["auc"] for g in entry["groups"]},
        "dpd": entry["dpd"],
        "deodds": entry["deodds"],
        # how well each auxiliary (single-modality) head does: modality imbalance at a glance
        "aux_auc": {
            m: _present_auc(preds.label, preds.aux_scores[m])
            for m in modalities
            if m in preds.aux_scores
        },
    }


def _present_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC over the samples with a score (an absent modality's aux score is NaN)."""
    from multifair.metrics import roc_auc

    have = np.isfinite(scores) if scores.ndim == 1 else np.isfinite(scores).all(axis=1)
    return roc_auc(labels[have], scores[have]) if have.any() else float("nan")


def class_names(preds: Predictions) -> list[str]:
    """The class names of multi-class predictions ("0".."K-1" when none were given)."""
    k = preds.score.shape[1]
    names = preds.classes or [str(c) for c in range(k)]
    if len(names) != k:
        raise UserError(f"{len(names)} class names for {k} score columns")
    return list(names)


def predictions_frame(preds: Predictions, split: str, group_names: Mapping[str, Any]):
    """`sample_id, split, label, score, <attribute>, <attribute>_name, ..., aux_score_<modality>,
    ...` (one row per sample). The auxiliary heads' scores are what `multifair diagnose`
    compares with single-modality models, patient by patient.

    Multi-class: `label` is the class index, `label_name` its name, `pred` the argmax class
    index, then `score_<class>` per class (in class order) instead of `score`, and
    `aux_score_<modality>_<class>` per auxiliary head and class."""
    import pandas as pd

    names = names_map(group_names)
    cols: dict[str, Any] = {"sample_id": preds.sample_id, "split": split, "label": preds.label}
    multiclass = preds.score.ndim == 2
    if multiclass:
        classes = class_names(preds)
        cols["label_name"] = [classes[y] if 0 <= y < len(classes) else "" for y in preds.label]
        cols["pred"] = preds.score.argmax(axis=1)
        for k, c in enumerate(classes):
            cols[f"{SCORE_PREFIX}{c}"] = preds.score[:, k]
    else:
        cols["score"] = preds.score
    for attribute, codes in preds.attributes.items():
        cols[attribute] = codes
        lookup = names.get(attribute, {})
        cols[f"{attribute}_name"] = [
            "unknown" if c < 0 else lookup.get(int(c), str(int(c))) for c in codes
        ]
    for modality, scores in preds.aux_scores.items():
        if multiclass:
            for k, c in enumerate(classes):
                cols[f"{AUX_SCORE_PREFIX}{modality}_{c}"] = scores[:, k]
        else:
            cols[f"{AUX_SCORE_PREFIX}{modality}"] = scores
    for modality, have in preds.present.items():  # data with missing modalities: 1 = has it
        cols[f"{PRESENT_PREFIX}{modality}"] = have.astype(np.int64)
    return pd.DataFrame(cols)


def frame_scores(frame: Any, source: str = "predictions") -> tuple[np.ndarray, list[str] | None]:
    """The scores of a predictions frame: `score` (N,) for binary, or the `score_<class>`
    columns (N, K) with their class names for multi-class."""
    if "score" in frame.columns:
        return frame["score"].to_numpy(dtype=np.float64), None
    cols = [c for c in frame.columns if str(c).startswith(SCORE_PREFIX)]
    if len(cols) < 2:
        raise UserError(
            f"{source}: no `score` column (binary) and fewer than two `{SCORE_PREFIX}<class>` "
            "columns (multi-class)"
        )
    return frame[cols].to_numpy(dtype=np.float64), [c[len(SCORE_PREFIX) :] for c in cols]


def write_predictions(
    preds: Predictions, split: str, group_names: Mapping[str, Any], path: str | Path
) -> None:
    predictions_frame(preds, split, group_names).to_csv(path, index=False, float_format="%.8g")
