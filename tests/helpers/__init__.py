"""Test helpers: configs, an in-process Relay, SMTP clients, and polling with a deadline."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import pytest
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from relay import config as cfgmod
from relay.model import NewMessage
from relay.service.lifecycle import Relay

T = TypeVar("T")
# Read once, then taken out of the environment: it is not a Relay setting, and `relay` (run as a
# subprocess by tests) refuses RELAY_* variables it does not know.
# pytest-xdist's workers start after the controller imported this: they find it under a name
# that is not a RELAY_* variable.
POSTGRES_URL = os.environ.pop("RELAY_TEST_POSTGRES_URL", "") or os.environ.get("PYTEST_RELAY_POSTGRES_URL", "")
if POSTGRES_URL:
    os.environ["PYTEST_RELAY_POSTGRES_URL"] = POSTGRES_URL


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(tmp_path: Path, **sections: Any) -> cfgmod.Config:
    raw: dict[str, Any] = {
        "server": {"hostname": "relay.test", "data_dir": str(tmp_path / "data")},
        "smtp": {"listen": ["127.0.0.1:0"], "shutdown_grace": "2s"},
        "http": {"listen": "127.0.0.1:0"},
    }
    return cfgmod.from_mapping(deep_merge(raw, sections))


@asynccontextmanager
async def running_relay(config: cfgmod.Config, *, deliver: bool = False) -> AsyncIterator[Relay]:
    """An in-process Relay; intake-only unless deliver=True (then it delivers for real)."""
    relay = Relay(config)
    await relay.startup(deliver=deliver)
    try:
        yield relay
    finally:
        await relay.shutdown()


def smtp_port(relay: Relay) -> int:
    return relay.smtp_addresses[0].port


@asynccontextmanager
async def smtp_client(
    relay: Relay, *, source: str = "127.0.0.1", tls: ssl.SSLContext | None = None, ehlo: bool = True
) -> AsyncIterator[aiosmtplib.SMTP]:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=smtp_port(relay),
        start_tls=False,
        local_hostname="client.test",
        source_address=(source, 0),
        tls_context=tls,
        timeout=10,
    )
    await client.connect()
    try:
        if ehlo:
            await client.ehlo()
        if tls is not None:
            await client.starttls(tls_context=tls)
            await client.ehlo()
        yield client
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()


async def command(client: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    """Send one raw command line; return the reply code and text."""
    verb, _, arg = line.partition(" ")
    reply = await client.execute_command(verb.encode(), *([arg.encode()] if arg else []))
    return reply.code, reply.message


async def send(client: aiosmtplib.SMTP, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
    """MAIL, RCPT each, DATA; return the final reply (the first failure, if any)."""
    for line in (f"MAIL FROM:<{mail_from}>", *(f"RCPT TO:<{r}>" for r in rcpts)):
        code, text = await command(client, line)
        if code >= 400:
            return code, text
    try:
        reply = await client.data(data)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return reply.code, reply.message


async def wait_for(
    check: Callable[[], Awaitable[T | None] | T | None], timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll until check() returns something truthy; fail after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def queue_id_of(reply_text: str) -> str:
    assert "queued as " in reply_text, reply_text
    return reply_text.rsplit("queued as ", 1)[1].strip()


async def raw_smtp(relay: Relay, payload: bytes, replies: int) -> list[str]:
    """Write bytes as they are (no line-ending fixes) after the greeting; read `replies` replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", smtp_port(relay))
    try:
        await reader.readline()
        writer.write(payload)
        await writer.drain()
        out: list[str] = []
        while len(out) < replies:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode().rstrip("\r\n")
            if not line:
                break
            if line[3:4] != "-":
                out.append(line)
        return out
    finally:
        writer.close()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def serve_config(tmp_path: Path, extra: str) -> Path:
    """A relay.toml for `relay serve` in a test: every listener on an ephemeral port, and one
    process (the tests kill it, read its log and its pid; `--processes N` still overrides).
    `extra` continues the [smtp] table and may add others (an [http] of its own included)."""
    http = "" if "[http]" in extra else '[http]\nlisten = "127.0.0.1:0"\n'
    return write_config(
        tmp_path / "relay.toml",
        f"""
[server]
hostname = "relay.test"
data_dir = "{tmp_path / "data"}"
processes = 1
{http}[smtp]
listen = ["127.0.0.1:0"]
{extra}
""",
    )


