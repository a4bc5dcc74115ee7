"""How `relay serve` starts: a failed start is one line on stderr and exit 1 with nothing
started; a step that fails stops what the steps before it started (the ports free again, the
store closed, delivery stopped); a stop while workers start is clean; the loopback tracking
warning, once; tracking off until configured; the SQLite files private to Relay."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from helpers import ServeProcess, make_config, relay_cli, running_relay, send, serve_config, smtp_client, wait_for
from helpers.peers import dns_server, sinks

from relay.errors import StartError
from relay.service.lifecycle import Relay

PROCESSES = pytest.mark.parametrize("processes", ["1", "2"])


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port someone else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def _serve_fails(config: Path, processes: str) -> str:
    """Run `relay serve`, expect exit 1; return the one line it printed."""
    code, out, err = await relay_cli("serve", "--config", str(config), "--processes", processes)
    assert code == 1, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # no traceback, no log of anything having started
    return lines[0]


@PROCESSES
@pytest.mark.parametrize("listener", ["smtp", "http", "tracking"])
async def test_a_port_in_use_is_one_line_and_nothing_starts(
    tmp_path: Path, taken_port: int, listener: str, processes: str
) -> None:
    ports = {"smtp": 0, "http": 0, "tracking": 0, listener: taken_port}
    config = serve_config(
        tmp_path,
        f"""[http]
listen = "127.0.0.1:{ports["http"]}"
[tracking]
base_url = "https://track.example.com"
listen = "127.0.0.1:{ports["tracking"]}"
""",
    )
    config.write_text(config.read_text().replace('"127.0.0.1:0"]', f'"127.0.0.1:{ports["smtp"]}"]'))
    line = await _serve_fails(config, processes)
    assert line == f"relay: cannot listen on 127.0.0.1:{taken_port}: address already in use"
    assert not (tmp_path / "data" / "relay.db").exists()  # the store was not even opened


@PROCESSES
async def test_a_store_that_cannot_open_is_one_line(tmp_path: Path, processes: str) -> None:
    (tmp_path / "data" / "relay.db").mkdir(parents=True)  # where the SQLite file should be
    line = await _serve_fails(serve_config(tmp_path, ""), processes)
    assert line.startswith("relay: cannot open the store: "), line


@PROCESSES
async def test_a_worker_that_cannot_start_is_one_line_from_the_parent(tmp_path: Path, processes: str) -> None:
    secret = tmp_path / "data" / "tracking.secret"
    secret.mkdir(parents=True)  # the store opens and migrates; each worker then fails reading this
    line = await _serve_fails(serve_config(tmp_path, ""), processes)
    assert line == f"relay: cannot start: {secret}: is a directory"


@PROCESSES
async def test_an_unreachable_postgresql_is_one_line(tmp_path: Path, processes: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = serve_config(tmp_path, f'[store]\nurl = "postgresql+asyncpg://postgres@127.0.0.1:{port}/test"\n')
        line = await _serve_fails(config, processes)
    assert line == "relay: cannot open the store: connection refused"


@PROCESSES
async def test_tls_files_that_cannot_be_read_or_loaded_are_one_line(tmp_path: Path, processes: str) -> None:
    missing = tmp_path / "missing.pem"
    config = serve_config(tmp_path, f'tls_cert = "{missing}"\ntls_key = "{missing}"\n')
    line = await _serve_fails(config, processes)
    assert line == f"relay: cannot read the TLS file {missing}: no such file or directory"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = serve_config(tmp_path, f'tls_cert = "{garbage}"\ntls_key = "{garbage}"\n')
    line = await _serve_fails(config, processes)
    assert line.startswith(f"relay: cannot load the TLS certificate {garbage}: "), line


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


async def test_a_stop_while_the_workers_start_is_a_clean_stop(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(serve_config(tmp_path, "")), "--processes", "2",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")

    def workers_forked() -> bool:
        return len(children.read_text().split()) >= 2  # the migration child is alone; then the workers

    await wait_for(workers_forked, timeout=20)
    os.kill(proc.pid, signal.SIGTERM)  # most likely while the workers import and open the store
    assert proc.stderr is not None
    err = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
    assert await proc.wait() == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("base_url", "processes", "warnings"),
    [
        ("http://127.0.0.1:8025", "2", 1),
        ("http://127.5.6.7/", "1", 1),
        ("http://localhost:8025/t", "2", 1),
        ("http://[::1]:8025", "1", 1),
        ("https://track.example.com", "2", 0),
    ],
)
async def test_a_loopback_tracking_url_is_warned_about_once(
    tmp_path: Path, base_url: str, processes: str, warnings: int
) -> None:
    config = serve_config(tmp_path, f'[tracking]\nbase_url = "{base_url}"\n')
    server = await ServeProcess(config, "--processes", processes).start()
    server.terminate()
    assert await server.wait() == 0
    found = [line for line in server.log if "WARNING" in line and "loopback" in line]
    assert len(found) == warnings, server.log


async def test_without_base_url_nothing_is_tracked_or_rewritten(tmp_path: Path) -> None:
    html = (
        b"From: App <app@example.com>\r\nSubject: Hi\r\nX-Relay-Track: opens, clicks\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b'<html><body><a href="https://example.org/start">start</a></body></html>\r\n'
    )
    with dns_server() as zone:
        async with sinks("127.0.0.2") as (sink,):
            zone.a("example.net", "127.0.0.2")
            config = make_config(
                tmp_path,
                delivery={"port": sink.port},
                dns={"nameservers": [f"127.0.0.1:{zone.port}"], "timeout": "1s"},  # type: ignore[attr-defined]
            )
            assert not config.tracking.enabled
            async with running_relay(config, deliver=True) as relay:
                assert relay.delivery is not None
                assert relay.delivery.tracker is None
                async with smtp_client(relay) as c:
                    code, text = await send(c, "app@example.com", ["jane@example.net"], html)
                assert code == 250, text
                await wait_for(lambda: len(sink.messages) == 1)
    (delivered,) = sink.messages
    assert b'<a href="https://example.org/start">' in delivered.data
    assert b"/t/o/" not in delivered.data
    assert b"/t/c/" not in delivered.data


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@PROCESSES
async def test_the_store_files_are_private(tmp_path: Path, processes: str) -> None:
    data = tmp_path / "data"
    if processes == "2":
        data.mkdir()
        data.chmod(0o755)  # made by someone else, too open: Relay tightens its own directory
    with dns_server() as zone:
        config = serve_config(tmp_path, f'[dns]\nnameservers = ["127.0.0.1:{zone.port}"]\ntimeout = "1s"\n')  # type: ignore[attr-defined]
        server = await ServeProcess(config, "--processes", processes).start()
        try:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.smtp_port, start_tls=False, timeout=10)
            await client.connect()
            try:
                await client.sendmail("app@example.com", ["jane@example.com"], b"Subject: hi\r\n\r\nsecret body\r\n")
            finally:
                client.close()
            assert _mode(data) == 0o700
            for name in ("relay.db", "relay.db-wal", "relay.db-shm", "tracking.secret"):
                assert _mode(data / name) == 0o600, name
        finally:
            server.terminate()
            assert await server.wait() == 0
    for path in data.iterdir():
        if path.is_file():
            assert _mode(path) & 0o077 == 0, path.name
