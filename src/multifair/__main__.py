"""`python -m multifair ...`: the same command as `multifair ...` (the benchmark uses it to
start each training run with the interpreter that runs the benchmark)."""

import sys

from multifair.cli import main

sys.exit(main())
