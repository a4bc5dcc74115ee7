"""Start-up as one stack: a step that fails stops what the steps before it started, seen from
outside (the ports are free again, the store is closed, delivery has stopped); and the stop
rule for SIGTERM/SIGINT that the single process and the --processes parent share."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_config, running_relay

from relay.errors import StartError
from relay.service.lifecycle import Relay
from relay.service.signals import SAME_STOP, StopSignals


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port someone else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_listen(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def store_is_closed(data: Path) -> bool:
    """The store was opened (and migrated), then closed: SQLite removes the -wal file when its
    last connection closes."""
    return (data / "relay.db").is_file() and not (data / "relay.db-wal").exists()


@pytest.mark.parametrize("failing", ["http", "tracking"])  # bound after SMTP; tracking after HTTP too
async def test_a_listener_that_cannot_be_had_stops_what_had_started(
    tmp_path: Path, taken_port: int, failing: str
) -> None:
    ports = {"smtp": free_port(), "http": free_port(), "tracking": free_port(), failing: taken_port}

    def config_on(ports: dict[str, int]) -> Relay:
        return Relay(
            make_config(
                tmp_path,
                smtp={"listen": [f"127.0.0.1:{ports['smtp']}"]},
                http={"listen": f"127.0.0.1:{ports['http']}"},
                tracking={"base_url": "https://track.example.com", "listen": f"127.0.0.1:{ports['tracking']}"},
            )
        )

    relay = config_on(ports)
    with pytest.raises(StartError) as failed:
        await relay.startup()
    assert str(failed.value) == f"cannot listen on 127.0.0.1:{taken_port}: address already in use"
    assert store_is_closed(tmp_path / "data")
    started = [name for name in ("smtp", "http") if name != failing]
    assert started
    for name in started:
        assert can_listen(ports[name]), f"{name} still bound"

    # Another Relay starts on the same data directory and the same ports (the taken one given up).
    ports[failing] = free_port()
    async with running_relay(config_on(ports).config, deliver=True) as again:
        assert again.smtp_addresses[0].port == ports["smtp"]
        assert again.delivery_task is not None
        assert not again.delivery_task.done()
    assert again.delivery_task.done()


async def test_a_failure_after_delivery_started_stops_delivery_and_the_rest(tmp_path: Path) -> None:
    # SMTP starts last: given a socket it cannot serve on, its start fails with delivery running.
    http_port = free_port()
    relay = Relay(make_config(tmp_path, http={"listen": f"127.0.0.1:{http_port}"}))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as not_a_listener:
        not_a_listener.bind(("127.0.0.1", 0))
        with pytest.raises(StartError, match=r"^cannot start: "):
            await relay.startup(smtp_sockets=[not_a_listener])
    assert relay.delivery_task is not None
    assert relay.delivery_task.done()
    assert can_listen(http_port)
    assert store_is_closed(tmp_path / "data")


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
