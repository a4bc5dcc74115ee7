"""Losing the database under load, the rig: a private PostgreSQL (helpers.pgserver), DNS and a
sink on loopback, a webhook receiver, `relay serve` on them; clients that send without pause and
write down every answer; and the checks every outage test ends with (tests/cluster/test_db_outage*)."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from helpers import ServeProcess, raw_sql, send, serve_config, wait_for
from helpers.peers import Sink, Zone, dns_server, sinks
from helpers.pgserver import PgServer, pg_server
from relay.model import ACTIVE_STATES

TOKEN = "outage-token-0123456789abcdef"
STORE_FAILED = "4.3.0 Temporary failure storing the message, try again later"
OUTAGE = 3.0  # seconds the database stays down: shorter than the lease (10 s)
LOST = "the database cannot be reached"
BACK = "the database is back"


# -- a webhook receiver on loopback: answers 200 to every POST and keeps the payloads


@dataclass
class Hooks:
    payloads: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def delivered(self) -> collections.Counter[str]:
        return collections.Counter(p["data"]["queue_id"] for p in self.payloads if p.get("type") == "message.delivered")


@contextlib.asynccontextmanager
async def hook_receiver() -> AsyncIterator[Hooks]:
    hooks = Hooks()
    open_writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.add(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                fields = (h.partition(":") for h in head.split("\r\n"))
                length = next((int(v) for k, _, v in fields if k.lower() == "content-length"), 0)
                hooks.payloads.append(json.loads(await reader.readexactly(length)))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        open_writers.discard(writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    hooks.port = server.sockets[0].getsockname()[1]
    try:
        yield hooks
    finally:
        server.close()
        for writer in list(open_writers):  # the handlers end on their own, never cancelled
            writer.close()
        await wait_for(lambda: not open_writers, timeout=5)


# -- the rig: private PostgreSQL, DNS, a sink, the receiver, and `relay serve` on them


@dataclass
class Rig:
    pg: PgServer
    sink: Sink
    hooks: Hooks
    server: ServeProcess
    http: httpx.AsyncClient

    @property
    def log(self) -> list[str]:
        return self.server.log

    def alive(self) -> bool:
        assert self.server.proc is not None
        return self.server.proc.returncode is None


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, *, lease: str = "10s", data_delay: float = 0.0, extra: str = "") -> AsyncIterator[Rig]:
    """``extra``: more TOML tables for relay.toml (e.g. ``[cluster]``)."""
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pg_server() as pg, dns_server() as zone:
        zone_: Zone = zone
        zone_.mx("example.com", (10, "mx.example.com"))
        zone_.a("mx.example.com", "127.0.0.2")
        async with sinks("127.0.0.2") as (sink,), hook_receiver() as hooks:
            sink.behaviour.data_delay = data_delay
            cfg = serve_config(
                tmp_path,
                f"""shutdown_grace = "2s"
