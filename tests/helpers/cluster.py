"""Helpers for tests of several nodes on one store: a node's relay.toml, a sink that records
which node (HELO) sent each copy and how many transactions ran at once per domain, SMTP
clients that send many messages over one session, and a read connection to the store."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from helpers import ServeProcess, queue_id_of, wait_for

MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.IGNORECASE | re.MULTILINE)


def node_config(
    tmp_path: Path, name: str, url: str, *, dns_port: int, sink_port: int, heartbeat: str = "1s", extra: str = ""
) -> Path:
    """A relay.toml for one node: its own hostname (its HELO) and data_dir, the shared store,
    delivery by DNS on loopback to ``sink_port``, one process (a node is killed by its pid).
    ``extra`` continues [delivery]."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[server]
hostname = "{name}"
data_dir = "{tmp_path / name}"
processes = 1
[store]
url = "{url}"
[http]
listen = "127.0.0.1:0"
[smtp]
listen = ["127.0.0.1:0"]
shutdown_grace = "2s"
[cluster]
heartbeat = "{heartbeat}"
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"
[delivery]
port = {sink_port}
connect_timeout = "5s"
command_timeout = "20s"
retry_schedule = ["1s"]
shutdown_grace = "2s"
{extra}
"""
    )
    return path


async def node_name(server: ServeProcess) -> str:
    """The node's name (its lease owner), from its log."""

    def found() -> str | None:
        for line in server.log:
            if "delivery running as " in line:
                return line.split("delivery running as ")[1].split()[0]
        return None

    return await wait_for(found)


@dataclass
class Copy:
    message_id: str
    helo: str
    rcpts: list[str]


@dataclass
class CountingSink:
    """An SMTP sink that records each accepted copy with the HELO name of the client that sent
    it, and the most transactions (MAIL to the end of DATA) open at once per recipient domain."""

    data_delay: float = 0.0
    copies: list[Copy] = field(default_factory=list)
    open_now: Counter[str] = field(default_factory=Counter)
    most_open: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _server: asyncio.Server | None = None

    def by_message_id(self) -> Counter[str]:
        return Counter(c.message_id for c in self.copies)

    async def start(self, ip: str = "127.0.0.2") -> CountingSink:
        sink = self

        class Handler:
            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                if sink.data_delay:
                    await asyncio.sleep(sink.data_delay)
                found = MESSAGE_ID.search(envelope.original_content or b"")
                mid = found.group(1).decode() if found else ""
                sink.copies.append(Copy(mid, session.host_name or "", list(envelope.rcpt_tos)))
                return "250 2.0.0 OK"

        class Counting(SMTP):
            domain: str | None = None

            async def smtp_RCPT(self, arg: str) -> None:
                await super().smtp_RCPT(arg)
                if self.domain is None and self.envelope.rcpt_tos:
                    self.domain = self.envelope.rcpt_tos[0].rpartition("@")[2].lower()
                    sink.open_now[self.domain] += 1
                    sink.most_open[self.domain] = max(sink.most_open[self.domain], sink.open_now[self.domain])

            def _close_transaction(self) -> None:
                if self.domain is not None:
                    sink.open_now[self.domain] -= 1
                    self.domain = None

            async def smtp_DATA(self, arg: str) -> None:
                try:
                    await super().smtp_DATA(arg)
                finally:
                    self._close_transaction()

            async def smtp_RSET(self, arg: str) -> None:
                self._close_transaction()
                await super().smtp_RSET(arg)

            def connection_lost(self, error: Exception | None) -> None:
                self._close_transaction()
                super().connection_lost(error)

        def factory() -> SMTP:
            return Counting(Handler(), hostname="sink.test")

        self._server = await asyncio.get_running_loop().create_server(factory, ip, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def send_many(port: int, messages: list[tuple[str, str]]) -> list[str]:
    """Send (Message-ID, recipient) pairs over one SMTP session with 127.0.0.1:port; the
    queue ids of their 250s."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
    await client.connect()
    queued = []
    try:
        for mid, rcpt in messages:
            data = f"Message-ID: <{mid}>\r\nSubject: {mid}\r\n\r\nhello {rcpt}\r\n".encode()
            errors, reply = await client.sendmail("app@example.com", [rcpt], data)
            assert not errors, errors
            queued.append(queue_id_of(reply))
    finally:
        client.close()
    return queued


@asynccontextmanager
async def store_reader(url: str) -> AsyncIterator[AsyncEngine]:
    """One small engine to read the store from the test, behind Relay's back."""
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        await engine.dispose()


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def leased_by(engine: AsyncEngine, owner: str) -> int:
    return int(
        await scalar(engine, "SELECT count(*) FROM recipients WHERE status = 'sending' AND lease_owner = :o", o=owner)
    )


async def until_zero(engine: AsyncEngine, owner: str, *, since: float, timeout: float) -> float:
    """Poll until no recipient is leased to ``owner``; seconds from ``since`` until then."""
    deadline = time.monotonic() + timeout
    while await leased_by(engine, owner) > 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{owner} still holds leases after {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - since


@asynccontextmanager
async def console_client(store: Any, port: int) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client signed in to the console of the Relay at ``port`` as a new viewer."""
    from relay.auth import hash_password

    await store.add_user("viewer-of-nodes", hash_password("pw for nodes"), "viewer")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
        form = await client.get("/ui/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token, form.text
        r = await client.post(
            "/ui/login",
            data={"username": "viewer-of-nodes", "password": "pw for nodes", "login_token": token.group(1), "next": ""},
        )
        assert r.status_code == 303, r.text
        yield client
