"""Relay and Postfix side by side, end to end, on this machine.

    python bench/bench.py                 every scenario, Postfix too, the lookup benchmark; writes
                                          bench/results/<time>.json, latest.json, latest.md, latest.png
    python bench/bench.py --smoke         200 messages through Relay only, then 100 "production" ones
                                          (CI keeps the harness working)
    python bench/bench.py --scenario production --no-lookup
                                          only the production scenarios (Postfix too)

Load comes from Postfix's smtp-source (N messages of S bytes over C parallel sessions, a new
connection per message) and lands in Postfix's smtp-sink on 127.0.0.2. Relay finds the sink
through a loopback DNS server that answers MX for the test domain (its real MX path), runs
with SQLite (synchronous=FULL) and logs every attempt. Postfix is the reference peer set up by
../shared/bench/postfix-peer.sh (127.0.0.1:2526 -> 127.0.0.2:2626); the two runs never overlap.
A client of our own measures acceptance latency (end of DATA -> 250) during each load.
Without smtp-source/smtp-sink (smoke mode on a bare machine), Python stand-ins take their place.
Relay runs on its default configuration (``--processes`` only when given here) plus the routing
keys and ``per_domain = 50``, Postfix's destination concurrency.

The "production" scenarios send a 2 KB HTML message with a text part and five links (smtp-source
-F, the same file through Postfix) into Relay with DKIM signing (RSA 2048), VERP return paths,
open and click tracking and one webhook endpoint (a receiver in this process, every event type):
the run waits until the webhook of every delivered message has arrived and reports the lag
(arrival - the event's own timestamp). Before the timed load, 20 messages go to a Python sink on
127.0.0.3 that keeps them, and the bench checks their DKIM signature (verified), return path,
X-Relay-Ref, rewritten links and open pixel; a failed check is named in the result's ``extra``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"
PEER_SCRIPT = ROOT.parent / "shared" / "bench" / "postfix-peer.sh"
POSTFIX_PORT = 2526
POSTFIX_SINK = ("127.0.0.2", 2626)
POSTGRES_ADMIN = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
PROD_DATABASE = "relay_bench_prod"
# production: DKIM signs mail From: this domain; VERP return paths in BOUNCE_DOMAIN; links point at TRACK_URL
SIGN_DOMAIN = "bench.test"
SELECTOR = "bench"
BOUNCE_DOMAIN = "bounces.bench.test"
TRACK_URL = "https://t.bench.test"
LINKS = 5
DOMAIN = "dest.test"
VERIFY_DOMAIN = "verify.test"  # MX -> 127.0.0.3, a sink that keeps what it gets (the production checks)
CLK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(ROOT))


@dataclass
class Scenario:
    name: str
    messages: int
    sessions: int
    size: int
    backlog: int = 0
    production: bool = False  # the HTML message, DKIM, VERP, tracking, a webhook endpoint
    postgres: bool = False  # [store] url: a fresh PostgreSQL database


SCENARIOS = [
    Scenario("2KB x 20 sessions", 5000, 20, 2000),
    Scenario("2KB x 50 sessions", 5000, 50, 2000),
    Scenario("20KB x 20 sessions", 5000, 20, 20000),
    Scenario("20KB x 50 sessions", 5000, 50, 20000),
    Scenario("2KB x 20 sessions, 100k deferred in store", 5000, 20, 2000, backlog=100_000),
    Scenario("production, SQLite", 5000, 20, 2000, production=True),
    Scenario("production, PostgreSQL", 5000, 20, 2000, production=True, postgres=True),
]
SMOKE = [
    Scenario("smoke 2KB x 10 sessions", 200, 10, 2000),
    Scenario("smoke production, SQLite", 100, 10, 2000, production=True),
]


@dataclass
class Run:
    accepted_per_s: float
    e2e_per_s: float
    accept_seconds: float
    e2e_seconds: float
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    probes: int
    delivered: int = 0  # into the sink, probes included
    cpu_s_per_1000: float | None = None
    peak_rss_mb_total: float | None = None
    peak_rss_mb_max_process: float | None = None
    processes: int | None = None  # Relay's processes seen (with workers: the parent too)
    webhook_lag_ms_p50: float | None = None
    webhook_lag_ms_p99: float | None = None
    webhooks: int | None = None  # webhook requests received during the run
    postgres_cpu_s_per_1000: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- loopback DNS: MX dest.test -> mx.dest.test -> 127.0.0.2 (verify.test: 127.0.0.3)


def start_dns() -> tuple[int, Any]:
    from dnslib import MX, QTYPE, RCODE, RR, A
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    hosts = {DOMAIN: "127.0.0.2", VERIFY_DOMAIN: "127.0.0.3"}

    class Static(BaseResolver):  # type: ignore[misc]
        def resolve(self, request: Any, handler: Any) -> Any:
            reply = request.reply()
            name, qtype = str(request.q.qname).lower().rstrip("."), QTYPE[request.q.qtype]
            if name in hosts:
                if qtype == "MX":
                    reply.add_answer(RR(f"{name}.", QTYPE.MX, rdata=MX(f"mx.{name}.", 10), ttl=300))
            elif name.startswith("mx.") and name[3:] in hosts:
                if qtype == "A":
                    reply.add_answer(RR(f"{name}.", QTYPE.A, rdata=A(hosts[name[3:]]), ttl=300))
            else:
                reply.header.rcode = RCODE.NXDOMAIN
            return reply

    server = DNSServer(
        Static(), address="127.0.0.1", port=0, logger=DNSLogger("-request,-reply,-truncated,-recv,-send")
    )
    server.start_thread()
    return server.server.server_address[1], server


# -- sinks


class ToolSink:
    """Postfix's smtp-sink; counts from its -c output."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.out = tempfile.NamedTemporaryFile(prefix="sink-", delete=False)  # noqa: SIM115
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            tool("smtp-sink"), "-c", "-u", "root", f"{self.host}:{self.port}", "1000", stdout=self.out, stderr=self.out
        )
        await wait_port(self.host, self.port)

    def count(self) -> int:
        data = Path(self.out.name).read_bytes()[-400:].replace(b"\r", b"\n")
        found = re.findall(rb"mesg=(\d+)", data)
        return int(found[-1]) if found else 0

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        os.unlink(self.out.name)


