"""Running a benchmark's plan: every unfinished run as a `multifair train` process, started by
a launcher (`multifair.evaluation.launch`: here, or as a Ray task on a cluster).

A finished run (complete `metrics.json`) is skipped, so a killed benchmark resumes where it
stopped. Each attempt's stdout, stderr and status (return code, seconds, the fingerprint of
what it trained with) are kept in `OUTPUT/logs/`, outside the run directory the trainer owns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from multifair.config import validate
from multifair.evaluation import launch
from multifair.evaluation.benchmark_plan import (
    OUTPUT_KEY,
    BenchmarkConfig,
    RunSpec,
    execution_order,
)
from multifair.evaluation.launch import Launcher


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics.json if it is complete (a finished run), else None."""
    path = run_dir / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    test = data.get("test") if isinstance(data, dict) else None
    if not isinstance(test, dict):
        return None
    overall = test.get("overall")
    if not isinstance(overall, dict) or "auc" not in overall or "attributes" not in test:
        return None
    return data


def is_finished(run: RunSpec) -> bool:
    return read_metrics(run.run_dir) is not None


def log_paths(out_dir: Path, run: RunSpec) -> tuple[Path, Path, Path]:
    """stdout, stderr and status files of a run, kept outside the run directory (which the
    trainer owns) so that a failed attempt's evidence survives the retry's clean-up."""
    stem = str(out_dir / "logs" / "__".join(run.run_dir.parts[-4:]))
    # appended, not Path.with_suffix: a label like "p=0.5" has a dot of its own
    return Path(stem + ".stdout"), Path(stem + ".stderr"), Path(stem + ".status")


