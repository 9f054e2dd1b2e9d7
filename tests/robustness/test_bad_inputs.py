"""Every case of the bad-input battery (cases.py): the exit status, ONE clear line naming the
file, key or value, no traceback, and nothing already written lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from battery import Workspace, run_case
from cases import CASES


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("robustness"))


def test_case_ids_are_distinct():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, workspace: Workspace, tmp_path: Path):
    verdict = run_case(case, workspace, tmp_path / "case")
    assert verdict.ok, "; ".join(verdict.problems) + f"\nstderr:\n{verdict.outcome.err[-3000:]}"
