"""What the package shows while it works: progress bars only where a person watches them.

A tqdm bar redraws itself with carriage returns. On a terminal that is one live line; in a log
file (CI, `nohup`, `> run.log`) every redraw is kept, hundreds of frames per epoch. So bars are
drawn only on a terminal (or in a Jupyter kernel, where tqdm draws a widget instead); elsewhere
the training loop's one line per epoch is the log.
"""

from __future__ import annotations

import sys
from typing import Any


def bars_enabled(requested: bool = True, stream: Any = None) -> bool:
    """True when progress bars were asked for and `stream` (default: stderr, where tqdm draws)
    is a terminal."""
    if not requested:
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) or "ipykernel" in sys.modules