[http]
listen = "127.0.0.1:0"
api_tokens = ["{TOKEN}"]
[store]
url = "{pg.url()}"
[delivery]
port = {sink.port}
lease = "{lease}"
poll_interval = "200ms"
retry_schedule = ["300ms"]
connect_timeout = "2s"
command_timeout = "5s"
shutdown_grace = "2s"
[dns]
nameservers = ["127.0.0.1:{zone_.port}"]
timeout = "1s"
[[webhooks]]
url = "http://127.0.0.1:{hooks.port}/hooks"
secret = "{secret}"
events = ["message.delivered"]
{extra}""",  # type: ignore[attr-defined]
            )
            server = await ServeProcess(cfg).start()
            base = f"http://127.0.0.1:{server.ports['http']}"
            async with httpx.AsyncClient(base_url=base, timeout=20) as http:
                rig = Rig(pg, sink, hooks, server, http)
                try:
                    yield rig
                finally:
                    # A test may have started another server in the rig (rig.server): stop both.
                    for running in {id(s): s for s in (server, rig.server)}.values():
                        if running.proc is not None and running.proc.returncode is None:
                            running.terminate()
                            with contextlib.suppress(TimeoutError):
                                await running.wait(30)
                            if running.proc.returncode is None:
                                running.kill()
                                await running.wait()


# -- load: clients that send without pause and write down every answer


@dataclass(frozen=True)
class Answer:
    rcpt: str
    code: int | None  # None: no reply at all (a dropped connection, a timeout)
    text: str
    started: float
    ended: float
    api: bool = False  # POST /api/v1/messages, else SMTP
    retry_after: str | None = None  # the API's 503

    @property
    def accepted(self) -> bool:
        return self.code == (201 if self.api else 250)


class Load:
    """``smtp`` clients on persistent sessions and ``api`` clients of POST /api/v1/messages,
    each sending one message to a recipient of its own after another."""

    def __init__(
        self, rig: Rig, *, smtp: int = 4, api: int = 0, pause: float = 0.01, prefix: str = "", port: int | None = None
    ) -> None:
        self.rig = rig
        self.port = rig.server.smtp_port if port is None else port  # the SMTP clients' node
        self.prefix = prefix  # recipients are {prefix}s{client}-{n}@ and {prefix}h{client}-{n}@
        self.answers: list[Answer] = []
        self.pause = pause
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._smtp(i)) for i in range(smtp)]
        self._tasks += [asyncio.create_task(self._api(i)) for i in range(api)]

    def since(self, t: float) -> list[Answer]:
        return [a for a in self.answers if a.started >= t]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _smtp(self, cid: int) -> None:
        n = 0
        port = self.port
        while not self._stop.is_set():
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=20)
            now = time.monotonic()
            try:
                await client.connect()
                await client.ehlo()
            except (aiosmtplib.SMTPException, OSError) as exc:
                self.answers.append(Answer(f"s{cid}-connect", None, repr(exc), now, time.monotonic()))
                await asyncio.sleep(0.1)
                continue
            try:
                while not self._stop.is_set():
                    rcpt = f"{self.prefix}s{cid}-{n}@example.com"
                    n += 1
                    started = time.monotonic()
                    try:
                        code, text = await send(
                            client, "app@example.com", [rcpt], f"Subject: {rcpt}\r\n\r\nhi\r\n".encode()
                        )
                    except aiosmtplib.SMTPException as exc:  # a dropped connection, a timeout
                        self.answers.append(Answer(rcpt, None, repr(exc), started, time.monotonic()))
                        break
                    self.answers.append(Answer(rcpt, code, text, started, time.monotonic()))
                    await asyncio.sleep(self.pause)
            finally:
                client.close()

    async def _api(self, cid: int) -> None:
        n = 0
        headers = {"Authorization": f"Bearer {TOKEN}"}
        while not self._stop.is_set():
            rcpt = f"{self.prefix}h{cid}-{n}@example.com"
            n += 1
            started = time.monotonic()
            body = {"from": "app@example.com", "to": [rcpt], "subject": rcpt, "text": "hi\n"}
            try:
                r = await self.rig.http.post("/api/v1/messages", json=body, headers=headers)
            except httpx.HTTPError as exc:
                self.answers.append(Answer(rcpt, None, repr(exc), started, time.monotonic(), api=True))
                continue
            self.answers.append(
                Answer(rcpt, r.status_code, r.text, started, time.monotonic(), True, r.headers.get("retry-after"))
            )
            await asyncio.sleep(self.pause)


def check_answers(answers: list[Answer]) -> None:
    """Every answer is an acceptance or the temporary refusal: never a 5xx, no reply, or any
    internal text."""
    for a in answers:
        if a.accepted:
            continue
        if a.api:
            assert a.code == 503, a
            assert a.retry_after == "5", a
            assert json.loads(a.text) == {"detail": "the store failed; nothing was queued, try again"}, a
        else:
            assert a.code == 451, a
            assert a.text == STORE_FAILED, a


# -- the end state


def recipients(conn: Connection) -> list[tuple[str, str, str, int]]:
    rows = conn.execute(sa.text("SELECT address, status, queue_id, attempts FROM recipients")).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def delivered_events(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        sa.text("SELECT recipient, count(*) FROM events WHERE type = 'delivered' GROUP BY recipient")
    ).all()
    return {r[0]: r[1] for r in rows}


async def check_nothing_lost(rig: Rig, answers: list[Answer], *, once: bool = True) -> dict[str, int]:
    """Everything a client was told 250/201 for is delivered, every recipient in the store is
    final, and (``once``) each reached the sink and the event log exactly once. Returns figures."""
    accepted = {a.rcpt for a in answers if a.accepted}
    refused = {a.rcpt for a in answers if not a.accepted}
    url = rig.pg.url()

    async def drained() -> bool:
        rows = await raw_sql(url, recipients)
        return all(status not in ACTIVE_STATES for _, status, _, _ in rows) and accepted <= set(rig.sink.rcpts)

    try:
        await wait_for(drained, timeout=60, interval=0.2)
    except AssertionError:
        rows = await raw_sql(url, recipients)
        active = [row for row in rows if row[1] in ACTIVE_STATES]
        missing = sorted(accepted - set(rig.sink.rcpts))
        raise AssertionError(
            f"not drained: active {active[:10]}, missing at the sink {missing[:10]}\n" + "\n".join(rig.log[-40:])
        ) from None
    rows = await raw_sql(url, recipients)
    stored = {address for address, _, _, _ in rows}
    assert accepted <= stored
    assert {status for _, status, _, _ in rows} == {"delivered"}
    # Stored without a 250: a commit the server made but whose answer the connection lost.
    # The client was told 451 and would send it again: SMTP's at-least-once, never a loss.
    in_doubt = stored - accepted
    assert in_doubt <= refused, in_doubt - refused
    arrived = collections.Counter(rig.sink.rcpts)
    twice = {r: n for r, n in arrived.items() if n > 1}
    events = await raw_sql(url, delivered_events)
    queue_ids = {qid for address, _, qid, _ in rows if address in accepted}
    await wait_for(lambda: queue_ids <= set(rig.hooks.delivered()), timeout=30, interval=0.2)
    if once:
        assert not twice, f"delivered more than once: {twice}"
        assert {r: n for r, n in events.items() if n != 1} == {}
        # A webhook sent just as the database went is written once it is back, not sent again.
        assert {q: n for q, n in rig.hooks.delivered().items() if n > 1} == {}
    assert rig.alive(), "\n".join(rig.log[-30:])
    return {
        "accepted": len(accepted),
        "refused": len(refused),
        "stored_after_refusal": len(in_doubt),
        "delivered_twice": len(twice),
        "webhooks_twice": sum(1 for n in rig.hooks.delivered().values() if n > 1),
    }


def check_log(log: list[str], outages: int | None = None) -> None:
    """One warning when the database is lost and one line when it is back, per outage; no
    traceback, no crashed task."""
    text = "\n".join(log)
    assert "Traceback" not in text, text[-4000:]
    assert "crashed" not in text, text[-4000:]
    lost = sum(LOST in line for line in log)
    back = sum(BACK in line for line in log)
    assert lost == back, (lost, back)
    if outages is not None:
        assert lost == outages, [line for line in log if LOST in line or BACK in line]


async def status(http: httpx.AsyncClient, path: str) -> int:
    return (await http.get(path)).status_code


async def reply(reader: asyncio.StreamReader) -> str:
    """The last line of one SMTP reply read from a raw session."""
    while True:
        line = (await asyncio.wait_for(reader.readline(), 20)).decode().rstrip("\r\n")
        if line[3:4] != "-":
            return line
