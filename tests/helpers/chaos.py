"""Crash safety, measured: `relay serve` under load from 10 SMTP clients, killed with SIGKILL at
random moments and started again on the same store, N times. Used by tests/delivery/test_chaos.py (3 kills
in `make test`) and `make chaos` (50 kills, with the report printed).

What it checks, after a last start lets the queue drain:
- every message that got a 250 is in the store, and every one of its recipients is delivered
  (the destination accepts everything), so nothing accepted was lost or is stuck;
- no recipient is left queued, deferred or sending;
- a recipient that reached the destination twice was cut by a kill: a kill came after the
  destination answered its first DATA with 354 and less than a lease after that copy arrived,
  and the store recorded one delivery only.

Each kill notes what was in flight at that moment: client sessions inside a mail transaction
(intake), recipients leased (claimed, or being recorded), and transactions at the destination
(attempts).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from helpers import ServeProcess, queue_id_of, serve_config, wait_for
from helpers.hostile import Accepted, ScriptedPeer
from helpers.peers import dns_server

LEASE = 2.0  # seconds: a lease cut by a kill comes back quickly
CLIENTS = 10


@dataclass
class Kill:
    number: int
    at: float
    after: float  # seconds since that start was ready
    intake: int  # client sessions inside a mail transaction
    leased: int  # recipients in state "sending" (claimed; attempt or record in progress)
    attempts: int  # transactions at the destination between end of DATA and its reply


@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    accepted: int = 0  # messages that got 250
    attempted: int = 0  # messages clients started to send
    stored: int = 0  # messages in the store at the end (some committed without their 250 reaching the client)
    delivered: int = 0  # recipients delivered, per the store
    arrivals: int = 0  # copies the destination received
    duplicates: list[str] = field(default_factory=list)  # recipients that arrived more than once
    unexplained: list[str] = field(default_factory=list)  # duplicates not cut by a kill
    lost: list[str] = field(default_factory=list)  # 250 given, but not delivered
    stuck: int = 0  # recipients still active after the drain
    drain_seconds: float = 0.0

    def text(self) -> str:
        phases = Counter()
        for k in self.kills:
            phases["intake"] += k.intake > 0
            phases["claimed/recording"] += k.leased > 0
            phases["attempt"] += k.attempts > 0
        lines = [
            f"kills: {len(self.kills)} (SIGKILL, at 0.3-2.0 s after each start, {CLIENTS} clients sending)",
            "kills with work in flight: " + ", ".join(f"{name} {n}" for name, n in phases.items()),
            f"messages: {self.attempted} tried by clients, {self.accepted} got 250, {self.stored} stored",
            f"recipients delivered (store): {self.delivered}; copies at the destination: {self.arrivals}",
            f"duplicates: {len(self.duplicates)}, each cut by a kill: {not self.unexplained}"
            + (f" (unexplained: {', '.join(self.unexplained)})" if self.unexplained else ""),
            f"lost (250 but not delivered): {len(self.lost)}; stuck after the drain: {self.stuck}",
            f"drain after the last start: {self.drain_seconds:.1f} s",
            "",
            "| kill | after start (s) | intake sessions | leased | attempts at the destination |",
            "|---|---|---|---|---|",
            *(f"| {k.number} | {k.after:.2f} | {k.intake} | {k.leased} | {k.attempts} |" for k in self.kills),
        ]
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexplained or self.stuck)


async def run(tmp_path: Path, kills: int, *, seed: int | None = None) -> Report:
    rng = random.Random(seed)
    report = Report()
    with dns_server() as zone:
        sink = await ScriptedPeer("127.0.0.2", data_delay=0.05).start()
        try:
            for domain in ("example.com", "example.net"):
                zone.mx(domain, (10, "mx.example.com"))
            zone.a("mx.example.com", "127.0.0.2")
            cfg = serve_config(
                tmp_path,
                f"""[delivery]
