# SPDX-License-Identifier: Apache-2.0
"""SIGTERM as a request: the training loop checkpoints and returns at the end of the current step."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StopFlag:
    """Set by SIGTERM (or a caller); the loop checkpoints and returns at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signal = signum


@contextmanager
def sigterm_to(flag: StopFlag) -> Iterator[None]:
    """Route SIGTERM to ``flag`` while the block runs; the previous handler comes back after it."""
    try:
        previous = signal.signal(signal.SIGTERM, flag.handle)
    except ValueError:  # not the main thread: no handler can be installed, run without one
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
