"""How a bad-input case runs: the shared inputs it corrupts (built once), in-process and
subprocess runners, and the verdict. The cases themselves are in `cases.py`; the test
(`test_bad_inputs.py`) and the table (`benchmarks/bad_inputs.py`) both run them through
`run_case`.

A case passes when the exit status is the expected one, stderr holds no traceback, the error is
ONE line (the last line of stderr; of stdout for input that must be accepted and for `data
inspect`'s report) matching the case's pattern, and the case's own check (nothing already
written lost) holds.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DIABETES = str(CONFIGS / "diabetes.yaml")
DEMO = str(CONFIGS / "demo.yaml")
# one epoch of a 16-wide model: a training run in seconds
TINY = [
    "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.tensorboard=false",
    "train.warmup_steps=0", "model.dim=16", "output.n_boot=0", "output.predictions=[test]",
]  # fmt: skip
# the demo recipe on the 40-subject tree: 16 px, 5 OCT slices, 2 steps
FV_TINY = [
    "data.image_size=16", "data.oct_slices=5", "method.name=erm", "train.epochs=1",
    "train.batch_size=10", "train.progress=false", "train.tensorboard=false",
    "train.warmup_steps=0", "output.n_boot=0", "output.predictions=[test]",
]  # fmt: skip
TINY_TREE = {
    "n": 40, "fundus_shape": [16, 16], "oct_shape": [5, 16, 16],
    "split": [0.5, 0.25, 0.25], "group_mix": [0.3, 0.3, 0.4],
}  # fmt: skip


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float = 0.0

    def line(self, stream: str) -> str:
        """The one line a case is judged by: the last line of stderr (an error) or stdout."""
        lines = [ln for ln in getattr(self, stream).splitlines() if ln.strip()]
        return lines[-1] if lines else ""


Setup = Callable[["Workspace", Path], list[str]]
Check = Callable[["Workspace", Path, Outcome], None]
Runner = Callable[["Workspace", Path, list[str]], Outcome]


@dataclass(frozen=True)
class Case:
    id: str
    entry: str  # the entry point: train, evaluate, predict, audit, data inspect, ..., config
    setup: Setup  # writes the bad input under the case's folder, returns the argv
    code: int  # the expected exit status
    message: str  # a regex the one error line must match (search)
    check: Check | None = None  # nothing already written lost, the files a case must leave
    runner: Runner | None = None  # default: `multifair.cli.main` in this process
    stream: str = "err"  # where the line is: "out" for accepted input and inspect's report


@dataclass
class Verdict:
    case: Case
    outcome: Outcome
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------- shared inputs
class Workspace:
    """Inputs the cases copy and corrupt, each built once: a 40-subject FairVision tree, a
    FairVLMed tree, a synthetic table, a trained one-epoch run on the diabetes table."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._built: dict[str, Path] = {}

    def _once(self, name: str, build: Callable[[Path], None]) -> Path:
        if name not in self._built:
            path = self.root / name
            if not path.exists():
                partial = self.root / f".{name}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                build(partial)
                partial.rename(path)
            self._built[name] = path
        return self._built[name]

    def fairvision(self) -> Path:
        return self._once("fv", lambda p: _synth(p, "fairvision"))

    def fairvlmed(self) -> Path:
        return self._once("vlm", lambda p: _synth(p, "fairvlmed"))

    def table(self) -> Path:
        return self._once("table", lambda p: _synth(p, "table", n=60))

    def table_run(self) -> Path:
        """A finished one-epoch run on the diabetes table (never modified: cases copy it)."""

        def build(path: Path) -> None:
            code, _, err = call(["train", DIABETES, *TINY, "--out", str(path)])
            assert code == 0, err

        return self._once("table_run", build)


def _synth(out: Path, flavour: str, **knobs: Any) -> None:
    from multifair.data.synthetic import SynthKnobs, generate

    params = {**TINY_TREE, **knobs}
    if flavour == "table":
        params = {k: v for k, v in params.items() if k not in ("fundus_shape", "oct_shape")}
    if flavour == "fairvlmed":
        params.pop("oct_shape")
    generate(SynthKnobs(flavour=flavour, **params), out, progress=False)


# ------------------------------------------------------------------------------------ runners
def call(argv: Sequence[str]) -> tuple[int, str, str]:
    """`multifair.cli.main(argv)` in this process: (exit status, stdout, stderr)."""
    from multifair.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # a bug: the traceback is what the verdict reports
            import traceback

            traceback.print_exc(file=err)
            code = -1
    return code, out.getvalue(), err.getvalue()


def in_process(ws: Workspace, folder: Path, argv: list[str]) -> Outcome:
    t0 = time.perf_counter()
    code, out, err = call(argv)
    return Outcome(code, out, err, time.perf_counter() - t0)


def command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "multifair", *argv]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def without_write_override(argv: list[str]) -> list[str]:
    """As root, file modes do not stop writes: drop the capability that lets root ignore
    them (CAP_DAC_OVERRIDE) for the child, so a read-only folder is read-only to it."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("running as root without setpriv: cannot make a folder read-only")
    return [setpriv, "--inh-caps=-dac_override", "--bounding-set=-dac_override", *argv]


def read_only_child(ws: Workspace, folder: Path, argv: list[str]) -> Outcome:
    """The command in a child process that cannot write where the modes say it cannot."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        without_write_override(command(argv)),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------- verdicts
def run_case(case: Case, ws: Workspace, folder: Path) -> Verdict:
    folder.mkdir(parents=True, exist_ok=True)
    argv = case.setup(ws, folder)
    outcome = (case.runner or in_process)(ws, folder, argv)
    problems = []
    if outcome.code != case.code:
        problems.append(f"exit {outcome.code}, expected {case.code}")
    if "Traceback" in outcome.err:
        problems.append("a traceback on stderr")
    line = outcome.line(case.stream)
    if case.stream == "err" and not line.startswith("multifair "):
        problems.append(f"the last line of stderr is not the one-line error: {line[:200]!r}")
    if not re.search(case.message, line):
        problems.append(f"message {line[:200]!r} does not match {case.message!r}")
    if case.check is not None and not problems:
        try:
            case.check(ws, folder, outcome)
        except AssertionError as exc:
            problems.append(f"check: {exc}")
    return Verdict(case, outcome, problems)


# ------------------------------------------------------------------------ helpers for the cases
def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def first_npz(root: Path, split: str = "Training") -> Path:
    return sorted(root.rglob(f"{split}/data_*.npz"))[0]


def rewrite_npz(path: Path, drop: str | None = None, **changes: Any) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != drop}
    arrays.update(changes)
    np.savez(path, **arrays)


def npz_array(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[key]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): to prove nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def chmod_tree(folder: Path, mode: int) -> None:
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir():
            p.chmod(mode)
