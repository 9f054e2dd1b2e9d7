"""Model tests run torch on one thread.

On the shared 2-core machine, torch's two OpenMP threads spin against other processes: a
tiny EfficientNet-Lite0 forward + backward measured 0.2-0.3 s on one thread and 5-22 s on
two under load. The fixture restores the previous setting after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
