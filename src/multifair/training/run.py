"""The run directory: resolved config, environment (versions, git SHA, machine), and paths.

Layout (docs/architecture.md): config.yaml, env.json, log.jsonl, metrics.json,
predictions_{split}.csv, checkpoints/last.pt, checkpoints/best.pt.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import torch
import yaml

from multifair.config import load_yaml
from multifair.errors import UserError

PACKAGES = (
    "multifair",
    "torch",
    "numpy",
    "scikit-learn",
    "fairlearn",
    "pandas",
    "pydantic",
    "transformers",
)


LOCK_NAME = ".lock"


def new_run_dir(run_dir: str | Path | None, method: str) -> tuple[Path, RunLock]:
    """`run_dir` (must be absent or empty), or a fresh `runs/<method>-<timestamp>`, locked
    for this process (two `train` processes never write into one directory)."""
    if run_dir is not None:
        path = Path(run_dir)
    else:
        base = Path("runs") / f"{method}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path, i = base, 1
        while path.exists():
            path = base.with_name(f"{base.name}-{i}")
            i += 1
    _require_empty(path)  # before the lock: a refused folder is left exactly as it was
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"output.dir: cannot create the run directory {path} ({exc.strerror})"
        ) from None
    lock = RunLock(path)
    try:
        _require_empty(path)  # again under the lock: another process may have started here
    except UserError:
        lock.release()
        raise
    (path / "checkpoints").mkdir(exist_ok=True)
    return path, lock


def _require_empty(path: Path) -> None:
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise UserError(
            f"output.dir: run directory {path} already exists and is not empty; choose "
            f"another one, or continue it with --resume {path}"
        )


class RunLock:
    """An exclusive `flock` on RUN_DIR/.lock (holding the owner's PID) for the life of a
    training process: a second `train` on the same directory is refused, naming the owner.
    The lock goes with the process (also on a kill); the file stays."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        try:
            self._fh: IO[str] | None = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise UserError(
                f"cannot write to the run directory {Path(run_dir)} ({exc.strerror})"
            ) from None
        if fcntl is None:  # no flock (Windows): no protection, as before
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            owner = self._fh.read().strip() or "?"
            self.release()
            raise UserError(
                f"run directory {Path(run_dir)} is in use by process {owner} (another "
                "multifair train); wait for it to finish or choose another directory"
            ) from None
        try:  # the lock file may be writable in a folder that is not
            tempfile.TemporaryFile(dir=self.path.parent).close()
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(f"{os.getpid()}\n")
            self._fh.flush()
        except OSError as exc:
            self.release()
            raise UserError(
                f"cannot write to the run directory {Path(run_dir)} ({exc.strerror})"
            ) from None

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None


def write_config(config: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's resolved config.yaml, as written (validate it with `config_source`
    as the source, so an error names the file)."""
    path = config_source(run_dir)
    if not Path(path).is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_yaml(path)


def config_source(run_dir: str | Path) -> str:
    return str(Path(run_dir) / "config.yaml")


def git_sha() -> dict[str, Any]:
    """The commit of the source tree the package was imported from (None outside a checkout)."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            # a query: never rewrite the checkout's index (runs start concurrently, and
            # a run may be killed while git holds it)
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        ).stdout
        return {"sha": sha, "dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def environment(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """Versions, git SHA, machine and command line: enough to reproduce the run."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    env: dict[str, Any] = {
        "versions": versions,
        "python": sys.version.split()[0],
        "git": git_sha(),
        "machine": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "device": str(device),
        "world_size": world_size,
        "command": sys.argv,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["machine"]["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def write_env(env: dict[str, Any], run_dir: Path, name: str = "env.json") -> None:
    (run_dir / name).write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
