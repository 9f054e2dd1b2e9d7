"""How a benchmark starts one training run.

- `subprocess` (the default): a fresh `python -m multifair train ...` per run, exactly the
  command `--plan` prints for a scheduler.
- `preloaded`: a child forked from a server process that imported torch and multifair once
  (multiprocessing's forkserver). Short runs on small CPUs spend seconds per run on those
  imports alone (2-5 s on the 2-core dev machine, more than a demo run's training); here each
  run starts in milliseconds. The server never touches a GPU, so CUDA starts fresh in each child.

- `ray`: a Ray task on a Ray cluster, local or remote (`multifair.evaluation.launch_ray`; Ray
  is an optional dependency, imported only then), running the `subprocess` command line.

All return a handle with `subprocess.Popen`'s poll / returncode / terminate / kill / wait, so
the runner's loop does not care which it got.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

Launcher = Literal["subprocess", "preloaded", "ray"]

# What the server imports once; `torch._dynamo` is what the first optimizer pulls in.
PRELOAD = ["torch", "torch._dynamo", "multifair.cli", "multifair.training.trainer"]


def start(
    launcher: Launcher,
    command: Sequence[str],
    stdout: IO[bytes],
    stderr: IO[bytes],
    env: dict[str, str],
    threads: int,
) -> Any:
    """Start `command` (`python -m multifair train ...`) with stdout/stderr to the two open
    files; returns a Popen-like handle."""
    if launcher == "subprocess":
        return subprocess.Popen(list(command), stdout=stdout, stderr=stderr, env=env)
    if launcher == "ray":
        from multifair.evaluation.launch_ray import RayRun

        return RayRun(command, Path(stdout.name), Path(stderr.name), threads)
    args = list(command)[3:]  # after `python -m multifair`
    return PreloadedRun(args, Path(stdout.name), Path(stderr.name), threads)


_context: Any = None


def _forkserver() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


class PreloadedRun:
    """One `multifair` command line in a child of the preloaded server."""

    def __init__(self, args: list[str], stdout: Path, stderr: Path, threads: int) -> None:
        self.process = _forkserver().Process(
            target=_child, args=(args, str(stdout), str(stderr), threads), daemon=False
        )
        self.process.start()

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("multifair", timeout or 0)
        return self.process.exitcode


def _child(args: list[str], stdout: str, stderr: str, threads: int) -> None:
    """In the forked child: the run's own log files on fds 1 and 2, its thread budget, then the
    same entry point as `python -m multifair`."""
    import torch

    for fd, path in ((1, stdout), (2, stderr)):
        with open(path, "ab", buffering=0) as file:
            os.dup2(file.fileno(), fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(threads)
    torch.set_num_threads(threads)
    # run the package as a program, as `python -m multifair ARGS` does (its SystemExit is the
    # child's exit status); the server has already imported what it needs
    sys.argv = ["multifair", *args]
    try:
        runpy.run_module("multifair", run_name="__main__", alter_sys=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
