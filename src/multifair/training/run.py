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
from pathlib import Path
from typing import Any

import torch
import yaml

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


def new_run_dir(run_dir: str | Path | None, method: str) -> Path:
    """`run_dir` (must be absent or empty), or a fresh `runs/<method>-<timestamp>`."""
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists() and any(path.iterdir()):
            raise UserError(
                f"output.dir: run directory {path} already exists and is not empty; choose "
                f"another one, or continue it with --resume {path}"
            )
    else:
        base = Path("runs") / f"{method}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path, i = base, 1
        while path.exists():
            path = base.with_name(f"{base.name}-{i}")
            i += 1
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    return path


def write_config(config: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


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