port = {sink.port}
lease = "{LEASE}s"
retry_schedule = ["200ms"]
concurrency = 20
connect_timeout = "2s"
command_timeout = "5s"
shutdown_grace = "1s"
[dns]
nameservers = ["127.0.0.1:{zone.port}"]
timeout = "1s"
""",  # type: ignore[attr-defined]
            )
            db = tmp_path / "data" / "relay.db"
            accepted: dict[str, str] = {}  # queue id -> recipient
            in_transaction = 0
            server = await ServeProcess(cfg).start()
            stop = asyncio.Event()

            async def client(n: int) -> None:
                nonlocal in_transaction
                i = 0
                while not stop.is_set():
                    i += 1
                    rcpt = f"c{n}-{i}@{'example.com' if i % 2 else 'example.net'}"
                    report.attempted += 1
                    try:
                        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.smtp_port, start_tls=False, timeout=5)
                        await smtp.connect()
                        in_transaction += 1
                        try:
                            _, text = await smtp.sendmail("app@example.com", [rcpt], f"Subject: {rcpt}\r\n\r\nhi\r\n")
                            accepted[queue_id_of(text)] = rcpt
                        finally:
                            in_transaction -= 1
                            smtp.close()
                    except (aiosmtplib.SMTPException, OSError, KeyError):
                        await asyncio.sleep(0.05)  # the server is down: no 250, nothing promised

            clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
            try:
                for number in range(1, kills + 1):
                    ready = time.monotonic()
                    await asyncio.sleep(rng.uniform(0.3, 2.0))
                    leased = _leased(db)
                    report.kills.append(
                        Kill(number, time.time(), time.monotonic() - ready, in_transaction, leased, sink.in_data)
                    )
                    server.kill()
                    await server.wait()
                    server = await ServeProcess(cfg).start()
                stop.set()
                await asyncio.gather(*clients)
                started = time.monotonic()
                await wait_for(lambda: _active(db) == 0, timeout=120, interval=0.2)
                report.drain_seconds = time.monotonic() - started
            finally:
                stop.set()
                for task in clients:
                    task.cancel()
                server.terminate()
                await server.wait()
            _check(report, db, accepted, sink)
        finally:
            await sink.close()
    return report


def _query(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _leased(db: Path) -> int:
    return int(_query(db, "SELECT count(*) FROM recipients WHERE status = 'sending'")[0][0])  # type: ignore[call-overload]


def _active(db: Path) -> int:
    sql = "SELECT count(*) FROM recipients WHERE status IN ('queued', 'deferred', 'sending')"
    return int(_query(db, sql)[0][0])  # type: ignore[call-overload]


def _check(report: Report, db: Path, accepted: dict[str, str], sink: ScriptedPeer) -> None:
    report.accepted = len(accepted)
    report.stored = int(_query(db, "SELECT count(*) FROM messages")[0][0])  # type: ignore[call-overload]
    report.stuck = _active(db)
    states = {str(q): str(s) for q, s in _query(db, "SELECT queue_id, status FROM recipients")}
    report.lost = [q for q in accepted if states.get(q) != "delivered"]
    report.delivered = sum(1 for s in states.values() if s == "delivered")
    report.arrivals = len(sink.rcpts)
    recorded: dict[str, list[float]] = {}
    for rcpt, at in _query(db, "SELECT recipient, at FROM events WHERE type = 'delivered'"):
        recorded.setdefault(str(rcpt), []).append(float(at))  # type: ignore[arg-type]
    first: dict[str, Accepted] = {}
    for m in sink.messages:
        for r in m.rcpts:
            first.setdefault(r, m)
    kills = [k.at for k in report.kills]
    for rcpt, copies in Counter(sink.rcpts).items():
        if copies < 2:
            continue
        report.duplicates.append(rcpt)
        # The first copy was cut by a kill if Relay died between sending it (it had our 354, so it
        # was alive then; the sink may read the content only after the kill, as this loop is busy)
        # and recording it, which it does within its lease.
        cut = any(first[rcpt].began <= k < first[rcpt].at + LEASE for k in kills)
        if not cut or len(recorded.get(rcpt, [])) != 1:
            m = first[rcpt]
            near = [round(k - m.began, 3) for k in kills if m.began - 5 < k < m.at + 5]
            report.unexplained.append(
                f"{rcpt} (354 at {m.began:.3f}, arrived +{m.at - m.began:.3f} s, kills at {near} s,"
                f" recorded {len(recorded.get(rcpt, []))} deliveries)"
            )