class PySink:
    """A minimal counting SMTP sink (stand-in when smtp-sink is not installed); with ``keep``,
    it keeps each message as (MAIL FROM address, message bytes)."""

    def __init__(self, host: str, port: int, keep: bool = False) -> None:
        self.host, self.port, self.n, self.keep = host, port, 0, keep
        self.kept: list[tuple[str, bytes]] = []
        self.server: asyncio.Server | None = None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        mail_from = ""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"MAIL":
                    mail_from = line.decode(errors="replace").split(":", 1)[1].split(">", 1)[0].strip(" <")
                if verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    if self.keep:
                        self.kept.append((mail_from, data[:-3].replace(b"\r\n..", b"\r\n.")))
                    self.n += 1
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"EHLO":
                    writer.write(b"250-sink\r\n250 PIPELINING\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, self.host, self.port, limit=1 << 24)

    def count(self) -> int:
        return self.n

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise FileNotFoundError(name)
    return path


def have_tools() -> bool:
    try:
        tool("smtp-source")
        tool("smtp-sink")
    except FileNotFoundError:
        return False
    return True


async def wait_port(host: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# -- load


async def smtp_source(host: str, port: int, sc: Scenario, message_file: Path | None = None) -> None:
    """``message_file``: send that message (headers and body, LF line ends) instead of S bytes of filler."""
    body = ["-F", str(message_file)] if message_file is not None else ["-l", str(sc.size)]
    proc = await asyncio.create_subprocess_exec(
        tool("smtp-source"), "-s", str(sc.sessions), "-m", str(sc.messages), *body,
        "-f", f"a@{SIGN_DOMAIN}", "-t", f"b@{DOMAIN}", f"{host}:{port}",
    )  # fmt: skip
    if await proc.wait() != 0:
        raise RuntimeError("smtp-source failed")


def _payload(size: int, n: int) -> bytes:
    head = f"From: <a@bench.test>\r\nTo: <b@{DOMAIN}>\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * max(1, size // len(line))


def production_message() -> bytes:
    """About 2 KB, CRLF: multipart/alternative, a text part and an HTML part with LINKS links,
    From: an address that DKIM signs; no Message-ID (Relay adds one, every message its own)."""
    urls = [f"https://shop.example.com/orders/1234/item/{i}?utm_source=mail" for i in range(1, LINKS + 1)]
    text = "Thank you for your order #1234. Here is what you bought:\r\n\r\n" + "".join(
        f"- item {i}: {u}\r\n" for i, u in enumerate(urls, 1)
    )
    rows = "".join(
        f'<tr><td>Item {i}</td><td><a href="{u}">see item {i}</a></td></tr>\r\n' for i, u in enumerate(urls, 1)
    )
    html = (
        '<!DOCTYPE html>\r\n<html><head><meta charset="utf-8"><title>Your order</title></head>\r\n'
        '<body style="font-family: sans-serif">\r\n<p>Thank you for your order #1234.</p>\r\n'
        f"<table>\r\n{rows}</table>\r\n"
    )
    head = (
        f"From: Bench Shop <shop@{SIGN_DOMAIN}>\r\nTo: <b@{DOMAIN}>\r\nSubject: Your order #1234\r\n"
        "Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1234"\r\n\r\n'
    )
    tail = "<p>Questions? Reply to this message.</p>\r\n</body></html>\r\n"
    filler = f"<p>{'Lorem ipsum dolor sit amet. ' * 2}</p>\r\n"
    message = b""
    for n in range(100):  # fill the HTML part until the message is about 2 KB
        message = (
            f"{head}--b1234\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
            f"--b1234\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}{filler * n}{tail}\r\n--b1234--\r\n"
        ).encode()
        if len(message) >= 1970:
            break
    return message


def message_file(body: bytes) -> Path:
    """The message for smtp-source -F (LF line ends: it sends each line with CRLF)."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "production.eml"
    path.write_bytes(body.replace(b"\r\n", b"\n"))
    return path


async def one_message(
    host: str, port: int, body: bytes, rcpt: str = f"b@{DOMAIN}", sender: str = "probe@bench.test"
) -> float:
    """One message on a new connection, as smtp-source sends them, the body in 64 KB pieces;
    returns end-of-DATA -> 250 seconds."""
    reader, writer = await asyncio.open_connection(host, port)
    try:

        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("closed")
                if line[3:4] != b"-":
                    return line

        await reply()
        for cmd in (b"EHLO probe.bench.test", f"MAIL FROM:<{sender}>".encode(), f"RCPT TO:<{rcpt}>".encode(), b"DATA"):
            writer.write(cmd + b"\r\n")
            line = await reply()
            if line[:1] not in (b"2", b"3"):
                raise RuntimeError(f"{cmd!r}: {line!r}")
        view = memoryview(body)
        for start in range(0, len(view), 1 << 16):
            writer.write(view[start : start + (1 << 16)])
            await writer.drain()
        writer.write(b".\r\n")
        t0 = time.perf_counter()
        line = await reply()
        took = time.perf_counter() - t0
        if not line.startswith(b"250"):
            raise RuntimeError(f"DATA: {line!r}")
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return took
    finally:
        writer.close()


async def py_source(host: str, port: int, sc: Scenario, message: bytes | None = None) -> None:
    queue = iter(range(sc.messages))
    body = message if message is not None else _payload(sc.size, 0)

    async def session() -> None:
        for _ in queue:
            await one_message(host, port, body)

    await asyncio.gather(*(session() for _ in range(sc.sessions)))


class Probe:
    """Acceptance latency from a client of our own, one message at a time during the load."""

    def __init__(self, host: str, port: int, size: int, message: bytes | None = None) -> None:
        self.host, self.port = host, port
        self.body = message if message is not None else _payload(size, 0)
        self.samples: list[float] = []
        self.sent = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            with contextlib.suppress(OSError, RuntimeError, ConnectionError):
                self.samples.append(await one_message(self.host, self.port, self.body))
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def percentiles(self) -> tuple[float | None, float | None]:
        if len(self.samples) < 2:
            return None, None
        ordered = sorted(self.samples)
        p = statistics.quantiles(ordered, n=100, method="inclusive")
        return round(p[49] * 1000, 2), round(p[98] * 1000, 2)


async def wait_delivered(sink: Any, expected: int, timeout: float = 600) -> None:
    """Until the sink holds ``expected`` messages in all (or ``timeout`` seconds passed)."""
    deadline = time.monotonic() + timeout
    while sink.count() < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def drive(host: str, port: int, sink: Any, sc: Scenario, use_tools: bool, message: bytes | None = None) -> Run:
    """``message``: every message is this one (smtp-source sends it from a file), the probe's too."""
    probe = Probe(host, port, sc.size, message)
    before = sink.count()
    t0 = time.perf_counter()
    probe.start()
    if use_tools:
        await smtp_source(host, port, sc, None if message is None else message_file(message))
    else:
        await py_source(host, port, sc, message)
    t1 = time.perf_counter()
    await probe.stop()
    await wait_delivered(sink, before + sc.messages + len(probe.samples))
    t2 = time.perf_counter()
    got = sink.count() - before
    p50, p99 = probe.percentiles()
    run = Run(
        accepted_per_s=round(sc.messages / (t1 - t0), 1),
        e2e_per_s=round(got / (t2 - t0), 1),
        accept_seconds=round(t1 - t0, 3),
        e2e_seconds=round(t2 - t0, 3),
        latency_ms_p50=p50,
        latency_ms_p99=p99,
        probes=len(probe.samples),
        delivered=got,
    )
    if got < sc.messages:
        run.extra["incomplete"] = f"sink saw {got} of {sc.messages + len(probe.samples)}"
    return run


# -- the webhook endpoint


class WebhookReceiver:
    """One webhook endpoint on loopback, in the benchmark's event loop: answers 200 at once and
    keeps each request's arrival time and body (read after the run, so that the answer is quick)."""

    def __init__(self) -> None:
        self.got: list[tuple[float, bytes]] = []  # (arrival, epoch seconds; body)
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hooks/relay"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
                self.got.append((time.time(), body))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    def events(self, start: int = 0) -> list[tuple[float, dict[str, Any]]]:
        """(arrival, parsed body) of the requests from index ``start`` on."""
        return [(t, json.loads(body)) for t, body in self.got[start:]]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def _event_time(doc: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()


def delivered_ids(events: list[tuple[float, dict[str, Any]]], skip_sender: str) -> set[str]:
    return {
        d["data"]["queue_id"]
        for _, d in events
        if d["type"] == "message.delivered" and d["data"].get("mail_from") != skip_sender
    }


def webhook_figures(events: list[tuple[float, dict[str, Any]]], skip_sender: str) -> dict[str, Any]:
    """Lag (arrival - the event's timestamp) per type and in all, how many arrived, repeats,
    and delivered events that name no DKIM signature."""
    lags: dict[str, list[float]] = {}
    seen: set[tuple[str, str | None, str]] = set()
    repeats = unsigned = 0
    for arrival, doc in events:
        data = doc.get("data") or {}
        if data.get("mail_from") == skip_sender:
            continue
        key = (data.get("queue_id", ""), data.get("recipient"), doc["type"])
        repeats += key in seen
        seen.add(key)
        lags.setdefault(doc["type"], []).append(arrival - _event_time(doc))
        if doc["type"] == "message.delivered" and not data.get("dkim"):
            unsigned += 1
    every = [x for v in lags.values() for x in v]

    def pct(values: list[float]) -> tuple[float | None, float | None]:
        if len(values) < 2:
            return (round(values[0] * 1000, 1), round(values[0] * 1000, 1)) if values else (None, None)
        q = statistics.quantiles(sorted(values), n=100, method="inclusive")
        return round(q[49] * 1000, 1), round(q[98] * 1000, 1)

    return {
        "received": len(every),
        "lag_ms": pct(every),
        "by_type": {t: {"count": len(v), "lag_ms_p50_p99": pct(v)} for t, v in sorted(lags.items())},
        "repeats": repeats,
        "delivered_without_dkim": unsigned,
    }


# -- PostgreSQL: a fresh database per run, and its server's CPU


async def pg_admin(admin: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fresh_database(admin: str, name: str) -> str:
    await pg_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await pg_admin(admin, f'CREATE DATABASE "{name}"')
    return admin.rsplit("/", 1)[0] + f"/{name}"


async def drop_database(admin: str, name: str) -> None:
    await pg_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PostgresCpu:
    """CPU seconds of the PostgreSQL backends serving one database (their process title names
    it), sampled every 0.2 s so that connections opened and closed during the run count too.
    Shared server processes (WAL writer, checkpointer) are left out: other databases use them."""

    def __init__(self, database: str) -> None:
        self.tag = f" {database} ".encode()
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _backends(self) -> dict[int, float]:
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() == "postgres" and self.tag in (
                        entry / "cmdline"
                    ).read_bytes():
                        found[int(entry.name)] = cpu_seconds([int(entry.name)])
        return found

    def start(self) -> None:
        self.base = self._backends()
        self.last = dict(self.base)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.last.update(self._backends())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)

    def so_far(self) -> float:
        self.last.update(self._backends())
        return sum(cpu - self.base.get(pid, 0.0) for pid, cpu in self.last.items())

    async def stop(self) -> float:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.so_far()


# -- Relay


def proc_tree(pid: int) -> list[int]:
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
    return total


def peak_rss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            if m:
                out.append(int(m.group(1)) / 1024)
    return out


def relay_config(data_dir: Path, port: int, sink_port: int, dns_port: int) -> str:
    """Relay's defaults but for where to listen and deliver, and per_domain = 50, Postfix's
    destination concurrency (Relay's default is 10; its default concurrency, 100, is above 50)."""
    return f"""
[server]
hostname = "relay.bench.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
[http]
listen = "127.0.0.1:0"
[delivery]
port = {sink_port}
per_domain = 50
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
"""


def production_config(key_file: Path, webhook_url: str, store_url: str | None) -> str:
    """What the production scenarios add: DKIM, VERP, tracking, one webhook endpoint for every type."""
    from relay.webhooks import new_secret

    store = f'[store]\nurl = "{store_url}"\n' if store_url else ""
    return f"""{store}[bounces]
domain = "{BOUNCE_DOMAIN}"
[tracking]
base_url = "{TRACK_URL}"
secret = "bench-tracking-secret-0123456789abcdef"
[[dkim]]
domain = "{SIGN_DOMAIN}"
selector = "{SELECTOR}"
key_file = "{key_file}"
algorithm = "rsa-sha256"
[[webhooks]]
url = "{webhook_url}"
events = []
secret = "{new_secret()}"
"""


def dkim_key() -> tuple[Path, str]:
    """The benchmark's RSA 2048 key, made once into bench/work/dkim/, and its DNS TXT value."""
    from relay.config import DkimConfig
    from relay.dkim import generate, load_key

    path = WORK / "dkim" / f"{SIGN_DOMAIN}.{SELECTOR}.pem"
    if not path.exists():
        generate(WORK, SIGN_DOMAIN, SELECTOR)
    key = load_key(DkimConfig(domain=SIGN_DOMAIN, selector=SELECTOR, key_file=str(path)))
    return path, key.txt_value()


CHECK_SENDER = f"check@{SIGN_DOMAIN}"  # the verification pass's envelope sender (left out of the figures)


def check_message(mail_from: str, raw: bytes, txt: str) -> list[str]:
    """What is wrong with one delivered production message (nothing: an empty list)."""
    import email
    from email import policy

    import dkim as dkimpy

    problems = []
    if not re.fullmatch(rf"b\+[^@]+@{re.escape(BOUNCE_DOMAIN)}", mail_from):
        problems.append(f"return path {mail_from!r} is not VERP (b+...@{BOUNCE_DOMAIN})")
    head = raw.split(b"\r\n\r\n", 1)[0]
    if not re.search(rb"(?im)^X-Relay-Ref: ", head):
        problems.append("no X-Relay-Ref header")
    if not re.search(rb"(?im)^DKIM-Signature: ", head):
        problems.append("no DKIM-Signature header")
    elif not dkimpy.verify(raw, dnsfunc=lambda name, timeout=5: txt.encode()):
        problems.append("DKIM signature does not verify")
    msg = email.message_from_bytes(raw, policy=policy.default)
    parts = {p.get_content_type(): p.get_content() for p in msg.walk() if not p.is_multipart()}
    html, text = parts.get("text/html", ""), parts.get("text/plain", "")
    clicks = len(re.findall(rf'href="{re.escape(TRACK_URL)}/t/c/[^"]+"', html))
    if clicks != LINKS:
        problems.append(f"{clicks} of {LINKS} links rewritten")
    if "shop.example.com" in html:
        problems.append("an original URL is left in the HTML part")
    if f"{TRACK_URL}/t/o/" not in html:
        problems.append("no open pixel")
    if text.count("https://shop.example.com/") != LINKS:
        problems.append("the text part was changed")
    return problems


async def verify_pass(port: int, sink: PySink, message: bytes, txt: str, n: int = 20) -> dict[str, Any]:
    """``n`` production messages to verify.test (the keeping sink); what came out, checked."""
    for _ in range(n):
        await one_message("127.0.0.1", port, message, rcpt=f"v@{VERIFY_DOMAIN}", sender=CHECK_SENDER)
    await wait_delivered(sink, n, timeout=60)
    problems: dict[str, int] = {}
    for mail_from, raw in sink.kept:
        for problem in check_message(mail_from, raw, txt):
            problems[problem] = problems.get(problem, 0) + 1
    return {"sent": n, "checked": len(sink.kept), "problems": problems}


def log_findings(text: str) -> dict[str, Any]:
    """Counts of what a production run's Relay log should not have, with the first few lines."""
    found: dict[str, Any] = {}
    for name, pattern in [
        ("deferred", r"status=deferred"),
        ("bounced", r"status=bounced"),
        ("unsigned", r"not signed with DKIM"),
        ("warnings", r" (?:WARNING|ERROR|CRITICAL) "),
        ("tracebacks", r"Traceback"),
    ]:
        lines = [line for line in text.splitlines() if re.search(pattern, line)]
        if lines:
            found[name] = {"count": len(lines), "first": [line[:300] for line in lines[:3]]}
    return found


async def seed_backlog(url: str, count: int) -> None:
    """Deferred recipients already in the store, due tomorrow, with their bodies."""
    from ulid import ULID

    from relay.logstore import LogStore
    from relay.model import EventView, Imported, NewMessage

    store = await LogStore.open(url)
    await store.upgrade()
    now = time.time()
    body = _payload(2000, 0)
    try:
        for start in range(0, count, 5000):
            batch = []
            for i in range(start, min(start + 5000, count)):
                qid = str(ULID())
                rcpt = f"backlog{i}@slow.example"
                msg = NewMessage(qid, f"{qid}@bench", "a@bench.test", (rcpt,), "backlog", ("backlog",), None,
                                 "127.0.0.1", now - 600, body)  # fmt: skip
                evs = (EventView(now - 600, "received", None, {}),
                       EventView(now - 300, "deferred", rcpt, {"attempt": 1, "code": 451}))  # fmt: skip
                batch.append(Imported(msg, "deferred", 1, now + 86400, "451 4.3.0 try later", evs))
            await store.bulk_import(batch)
    finally:
        await store.close()


def _sink_port() -> int:
    """A port free on 127.0.0.2 (the sink) and on 127.0.0.3 (the production checks' sink):
    Relay delivers to one port, whichever MX it found."""
    while True:
        port = free_port("127.0.0.2")
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.3", port))
            return port


async def run_relay(
    sc: Scenario, dns_port: int, use_tools: bool, processes: int | None, postgres: str = POSTGRES_ADMIN
) -> Run:
    """``processes`` None: Relay's own default. ``postgres``: an admin URL, for sc.postgres."""
    work = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=WORK))
    port, sink_port = free_port("127.0.0.1"), _sink_port()
    sink = ToolSink("127.0.0.2", sink_port) if use_tools else PySink("127.0.0.2", sink_port)
    await sink.start()
    checks = PySink("127.0.0.3", sink_port, keep=True)
    hooks = WebhookReceiver()
    message: bytes | None = None
    txt = ""
    store_url: str | None = None
    config = relay_config(work / "data", port, sink_port, dns_port)
    if sc.production:
        message = production_message()
        key_file, txt = dkim_key()
        await checks.start()
        await hooks.start()
        if sc.postgres:
            store_url = await fresh_database(postgres, PROD_DATABASE)
        config += production_config(key_file, hooks.url, store_url)
    cfg = work / "relay.toml"
    cfg.write_text(config)
    if sc.backlog:
        t = time.perf_counter()
        await seed_backlog(f"sqlite+aiosqlite:///{work / 'data' / 'relay.db'}", sc.backlog)
        print(f"  seeded {sc.backlog} deferred recipients in {time.perf_counter() - t:.1f}s", flush=True)
    log = (work / "serve.log").open("wb")
    more = [] if processes is None else ["--processes", str(processes)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(cfg), *more, stdout=log, stderr=log, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"relay ready" not in (work / "serve.log").read_bytes():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("relay did not start:\n" + (work / "serve.log").read_text()[-2000:])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        pids = proc_tree(proc.pid)
        verified: dict[str, Any] | None = None
        if message is not None:
            verified = await verify_pass(port, checks, message, txt)
            await wait_webhooks(hooks, verified["checked"], 0, include_sender=CHECK_SENDER, timeout=60)
        hooks_from = len(hooks.got)
        pg = PostgresCpu(PROD_DATABASE) if store_url else None
        if pg is not None:
            pg.start()
        cpu0 = cpu_seconds(pids)
        run = await drive("127.0.0.1", port, sink, sc, use_tools, message)
        total = sc.messages + run.probes
        if message is not None:
            # CPU until the sink had everything, beside the figure with the webhooks' tail
            run.extra["cpu_s_per_1000_until_delivered"] = round((cpu_seconds(pids) - cpu0) / total * 1000, 3)
            if pg is not None:
                run.extra["postgres_cpu_s_per_1000_until_delivered"] = round(pg.so_far() / total * 1000, 3)
            t = time.perf_counter()
            arrived = await wait_webhooks(hooks, run.delivered, hooks_from, timeout=WEBHOOK_WAIT)
            run.extra["webhooks_wait_s"] = round(time.perf_counter() - t, 2)
            if arrived < run.delivered:
                run.extra["WEBHOOKS MISSING"] = (
                    f"message.delivered for {arrived} of {run.delivered} delivered messages after "
                    f"{run.extra['webhooks_wait_s']} s"
                )
                print(f"  !!! {run.extra['WEBHOOKS MISSING']}", flush=True)
        cpu = cpu_seconds(pids) - cpu0
        if pg is not None:
            run.postgres_cpu_s_per_1000 = round(await pg.stop() / total * 1000, 3)
        rss = peak_rss_mb(pids)
        run.cpu_s_per_1000 = round(cpu / total * 1000, 3)
        run.peak_rss_mb_total = round(sum(rss), 1)
        run.peak_rss_mb_max_process = round(max(rss), 1)
        run.processes = len(pids)
        text = (work / "serve.log").read_text(errors="replace")
        failures = text.count("status=deferred")
        if failures:
            run.extra["deferred_attempts"] = failures
        if message is not None:
            _production_results(run, verified, webhook_figures(hooks.events(hooks_from), CHECK_SENDER), text)
            shutil.copy(work / "serve.log", WORK / f"serve-{re.sub(r'[^a-z0-9]+', '-', sc.name.lower())}.log")
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
        await sink.stop()
        await checks.stop()
        await hooks.stop()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
        if store_url:
            await drop_database(postgres, PROD_DATABASE)
    return run


WEBHOOK_WAIT = 300.0  # seconds at most for the webhooks after the last delivery
WEBHOOK_STALL = 30.0  # ... and at most this long without a new one


async def wait_webhooks(
    hooks: WebhookReceiver, expected: int, start: int, include_sender: str | None = None, timeout: float = 60
) -> int:
    """Until message.delivered webhooks for ``expected`` messages arrived (requests from index
    ``start`` on; only those of ``include_sender`` when given, else all but CHECK_SENDER's), or
    ``timeout`` passed, or WEBHOOK_STALL seconds brought none."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    read, last = start, time.monotonic()
    while True:
        for _, doc in hooks.events(read):
            sender = doc.get("data", {}).get("mail_from")
            wanted = sender == include_sender if include_sender else sender != CHECK_SENDER
            if doc["type"] == "message.delivered" and wanted:
                seen.add(doc["data"]["queue_id"])
        if len(hooks.got) > read:
            read, last = len(hooks.got), time.monotonic()
        now = time.monotonic()
        if len(seen) >= expected or now > deadline or now - last > WEBHOOK_STALL:
            return len(seen)
        await asyncio.sleep(0.05)


def _production_results(run: Run, verified: dict[str, Any] | None, hooks: dict[str, Any], log_text: str) -> None:
    """The webhook figures and the checks into ``run``; a failed check under a name in capitals."""
    run.webhooks = hooks["received"]
    run.webhook_lag_ms_p50, run.webhook_lag_ms_p99 = hooks["lag_ms"]
    run.extra["webhooks"] = hooks
    run.extra["checks"] = verified
    failed = []
    if verified is not None:
        if verified["checked"] < verified["sent"]:
            failed.append(f"checks' sink got {verified['checked']} of {verified['sent']}")
        failed += [f"{problem} ({n} of {verified['checked']})" for problem, n in verified["problems"].items()]
    if hooks["delivered_without_dkim"]:
        failed.append(f"{hooks['delivered_without_dkim']} message.delivered events name no DKIM signature")
    findings = log_findings(log_text)
    if findings:
        run.extra["relay_log"] = findings
    if "unsigned" in findings:
        failed.append(f"Relay logged 'not signed with DKIM' {findings['unsigned']['count']} times")
    if failed:
        run.extra["CHECKS FAILED"] = failed
        print("  !!! PRODUCTION CHECKS FAILED: " + "; ".join(failed), flush=True)
    elif verified is not None:
        print(f"  checks: {verified['checked']} messages signed (DKIM verifies), VERP return path, X-Relay-Ref, "
              f"{LINKS} links rewritten, open pixel; every message.delivered webhook names the DKIM key", flush=True)  # fmt: skip


# -- Postfix


def postfix(action: str) -> None:
    if not PEER_SCRIPT.exists():
        raise FileNotFoundError(f"{PEER_SCRIPT} (the Postfix reference peer)")
    import subprocess

    subprocess.run(["bash", str(PEER_SCRIPT), action], check=True)


async def run_postfix(sc: Scenario) -> Run:
    """The same load; in the production scenarios, the same message (Postfix neither signs,
    rewrites nor calls webhooks: the reference is plain relaying)."""
    with socket.socket() as probe:  # a sink left behind (SO_REUSEPORT) would take half the mail unseen
        try:
            probe.bind(POSTFIX_SINK)
        except OSError as exc:
            raise RuntimeError(f"{POSTFIX_SINK[0]}:{POSTFIX_SINK[1]} is taken (a stale smtp-sink?): {exc}") from exc
    sink = ToolSink(*POSTFIX_SINK)
    await sink.start()
    try:
        return await drive("127.0.0.1", POSTFIX_PORT, sink, sc, True, production_message() if sc.production else None)
    finally:
        await sink.stop()


# -- lookups at a million messages


async def lookup_bench(total: int) -> dict[str, Any]:
    """Lookups, stats and searches at a million messages, on one store: bench/search.py seeds it
    (30 days, with bounces and their reasons, deferrals, complaints, opens and clicks) and a
    second run reuses it."""
    import search  # bench/search.py

    from relay.logstore import LogStore

    WORK.mkdir(parents=True, exist_ok=True)
    db = WORK / f"search-{total}.db"
    url = f"sqlite+aiosqlite:///{db}"
    store = await LogStore.open(url)
    await store.upgrade()
    day = 86400.0
    have = (await store.queue_summary()).counts
    seeded = sum(have.values())
    with contextlib.closing(sqlite3.connect(db)) as conn:  # a reused store ends where its seed ended
        newest = conn.execute("SELECT max(received_at) FROM messages").fetchone()[0]
    t_end = float(newest) if newest is not None else time.time()
    seed_seconds = None
    if seeded < total:
        t = time.perf_counter()
        await store.close()
        await search.seed(url, total, seeded, t_end)
        store = await LogStore.open(url)
        seed_seconds = round(time.perf_counter() - t, 1)
    with contextlib.closing(sqlite3.connect(db)) as conn:  # sample Message-IDs from outside the store
        ids = [r[0] for r in conn.execute("SELECT message_id FROM messages ORDER BY random() LIMIT 2000")]
    samples = []
    for mid in ids:
        t = time.perf_counter()
        found = await store.lookup(mid)
        samples.append(time.perf_counter() - t)
        assert found, mid
    ordered = sorted(samples)
    stats_times = []
    for group_by in ("tag", "domain", "user"):
        since = t_end - 10 * day
        t = time.perf_counter()
        rows = await store.stats(since, since + day, group_by)
        stats_times.append((group_by, round(time.perf_counter() - t, 3), sum(r.received for r in rows)))
    await store.close()
    searches = await search.run(total, 3)
    return {
        "messages": total,
        "seed_seconds": seed_seconds,
        "search": searches,
        "message_id_lookup_ms_p50": round(ordered[len(ordered) // 2] * 1000, 3),
        "message_id_lookup_ms_p99": round(ordered[int(len(ordered) * 0.99)] * 1000, 3),
        "one_day_stats_seconds": {g: s for g, s, _ in stats_times},
        "one_day_stats_messages": stats_times[0][2],
    }


# -- report


def _pair(a: Any, b: Any) -> str:
    return "-" if a is None and b is None else f"{a} / {b}"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | Relay accepted/s | Relay e2e/s | Postfix accepted/s | Postfix e2e/s | e2e Relay/Postfix "
        "| Relay p50 / p99 ms | Postfix p50 / p99 ms | Relay peak RSS MB (total / largest process) | Relay CPU s per 1000 "
        "| PostgreSQL CPU s per 1000 | webhook lag p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        r, p = s["relay"], s.get("postfix") or {}
        ratio = f"{s['ratio_e2e']:.2f}x" if s.get("ratio_e2e") else "-"
        flags = [f for f in ("incomplete", "CHECKS FAILED", "WEBHOOKS MISSING") if f in r["extra"]]
        name = s["name"] + (f" ({', '.join(flags)})" if flags else "")
        pg = "-" if r.get("postgres_cpu_s_per_1000") is None else str(r["postgres_cpu_s_per_1000"])
        if "postgres_cpu_s_per_1000_until_delivered" in r["extra"]:
            pg += f" ({r['extra']['postgres_cpu_s_per_1000_until_delivered']} until delivered)"
        cpu = str(r["cpu_s_per_1000"])
        if "cpu_s_per_1000_until_delivered" in r["extra"]:
            cpu += f" ({r['extra']['cpu_s_per_1000_until_delivered']} until delivered)"
        lines.append(
            f"| {name} | {r['accepted_per_s']:.0f} | {r['e2e_per_s']:.0f} | {p.get('accepted_per_s', '-')} "
            f"| {p.get('e2e_per_s', '-')} | {ratio} | {r['latency_ms_p50']} / {r['latency_ms_p99']} "
            f"| {p.get('latency_ms_p50', '-')} / {p.get('latency_ms_p99', '-')} "
            f"| {r['peak_rss_mb_total']} / {r['peak_rss_mb_max_process']} | {cpu} "
            f"| {pg} | {_pair(r.get('webhook_lag_ms_p50'), r.get('webhook_lag_ms_p99'))} |"
        )
    seen = sorted({s["relay"].get("processes") for s in results["scenarios"]} - {None})
    lines += [
        "",
        f"Relay: {'`--processes ' + str(results['processes']) + '`' if results.get('processes') else 'its default processes'}"
        f" ({', '.join(map(str, seen))} Relay processes seen, a `--processes` parent included)."
        " Production: the 2 KB HTML message (text part, 5 links) signed with DKIM (RSA 2048), VERP return paths,"
        " open and click tracking, one webhook endpoint for every event type (lag: arrival - the event's timestamp);"
        " its CPU counts until the last webhook arrived.",
        "",
    ]
    for s in results["scenarios"]:
        r = s["relay"]
        extra = r["extra"]
        if "webhooks" in extra:
            w = extra["webhooks"]
            got = w["by_type"].get("message.delivered", {}).get("count", 0)
            lines.append(
                f"- {s['name']}: {w['received']:,} webhooks received, message.delivered for {got:,} of "
                f"{r['delivered']:,} delivered messages, the last one {extra['webhooks_wait_s']} s after the sink had every message"
                + (f"; **{extra['WEBHOOKS MISSING']}**" if "WEBHOOKS MISSING" in extra else "")
            )
        if "CHECKS FAILED" in extra:
            lines.append(f"- **{s['name']}: CHECKS FAILED:** " + "; ".join(extra["CHECKS FAILED"]))
        elif extra.get("checks"):
            lines.append(
                f"- {s['name']}: checked {extra['checks']['checked']} messages: DKIM signature verifies, VERP return"
                " path and X-Relay-Ref, links and open pixel rewritten; every message.delivered names the DKIM key."
            )
    lines += ["", targets_text(targets(results))]
    lk = results.get("lookup")
    if lk:
        lines += [
            "",
            f"Lookups at {lk['messages']:,} messages: Message-ID lookup p50 {lk['message_id_lookup_ms_p50']} ms, "
            f"p99 {lk['message_id_lookup_ms_p99']} ms; one-day stats query "
            + ", ".join(f"by {g} {s} s" for g, s in lk["one_day_stats_seconds"].items())
            + f" ({lk['one_day_stats_messages']:,} messages in the day).",
        ]
        if lk.get("search"):
            import search  # bench/search.py

            lines += ["", search.table(lk["messages"], lk["search"], 3)]
    return "\n".join(lines)


ORIGINAL = [s.name for s in SCENARIOS if not s.production]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets against this run: each with ``verdict`` PASS, SHORT or "not run"."""
    by_name = {s["name"]: s for s in results["scenarios"]}
    out: list[dict[str, Any]] = []

    def check(what: str, name: str, value: Any, ok: bool | None, shown: str) -> None:
        verdict = "not run" if value is None else ("PASS" if ok else "SHORT")
        out.append({"target": what, "scenario": name, "value": value, "shown": "-" if value is None else shown,
                    "verdict": verdict})  # fmt: skip

    for name, floor in [(n, 1.3) for n in ORIGINAL] + [("production, SQLite", 1.0), ("production, PostgreSQL", 1.0)]:
        ratio = by_name.get(name, {}).get("ratio_e2e")
        check(f"e2e >= {floor}x Postfix", name, ratio, ratio is not None and ratio >= floor,
              "-" if ratio is None else f"{ratio:.2f}x")  # fmt: skip
    for name in ("2KB x 50 sessions", "20KB x 50 sessions"):
        p99 = by_name.get(name, {}).get("relay", {}).get("latency_ms_p99")
        check("p99 acceptance latency <= 50 ms", name, p99, p99 is not None and p99 <= 50, f"{p99} ms")
    cpu = by_name.get("2KB x 20 sessions", {}).get("relay", {}).get("cpu_s_per_1000")
    check("Relay CPU <= 1.3 s per 1000", "2KB x 20 sessions", cpu, cpu is not None and cpu <= 1.3, f"{cpu} s")
    for s in results["scenarios"]:
        rss = s["relay"].get("peak_rss_mb_total")
        check("peak RSS <= 250 MB total", s["name"], rss, rss is not None and rss <= 250, f"{rss} MB")
    return out


def targets_text(rows: list[dict[str, Any]]) -> str:
    lines = ["Targets (issue 14), this run:", ""]
    lines += [f"- {r['verdict']}: {r['target']}, {r['scenario']}: {r['shown']}" for r in rows]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"].replace(", ", "\n") for s in results["scenarios"]]
    relay = [s["relay"]["e2e_per_s"] for s in results["scenarios"]]
    peer = [(s.get("postfix") or {}).get("e2e_per_s", 0) for s in results["scenarios"]]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    ax.bar([i - 0.2 for i in x], relay, 0.4, label="Relay")
    ax.bar([i + 0.2 for i in x], peer, 0.4, label="Postfix")
    for i, (a, b) in enumerate(zip(relay, peer, strict=True)):
        ax.text(i - 0.2, a, f"{a:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("end-to-end messages/s")
    ax.set_title(
        f"Relay vs Postfix, end to end, same machine ({results['machine']['cpus']} CPUs, {results['date'][:10]})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="200 messages, then 100 production ones, through Relay only")
    ap.add_argument("--no-postfix", action="store_true", help="skip the Postfix reference runs")
    ap.add_argument("--no-lookup", action="store_true", help="skip the million-message lookup benchmark")
    ap.add_argument("--scenario", action="append", help="run only scenarios whose name contains this")
    ap.add_argument("--processes", type=int, default=None, help="relay serve --processes (default: Relay's own)")
    ap.add_argument("--postgres", default=POSTGRES_ADMIN, help="an admin URL of the PostgreSQL server (production)")
    ap.add_argument("--lookup-messages", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    ap.add_argument("--python-load", action="store_true", help="Python stand-ins for smtp-source/smtp-sink")
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    use_tools = have_tools() and not args.python_load
    scenarios = SMOKE if args.smoke else SCENARIOS
    if args.scenario:
        scenarios = [s for s in scenarios if any(k in s.name for k in args.scenario)]
    with_postfix = not (args.smoke or args.no_postfix)
    if with_postfix:
        postfix("setup")
        use_tools = True
    dns_port, dns = start_dns()
    print(f"routing: Relay resolves MX for {DOMAIN} through a loopback DNS server (127.0.0.1:{dns_port}); "
          f"Postfix relays to its sink directly. Load: {'smtp-source/smtp-sink' if use_tools else 'Python stand-ins'}; "
          f"relay serve {'--processes ' + str(args.processes) if args.processes else '(default processes)'}.",
          flush=True)  # fmt: skip
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "routing": "MX via loopback DNS",
        "store": "SQLite, WAL, synchronous=FULL (production, PostgreSQL: a fresh database)",
        "processes": args.processes,
        "scenarios": [],
    }
    try:
        for sc in scenarios:
            print(f"- {sc.name}: Relay ...", flush=True)
            relay = await run_relay(sc, dns_port, use_tools, args.processes, args.postgres)
            print(f"  Relay {asdict(relay)}", flush=True)
            entry: dict[str, Any] = {**asdict(sc), "relay": asdict(relay)}
            if with_postfix:
                pf = await run_postfix(sc)
                print(f"  Postfix {asdict(pf)}", flush=True)
                entry["postfix"] = asdict(pf)
                entry["ratio_e2e"] = round(relay.e2e_per_s / pf.e2e_per_s, 3) if pf.e2e_per_s else None
            results["scenarios"].append(entry)
        if not (args.smoke or args.no_lookup):
            print(f"- lookups at {args.lookup_messages:,} messages ...", flush=True)
            results["lookup"] = await lookup_bench(args.lookup_messages)
            print(f"  {results['lookup']}", flush=True)
    finally:
        dns.stop()
        if with_postfix:
            postfix("stop")
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    stamp = results["date"].replace(":", "").replace("-", "")
    results["targets"] = targets(results)
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    (out / "latest.md").write_text(text + "\n")
    with contextlib.suppress(ImportError):
        chart(results, out / "latest.png")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda a: None  # dnslib's threads at exit
    sys.exit(asyncio.run(main()))