def fingerprint(run: RunSpec) -> str:
    """What the run trains with: its training config file and its per-run overrides (not the
    run directory). A finished run whose recorded fingerprint differs is stale."""
    try:
        text = run.config.read_text(encoding="utf-8")
    except OSError:
        text = ""
    overrides = {k: v for k, v in run.overrides.items() if k != OUTPUT_KEY}
    payload = text + "\n" + json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_status(out_dir: Path, run: RunSpec) -> dict[str, Any]:
    """The status the runner recorded for a run's last attempt ({} when there is none)."""
    try:
        data = json.loads(log_paths(out_dir, run)[2].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stale_runs(out_dir: Path, runs: Sequence[RunSpec]) -> list[RunSpec]:
    """Finished runs that this runner trained with a different config than the current one."""
    out = []
    for run in runs:
        recorded = read_status(out_dir, run).get("fingerprint")
        if recorded and is_finished(run) and recorded != fingerprint(run):
            out.append(run)
    return out


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class RunOutcome:
    run: RunSpec
    status: Literal["done", "skipped", "failed"]
    seconds: float = 0.0
    returncode: int | None = None
    stderr_tail: str = ""


class Terminated(Exception):
    """SIGTERM while the benchmark runs (handled like Ctrl-C: stop the children, exit)."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread so `finally` stops the children."""
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            raise Terminated()

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def oversubscribed(parallel: int, threads: int, cores: int) -> str | None:
    """A warning when `parallel` runs of `threads` threads each exceed the CPU cores."""
    if parallel * threads <= cores:
        return None
    return (
        f"WARNING: {parallel} runs x {threads} threads exceed the {cores} CPU cores, so the "
        "runs compete for them (on a GPU machine too: data loading and the training loop run "
        f"on the CPU); --workers {max(1, cores // threads)} avoids that"
    )


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop(processes: Sequence[Any]) -> None:
    """Terminate, then kill after 10 s, each running process (Popen or a preloaded run)."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prepare_data(cfg: BenchmarkConfig, echo: Callable[[str], None] = print) -> None:
    """Generate missing synthetic datasets (before any run or config needs them).

    A dataset counts as present when its `synth_meta.json` exists; the generator refuses to
    overwrite a non-empty folder without it (so a half-written folder is never reused).
    """
    for dataset in cfg.datasets:
        synth = dataset.synth
        if synth is None:
            continue
        for folder, seed in synth.draws(cfg.seeds).items():
            if (folder / "synth_meta.json").is_file():
                continue
            from multifair.data.synthetic import SynthKnobs, generate

            seed_knob = {} if seed is None else {"seed": seed}
            knobs = validate(
                SynthKnobs,
                {**synth.knobs, **seed_knob, "flavour": synth.flavour, "scenario": synth.scenario},
                source=f"datasets.{dataset.label}.synth",
            )
            echo(f"generating {synth.flavour} data ({synth.scenario}) in {folder}")
            generate(knobs, folder, progress=False)


def execute(
    cfg: BenchmarkConfig,
    runs: Sequence[RunSpec],
    out_dir: Path,
    *,
    workers: int | None = None,
    launcher: Launcher | None = None,
    echo: Callable[[str], None] = print,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every unfinished run (a subprocess, a preloaded child or a Ray task), up to
    `workers` at a time.

    A finished run (complete metrics.json) is skipped. An unfinished run's directory is
    cleared before it starts again (its previous stderr stays in `logs/`). A failed run is
    reported with the tail of its stderr and the benchmark continues with the others.
    Runs start seed by seed (every method's first seed, then every method's second, ...), so a
    benchmark stopped part-way leaves whole seeds that pair across methods.
    On Ctrl-C or SIGTERM the running children are terminated before this returns.
    `launcher` (default: the config's) says how a run starts (`multifair.evaluation.launch`);
    `on_done` is called with each finished or failed run's outcome (a progress bar).
    """
    workers = workers or cfg.workers
    threads = cfg.threads_per_run or max(1, (os.cpu_count() or 1) // workers)
    env = _child_env(threads)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    outcomes: list[RunOutcome] = []
    pending: list[RunSpec] = []
    for run in runs:
        if is_finished(run):
            outcomes.append(RunOutcome(run, "skipped"))
        else:
            pending.append(run)
    pending = execution_order(cfg, pending)
    total = len(pending)
    echo(
        f"{len(runs)} runs: {len(runs) - total} already finished, {total} to run, {workers} at a time"
    )
    launcher = launcher or cfg.launcher
    # Ray places each run on a node with `threads` free cores: it never oversubscribes
    warning = oversubscribed(min(workers, total), threads, os.cpu_count() or 1)
    if warning and launcher != "ray":
        echo(warning)
    stale = stale_runs(out_dir, runs)
    if stale:
        echo(
            f"WARNING: {len(stale)} finished runs were trained with a different config than the "
            "current one; they are kept - delete their run directories to retrain them: "
            + ", ".join(r.run_id for r in stale[:10])
            + (" ..." if len(stale) > 10 else "")
        )
    active: dict[Any, tuple[RunSpec, float, Any, Any]] = {}
    started = 0
    with _sigterm_as_exception():
        try:
            while pending or active:
                while pending and len(active) < workers:
                    run = pending.pop(0)
                    if run.run_dir.exists():
                        shutil.rmtree(run.run_dir)
                    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
                    out_path, err_path, status_path = log_paths(out_dir, run)
                    status_path.unlink(missing_ok=True)
                    stdout = out_path.open("wb")
                    stderr = err_path.open("wb")
                    proc = launch.start(launcher, run.command(), stdout, stderr, env, threads)
                    started += 1
                    echo(f"[{started}/{total}] start {run.run_id}")
                    active[proc] = (run, time.monotonic(), stdout, stderr)
                time.sleep(0.1)
                for proc in list(active):
                    run, t0, stdout, stderr = active[proc]
                    elapsed = time.monotonic() - t0
                    if proc.poll() is None:
                        if cfg.timeout_s is None or elapsed < cfg.timeout_s:
                            continue
                        _stop([proc])
                        stderr.write(f"\n[benchmark] killed after {cfg.timeout_s:g} s\n".encode())
                    stdout.close()
                    stderr.close()
                    del active[proc]
                    outcomes.append(_finish(run, proc.returncode, elapsed, out_dir, echo))
                    if on_done is not None:
                        on_done(outcomes[-1])
        finally:
            # Ctrl-C / SIGTERM / a bug: never leave training processes running behind us.
            _stop(list(active))
            for _, _, stdout, stderr in active.values():
                stdout.close()
                stderr.close()
    return outcomes


def _finish(
    run: RunSpec, returncode: int, seconds: float, out_dir: Path, echo: Callable[[str], None]
) -> RunOutcome:
    _, err_path, status_path = log_paths(out_dir, run)
    done = returncode == 0 and is_finished(run)
    status: Literal["done", "failed"] = "done" if done else "failed"
    info = {
        "status": status,
        "returncode": returncode,
        "seconds": round(seconds, 3),
        "fingerprint": fingerprint(run),
    }
    status_path.write_text(json.dumps(info) + "\n", encoding="utf-8")
    outcome = RunOutcome(run, status, seconds, returncode)
    if done:
        echo(f"done {run.run_id} ({seconds:.1f} s)")
    else:
        why = f"exit {returncode}" if returncode != 0 else "exit 0 but no complete metrics.json"
        outcome.stderr_tail = tail(err_path)
        echo(f"FAILED {run.run_id} ({why}); stderr: {err_path}\n{indent(outcome.stderr_tail)}")
    return outcome


def indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
