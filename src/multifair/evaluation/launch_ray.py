"""The `ray` launcher: each benchmark run as a Ray task on a Ray cluster.

Why Ray (and not Slurm job arrays through submitit): Ray installs from PyPI and starts a local
cluster in-process, so the same code path runs on a laptop, in CI and on a cluster
(`--address`); submitit needs a Slurm controller, which most machines that run this package do
not have. Ray is an optional dependency (`pip install "multifair[ray]"`); nothing else imports it.

A task runs exactly the command line the `subprocess` launcher runs (`python -m multifair train
...`), with its stdout and stderr appended to the runner's log files and `num_cpus` = the run's
thread budget, so Ray never packs more runs on a node than it has cores. The runner's
bookkeeping (skipping finished runs, status files, stale detection, failure reports) is the same
as for local runs: this module only supplies a handle with `subprocess.Popen`'s poll / returncode
/ terminate / kill / wait. On a multi-node cluster the output directory must be on a file system
every node sees, and the nodes need the same Python environment at the same path.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multifair.errors import UserError

_remote: Any = None


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(
            "--engine ray needs Ray, which is not installed: pip install 'multifair[ray]'"
        ) from None
    return ray


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one `ray start` runs on this machine;
    "ray://host:10001": a remote one), or start a local one (None). A no-op when this process
    is already connected (e.g. a test started the cluster)."""
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"at {address!r}" if address else "locally"
        raise UserError(
            f"--engine ray: could not start or join a Ray cluster {where}: {exc}"
        ) from None


def _run_command(command: list[str], stdout: str, stderr: str, threads: int) -> int:
    """In a Ray worker: the run as a child process, its output appended to the log files; a
    cancelled task terminates its child before it returns."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:  # cancelled (KeyboardInterrupt in the task): stop the run
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class RayRun:
    """One `multifair` command line as a Ray task (see the module docstring)."""

    def __init__(self, command: Sequence[str], stdout: Path, stderr: Path, threads: int) -> None:
        global _remote
        ray = _ray()
        connect()
        if _remote is None:
            # max_retries=0: a failed run is reported, as locally, not silently retried
            _remote = ray.remote(max_retries=0)(_run_command)
        self._ray = ray
        self.stderr = stderr
        self.ref = _remote.options(num_cpus=threads).remote(
            list(command), str(stdout), str(stderr), threads
        )
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = self._ray.wait([self.ref], timeout=0)
            if ready:
                self._collect()
        return self.returncode

    def _collect(self) -> None:
        try:
            self.returncode = int(self._ray.get(self.ref))
        except Exception as exc:  # cancelled, its worker died, or the command did not start
            cancelled = isinstance(exc, self._ray.exceptions.TaskCancelledError)
            self.returncode = -15 if cancelled else 1
            with open(self.stderr, "a", encoding="utf-8") as err:  # the failure report's tail
                err.write(f"\n[ray] {type(exc).__name__}: {exc}\n")

    def terminate(self) -> None:
        if self.poll() is None:
            self._ray.cancel(self.ref)  # KeyboardInterrupt in the task: it stops its child

    def kill(self) -> None:
        if self.poll() is None:
            self._ray.cancel(self.ref, force=True)

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            ready, _ = self._ray.wait([self.ref], timeout=timeout)
            if not ready:
                raise subprocess.TimeoutExpired("multifair", timeout or 0)
            self._collect()
        return self.returncode
