"""Read a run's training log and name the known failure signatures, with what to try.

Each signature is one small rule function `rule(log, tau) -> Finding | None` over a parsed
`log.jsonl` (see docs/architecture.md, "A run directory"). A rule returns a `Finding` when its
signature is present and `None` otherwise (including when the log lacks the signals it needs:
a rule never guesses). The thresholds are module constants so a reader can see exactly what
"plateau", "most of training" and "oscillating" mean here.

The four signatures (issue 5, item 3):
- one modality's auxiliary AUC plateaus while another's still climbs -> modulation too weak (rho);
- the batch group-AUC gap stays above tau for most of training -> tau too high or delta too low;
- validation AUC drops in the epoch where fairness mode switches on -> lambda_f too strong;
- validation ES-AUC oscillates from epoch to epoch -> noisy batch estimates (smoothing, batch size).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multifair.errors import UserError

# --- thresholds (documented in docs/benchmark.md) ------------------------------------------
PLATEAU_MAX_RISE = 0.01  # a smoothed aux AUC rising less than this over the late window is flat
CLIMB_MIN_RISE = 0.03  # ... while another one rises at least this much
PLATEAU_CEILING = 0.97  # a head already at this AUC has nothing left to learn: not a plateau
LATE_WINDOW = 0.5  # the late window: the last half of the logged steps
MIN_STEP_RECORDS = 8  # fewer step records than this: too little evidence for step rules
GAP_MOST = 0.5  # "most of training": strictly more than half of the logged steps
FAIR_ON = 0.5  # an epoch is "in fairness mode" when more than half its logged steps are
AUC_DROP = 0.01  # a validation AUC drop that counts as a drop
OSC_MIN_EPOCHS = 4  # need at least this many validation ES-AUC values to call oscillation
OSC_SIGN_FLIPS = 0.6  # share of consecutive changes that reverse direction
OSC_MIN_AMPLITUDE = 0.02  # mean absolute epoch-to-epoch ES-AUC change


@dataclass
class RunLog:
    """A parsed `log.jsonl`: the step records and the epoch records, in file order."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)

    def modalities(self, signal: str) -> list[str]:
        """Modalities that carry `<signal>/<modality>` in any step record, sorted."""
        prefix = f"{signal}/"
        names = {k[len(prefix) :] for rec in self.steps for k in rec if k.startswith(prefix)}
        return sorted(names)

    def step_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a numeric step signal, skipping records without it or non-finite."""
        xs, ys = [], []
        for i, rec in enumerate(self.steps):
            value = rec.get(key)
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs.append(rec.get("step", i))
                ys.append(float(value))
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def epoch_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of a validation metric from the epoch records (`val.<key>`)."""
        xs, ys = [], []
        for i, rec in enumerate(self.epochs):
            value = (rec.get("val") or {}).get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs.append(rec.get("epoch", i))
                ys.append(float(value))
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def read_log(path: str | Path) -> RunLog:
    """Parse a `log.jsonl`. A truncated LAST line (a run killed mid-write) is ignored; a bad
    line anywhere else is a UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"training log not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    log = RunLog()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(rec).__name__}")
        kind = rec.get("kind")
        if kind == "step":
            log.steps.append(rec)
        elif kind == "epoch":
            log.epochs.append(rec)
    return log


@dataclass
class Finding:
    """One failure signature found in a log: what, the numbers that show it, and what to try."""

    rule: str
    title: str
    evidence: str
    advice: str


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Centered moving average (edges use the available neighbours)."""
    if width <= 1 or values.size == 0:
        return values
    kernel = np.ones(width)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def aux_auc_plateau(log: RunLog, tau: float | None = None) -> Finding | None:
    """One modality's auxiliary AUC flat over the late window while another's still climbs."""
    rises: dict[str, tuple[float, float]] = {}
    for modality in log.modalities("aux_auc"):
        _, values = log.step_series(f"aux_auc/{modality}")
        if values.size < MIN_STEP_RECORDS:
            continue
        smooth = _smooth(values, max(1, values.size // 8))
        start = int(values.size * (1 - LATE_WINDOW))
        rises[modality] = (float(smooth[-1] - smooth[start]), float(smooth[-1]))
    if len(rises) < 2:
        return None
    flat = [
        m
        for m, (rise, level) in rises.items()
        if rise < PLATEAU_MAX_RISE and level < PLATEAU_CEILING
    ]
    climbing = [m for m, (rise, _) in rises.items() if rise >= CLIMB_MIN_RISE]
    if not flat or not climbing:
        return None
    shown = ", ".join(f"{m}: {rises[m][1]:.3f} ({rises[m][0]:+.3f})" for m in sorted(rises))
    return Finding(
        rule="aux_auc_plateau",
        title=f"{', '.join(flat)} auxiliary AUC plateaus while {', '.join(climbing)} still climbs",
        evidence=f"smoothed auxiliary AUC at the end (rise over the last half of training): {shown}",
        advice="The modality balance is too weak to let the lagging encoder catch up: raise rho "
        "(or, under AdamW, use a variant that scales the encoder's step size, e.g. multifair_adam).",
    )


def gap_above_tau(log: RunLog, tau: float | None) -> Finding | None:
    """The batch group-AUC gap (or fairness mode) above tau for most of training."""
    _, gaps = log.step_series("gap")
    if tau is not None and gaps.size >= MIN_STEP_RECORDS:
        share = float(np.mean(gaps > tau))
        what = f"gap > tau = {tau:g} on {share:.0%} of {gaps.size} logged steps (median gap {np.median(gaps):.3f})"
    else:
        _, modes = log.step_series("fair_mode")
        if modes.size < MIN_STEP_RECORDS:
            return None
        share = float(np.mean(modes > 0.5))
        what = f"fairness mode on for {share:.0%} of {modes.size} logged steps"
    if share <= GAP_MOST:
        return None
    return Finding(
        rule="gap_above_tau",
        title="group AUC gap stays above tau for most of training",
        evidence=what,
        advice="The group-level correction never closes the gap: the group factor "
        "1 + delta*(...)/tau is too weak (tau too high or delta too low) - lower tau or raise "
        "delta. Per-batch group AUCs over a few minority samples are also noisy; check the "
        "gap against the validation group AUCs before tuning.",
    )


def _fair_share_by_epoch(log: RunLog) -> dict[int, float]:
    """Per epoch, the share of logged steps with fairness mode on."""
    shares: dict[int, list[float]] = {}
    for rec in log.steps:
        mode = rec.get("fair_mode")
        if isinstance(mode, (bool, int, float)) and "epoch" in rec:
            shares.setdefault(int(rec["epoch"]), []).append(float(mode))
    return {e: float(np.mean(v)) for e, v in shares.items()}


def auc_drop_on_fair_mode(log: RunLog, tau: float | None = None) -> Finding | None:
    """Validation AUC drops in an epoch where fairness mode switched on."""
    shares = _fair_share_by_epoch(log)
    epochs, aucs = log.epoch_series("auc")
    if len(shares) < 2 or aucs.size < 2:
        return None
    val = dict(zip(epochs.astype(int).tolist(), aucs.tolist()))
    drops = []
    for epoch in sorted(shares):
        before = shares.get(epoch - 1)
        if before is None or before > FAIR_ON or shares[epoch] <= FAIR_ON:
            continue
        if epoch in val and epoch - 1 in val and val[epoch] < val[epoch - 1] - AUC_DROP:
            drops.append((epoch, val[epoch - 1], val[epoch]))
    if not drops:
        return None
    shown = "; ".join(f"epoch {e}: val AUC {a:.3f} -> {b:.3f}" for e, a, b in drops)
    return Finding(
        rule="auc_drop_on_fair_mode",
        title="validation AUC drops when fairness mode switches on",
        evidence=shown,
        advice="The fairness term outweighs the task loss when it switches on: lower lambda_f "
        "(or raise tau so the switch is rarer).",
    )


def es_auc_oscillation(log: RunLog, tau: float | None = None) -> Finding | None:
    """Validation ES-AUC goes up and down from epoch to epoch."""
    _, values = log.epoch_series("es_auc")
    if values.size < OSC_MIN_EPOCHS:
        return None
    diffs = np.diff(values)
    moving = diffs[diffs != 0]
    if moving.size < 2:
        return None
    flips = float(np.mean(np.sign(moving[1:]) != np.sign(moving[:-1])))
    amplitude = float(np.mean(np.abs(diffs)))
    if flips < OSC_SIGN_FLIPS or amplitude < OSC_MIN_AMPLITUDE:
        return None
    return Finding(
        rule="es_auc_oscillation",
        title="validation ES-AUC oscillates from epoch to epoch",
        evidence=f"{flips:.0%} of epoch-to-epoch changes reverse direction, mean |change| "
        f"{amplitude:.3f} over {values.size} epochs",
        advice="The group signals come from noisy per-batch estimates: smooth them more (EMA "
        "s closer to 1), increase the batch size, or check that minority groups appear in most "
        "batches (group-stratified sampling).",
    )


# Each rule's signature in general words (a Finding's title names the modalities involved).
SIGNATURES = {
    "aux_auc_plateau": "one modality's auxiliary AUC plateaus while another climbs",
    "gap_above_tau": "group AUC gap stays above tau for most of training",
    "auc_drop_on_fair_mode": "validation AUC drops when fairness mode switches on",
    "es_auc_oscillation": "validation ES-AUC oscillates from epoch to epoch",
}

RULES: Sequence[Callable[[RunLog, float | None], Finding | None]] = (
    aux_auc_plateau,
    gap_above_tau,
    auc_drop_on_fair_mode,
    es_auc_oscillation,
)


def diagnose(log: RunLog, tau: float | None) -> list[Finding]:
    """Every rule over one log; the findings in rule order."""
    return [f for rule in RULES if (f := rule(log, tau)) is not None]
