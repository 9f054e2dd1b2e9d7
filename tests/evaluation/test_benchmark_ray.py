"""`multifair benchmark --engine ray`: the tiny benchmark's runs as Ray tasks on a local cluster
of 2 CPUs (one cluster for the module: Ray takes seconds to start). The runner's bookkeeping is
the local engine's, so the same outcomes must show: finished runs, a failed run reported with
its stderr, status files, and a rerun that trains only what is missing."""

from __future__ import annotations

import json

import pytest
from test_benchmark_e2e import finished, tiny_config

from multifair.cli import main
from multifair.evaluation import launch_ray

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'multifair[ray]')")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_benchmark_runs_as_ray_tasks_reports_failures_and_resumes(
    cluster, tmp_path, capsys, monkeypatch
):
    started = []
    init = launch_ray.RayRun.__init__

    def counted(self, command, *args, **kwargs):
        started.append(command)
        init(self, command, *args, **kwargs)

    monkeypatch.setattr(launch_ray.RayRun, "__init__", counted)
    cfg = tiny_config(
        tmp_path,
        methods=[{"label": "erm", "method": {"name": "erm"}}, {"label": "bad", "method": {"name": "erm", "bogus": 1}}],
        seeds=[0],
        workers=2,
        threads_per_run=1,
    )  # fmt: skip
    out_dir = tmp_path / "bench"
    assert main(["benchmark", str(cfg), "--engine", "ray", "--no-report"]) == 1
    err = capsys.readouterr().err
    assert len(started) == 2  # every run went through Ray
    assert "2 runs: 0 already finished, 2 to run" in err
    assert "FAILED data/sex/bad/seed0 (exit 2)" in err and "bogus" in err
    done = finished(out_dir)
    assert len(done) == 1 and all("/erm/" in str(p) for p in done)
    status = json.loads((out_dir / "logs/data__sex__erm__seed0.status").read_text())
    assert status["status"] == "done" and status["returncode"] == 0
    failed = json.loads((out_dir / "logs/data__sex__bad__seed0.status").read_text())
    assert failed["status"] == "failed" and failed["returncode"] == 2
    assert "1 of 2 runs finished" in err
    md = (out_dir / "results/results.md").read_text()
    assert "## Failed runs" in md and "| erm |" in md

    # the same command again: the finished runs are skipped, the failed ones retried
    started.clear()
    assert main(["benchmark", str(cfg), "--engine", "ray", "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "2 runs: 1 already finished, 1 to run" in err
    assert len(started) == 1 and "bad" in " ".join(started[0])
    assert finished(out_dir) == done, "a finished run was redone"
