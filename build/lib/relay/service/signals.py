"""SIGTERM/SIGINT as a stop, one rule for the single-process service and the ``--processes``
parent: the first signal starts a graceful stop; another within ``SAME_STOP`` seconds is that
same stop arriving twice (the service manager signals the whole process group, and the parent
passes it on to its workers); a later one exits at once.

Light (no asyncio): the ``--processes`` parent uses it.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable

SAME_STOP = 1.0  # seconds


class StopSignals:
    """Calls ``stop(signal)`` on the first signal and ``force()`` on a later one. Install it
    with ``signal.signal`` or ``loop.add_signal_handler`` (it takes ``(signum[, frame])``)."""

    def __init__(self, stop: Callable[[signal.Signals], None], force: Callable[[], None]) -> None:
        self._stop = stop
        self._force = force
        self.stopping = False
        self._first = -math.inf

    def stop_without_signal(self) -> None:
        """A stop for another reason (a worker died, a start failed): any signal after it forces."""
        self.stopping = True

    def __call__(self, signum: int, _frame: object = None) -> None:
        if not self.stopping:
            self.stopping = True
            self._first = time.monotonic()
            self._stop(signal.Signals(signum))
        elif time.monotonic() - self._first > SAME_STOP:
            self._force()
