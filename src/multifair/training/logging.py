"""The run log: one JSON object per line (`log.jsonl`), mirrored to TensorBoard when installed.

Step signals stay on the device: `WindowMeter.add` sums them into one device vector every step
(no host synchronisation); `WindowMeter.flush` turns the window means into floats with a single
`.tolist()` every `log_every` steps. Under torchrun the window's sums are averaged over the
ranks first (one all_reduce per window, not per step), so the logged loss parts are those of
the global batch. A signal that is 0/1 per step (`fair_mode`) therefore logs
as the fraction of steps in the window: the fairness-mode rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class WindowMeter:
    """Running sums of named values over a window of steps: tensors on their device (one
    concatenated vector, no host copy), Python floats on the host."""

    def __init__(
        self, modalities: Sequence[str] = (), reduce: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.modalities = list(modalities)
        # under torchrun: the mean over ranks of the window's sums, ONE collective per window
        # (loss parts are per rank; signals computed from gathered inputs are already global)
        self._reduce = reduce
        self._layout: tuple[list[tuple[str, tuple[int, ...]]], list[str]] | None = None
        self._sum: Tensor | None = None
        self._float_sum: list[float] = []
        self._count = 0

    def add(self, values: Mapping[str, Tensor | float]) -> None:
        """Add one step's values (tensors of any shape, or floats)."""
        if not values:
            return
        items = sorted(values.items())
        tensors = [(k, v) for k, v in items if isinstance(v, Tensor)]
        floats = [(k, float(v)) for k, v in items if not isinstance(v, Tensor)]
        layout = ([(k, tuple(v.shape)) for k, v in tensors], [k for k, _ in floats])
        if layout != self._layout:
            # new names or shapes (first step, or a hook that started returning more): restart
            self._layout, self._sum, self._count = layout, None, 0
            self._float_sum = [0.0] * len(floats)
        if tensors:
            device = tensors[0][1].device
            flat = torch.cat(
                [v.detach().to(device, torch.float32).reshape(-1) for _, v in tensors]
            )  # (total numel,)
            self._sum = flat if self._sum is None else self._sum + flat
        self._float_sum = [a + b for a, (_, b) in zip(self._float_sum, floats)]
        self._count += 1

    def flush(self) -> dict[str, float]:
        """Window means as floats (one host sync), then reset. Vectors of length M are named
        `<name>/<modality>`, other vectors `<name>/<i>`."""
        if self._layout is None or self._count == 0:
            return {}
        shapes, float_names = self._layout
        sums = self._sum
        if sums is not None and self._reduce is not None:
            sums = self._reduce(sums)
        means = (sums / self._count).tolist() if sums is not None else []
        out: dict[str, float] = {}
        i = 0
        for name, shape in shapes:
            n = math.prod(shape)
            vals = means[i : i + n]
            i += n
            if len(shape) == 0:
                out[name] = vals[0]
            elif len(shape) == 1 and n == len(self.modalities):
                out.update({f"{name}/{m}": v for m, v in zip(self.modalities, vals)})
            else:
                out.update({f"{name}/{j}": v for j, v in enumerate(vals)})
        out.update({k: v / self._count for k, v in zip(float_names, self._float_sum)})
        self._sum, self._count = None, 0
        self._float_sum = [0.0] * len(float_names)
        return dict(sorted(out.items()))

    def state_dict(self) -> dict[str, Any]:
        """The open window (a run stopped between two log records), as checkpointable data."""
        return {
            "layout": self._layout,
            "sum": None if self._sum is None else self._sum.detach().cpu(),
            "float_sum": list(self._float_sum),
            "count": self._count,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        layout = state["layout"]
        self._layout = None if layout is None else ([tuple(s) for s in layout[0]], list(layout[1]))
        self._sum = None if state["sum"] is None else state["sum"].to(device)
        self._float_sum = list(state["float_sum"])
        self._count = int(state["count"])


def _json_safe(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, Tensor):
        return _json_safe(x.tolist())
    return x


def dump_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(_json_safe(obj), indent=2) + "\n", encoding="utf-8")


class RunLogger:
    """Appends records to `log.jsonl` (and TensorBoard scalars). A no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(_json_safe(record)) + "\n")
        self._fh.flush()
        if self._tb is not None:
            x = record.get("step", record.get("epoch", 0))
            for key, value in _flatten(record).items():
                if key not in ("step", "epoch", "kind") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{record.get('kind', 'log')}/{key}", float(value), x)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, float) and not math.isfinite(v):
            continue
        else:
            out[key] = v
    return out


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a `log.jsonl`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def truncate_log(path: str | Path, step: int, epoch: int) -> None:
    """On `--resume`: keep only what the checkpoint covers (step records up to `step`, epoch
    records before `epoch`), so the steps of a killed epoch are not logged twice. A line cut
    by the kill is dropped too."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "step" and record.get("step", 0) > step:
            continue
        if record.get("kind") == "epoch" and record.get("epoch", 0) >= epoch:
            continue
        kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