class ServeProcess:
    """`relay serve` as a subprocess; learns its ports from its log."""

    def __init__(self, config_path: Path, *args: str) -> None:
        self.config_path = config_path
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 20.0) -> ServeProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--config", str(self.config_path), *self.args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read(ready))
        await asyncio.wait_for(ready, timeout)
        return self

    async def _read(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.log.append(text)
            m = re.search(r"(\w+) listening on (\S+):(\d+)", text)
            if m:
                self.ports.setdefault(m.group(1), int(m.group(3)))
            if "relay ready" in text and not ready.done():
                ready.set_result(None)
        if not ready.done():
            ready.set_exception(RuntimeError("relay serve exited early:\n" + "\n".join(self.log[-30:])))

    @property
    def smtp_port(self) -> int:
        return self.ports["smtp"]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.terminate()

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code


async def send_to(port: int, rcpt: str, data: bytes | None = None) -> str:
    """One message from app@example.com to ``rcpt`` over a new SMTP session with 127.0.0.1:port
    (a `relay serve` process); the queue id of its 250."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        message = data if data is not None else f"Subject: to {rcpt}\r\n\r\nhi\r\n".encode()
        errors, text = await client.sendmail("app@example.com", [rcpt], message)
        assert not errors, errors
        return queue_id_of(text)
    finally:
        client.close()


async def relay_cli(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database, dropped afterwards. Skips without RELAY_TEST_POSTGRES_URL,
    except under CI=true, where PostgreSQL is required."""
    if not POSTGRES_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("RELAY_TEST_POSTGRES_URL is not set, and CI=true requires PostgreSQL")
        pytest.skip("RELAY_TEST_POSTGRES_URL is not set")
    import asyncpg

    admin = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    name = f"relay_test_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        await run(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {admin} is not usable: {exc}")
        pytest.skip(f"PostgreSQL at {admin} is not usable: {exc}")
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"postgresql+asyncpg://{base.removeprefix('postgresql://')}/{name}"
    finally:
        await run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Config text: delivery never leaves the machine (no real DNS in tests; nothing listens on
# port 9) and retries wait an hour, so what a test queued stays queued.
NOWHERE = """[delivery]
retry_schedule = ["1h"]
[[routes]]
domains = ["*"]
host = "127.0.0.1"
port = 9
"""


async def store_url(kind: str, sqlite_file: Path, stack: AsyncExitStack) -> str:
    """A fresh store's URL: ``kind`` "sqlite" (at ``sqlite_file``) or "postgres" (a database of
    its own, dropped when ``stack`` closes)."""
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{sqlite_file}"
    return await stack.enter_async_context(pg_database())


async def wait_drained(store: Any, timeout: float = 60) -> None:
    """Until no recipient in ``store`` (a LogStore) is queued, deferred or sending."""
    from relay.model import ACTIVE_STATES

    async def drained() -> bool:
        summary = await store.queue_summary()
        return sum(summary.counts[s] for s in ACTIVE_STATES) == 0

    await wait_for(drained, timeout=timeout)


async def raw_sql(url: str, fn: Callable[[Connection], T], *, write: bool = False) -> T:
    """Run ``fn`` on a connection of its own to the store at ``url``, from outside Relay: what a
    test reads or plants behind the store's back (committed when ``write``)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() if write else engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})?", key)
        if m and m.group(1) == name:
            got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
            if got == want:
                return float(value)
    return 0.0


def new_message(
    qid: str, rcpts: tuple[str, ...] = ("jane@example.com",), *, at: float | None = None, **kw: object
) -> NewMessage:
    """A message as intake would hand it to the store; ``kw`` overrides fields."""
    fields: dict[str, object] = {
        "queue_id": qid,
        "message_id": f"{qid.lower()}@app.example",
        "mail_from": "app@example.com",
        "recipients": rcpts,
        "subject": "Hello",
        "tags": ("welcome",),
        "user": "app",
        "client_ip": "127.0.0.1",
        "received_at": time.time() if at is None else at,
        "raw": b"Subject: Hello\r\n\r\nbody\r\n",
        "details": {"client_ip": "127.0.0.1", "protocol": "ESMTP"},
    }
    fields.update(kw)
    return NewMessage(**fields)  # type: ignore[arg-type]
