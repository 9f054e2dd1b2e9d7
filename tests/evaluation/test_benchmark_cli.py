"""User mistakes on the `benchmark` and `report` command lines: one line, exit 2."""

from __future__ import annotations

import pytest

from multifair.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["benchmark", "collect"], "`benchmark collect` takes exactly one path, got []"),
        (["benchmark", "a.yaml", "b.yaml"], "unexpected arguments ['b.yaml']"),
        (["benchmark", "missing.yaml"], "config file not found: missing.yaml"),
        (["benchmark", "x.yaml", "--workers", "0"], "--workers must be >= 1, got 0"),
        (["benchmark", "collect", "DIR", "--plan"], "--plan goes with a benchmark CONFIG"),
        (["benchmark", "x.yaml", "--with", "DIR2"], "--with go with `collect DIR`"),
        (["benchmark", "collect", "DIR", "--with", "DIR2"], "DIR: not a benchmark directory"),
        (["report", "no/such/dir"], "not a directory: no/such/dir"),
        (["benchmark", "x.yaml", "--address", "auto"], "--address goes with --engine ray"),
        (
            ["benchmark", "x.yaml", "--engine", "ray", "--launcher", "preloaded"],
            "--launcher preloaded starts runs on this machine",
        ),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_collect_of_a_plain_folder_says_what_is_missing(capsys, tmp_path):
    assert main(["benchmark", "collect", str(tmp_path)]) == 2
    assert "not a benchmark directory (no benchmark.yaml" in capsys.readouterr().err


def test_report_of_a_folder_without_a_run(capsys, tmp_path):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory (no metrics.json and no log.jsonl)" in capsys.readouterr().err
