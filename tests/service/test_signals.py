"""SIGTERM/SIGINT as a stop, the rule the single process and the --processes parent share: a
second signal within a second is the same stop; a later one, or any after a stop for another
reason, forces."""

from __future__ import annotations

import signal
import time

from relay.service.signals import SAME_STOP, StopSignals


def test_a_second_signal_is_the_same_stop_and_a_later_one_forces() -> None:
    stops: list[signal.Signals] = []
    forced: list[float] = []
    signals = StopSignals(stops.append, lambda: forced.append(time.monotonic()))
    signals(signal.SIGTERM)
    signals(signal.SIGINT, None)  # the same stop, passed on by a parent or to the whole group
    assert (stops, forced, signals.stopping) == ([signal.SIGTERM], [], True)
    time.sleep(SAME_STOP + 0.05)
    signals(signal.SIGTERM)
    assert (stops, len(forced)) == ([signal.SIGTERM], 1)

    # A stop for another reason (a worker died): the first signal after it forces.
    other = StopSignals(stops.append, lambda: forced.append(time.monotonic()))
    other.stop_without_signal()
    other(signal.SIGTERM)
    assert (stops, len(forced)) == ([signal.SIGTERM], 2)
