"""The bad-input battery as a table: every case of tests/robustness/cases.py, run the way the
test runs it, one row each (case | entry point | exit code | message | pass/fail).

    python benchmarks/bad_inputs.py            # all cases
    python benchmarks/bad_inputs.py npz- table-  # only the cases whose id starts so

Exit status 1 when a case fails (its problems are printed under the table).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "robustness"))

from battery import REPO, Workspace, run_case
from cases import CASES

WIDTH = 80  # characters of the message shown


def shown(verdict) -> str:
    """The judged line without the `multifair CMD: error: ` prefix and temporary paths."""
    line = verdict.outcome.line(verdict.case.stream)
    line = re.sub(r"^multifair [a-z ]+?: (error: )?", "", line)
    line = re.sub(r"\S*/case(?=[/\s:']|$)", "...", line)  # the case's temporary folder
    line = line.replace(f"{REPO}/", "")
    return line[:WIDTH]


def main(prefixes: list[str]) -> int:
    cases = [c for c in CASES if not prefixes or c.id.startswith(tuple(prefixes))]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        ws = Workspace(Path(tmp) / "shared")
        verdicts = [run_case(c, ws, Path(tmp) / c.id / "case") for c in cases]
    print("| # | case | entry point | exit | message (first 80 characters) | result |")
    print("|---|---|---|---|---|---|")
    for i, v in enumerate(verdicts, 1):
        message = shown(v).replace("|", "\\|")
        result = "pass" if v.ok else "FAIL"
        print(f"| {i} | {v.case.id} | {v.case.entry} | {v.outcome.code} | {message} | {result} |")
    failed = [v for v in verdicts if not v.ok]
    print(
        f"\n{len(verdicts) - len(failed)}/{len(verdicts)} cases pass "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    for v in failed:
        print(f"FAIL {v.case.id}: {'; '.join(v.problems)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
