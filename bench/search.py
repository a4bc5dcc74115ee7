"""Search at a million messages: the console's search box, ``GET /api/v1/messages?q=`` and
``relay search`` all run ``LogStore.search_messages``; this times it, with its count.

Seeds MESSAGES messages (30 days, like the lookup benchmark in bench.py, but with the mix a
real store has: bounces with their reasons, deferrals, complaints, opens and clicks, several
tags, subjects from a few templates) into a SQLite file under bench/work (kept: a second run
reuses it), then times each query N times and writes a Markdown table:

    .venv/bin/python bench/search.py [--messages 1000000] [--n 5] [--out bench/results/search.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
DAY = 86400.0
SUBJECTS = (
    "Your invoice #{i}",
    "Password reset for your account",
    "Welcome to Example, {name}!",
    "Your order {i} has shipped",
    "Weekly digest",
    "Verify your email address",
    "Receipt for payment {i}",
    "Someone signed in to your account",
)
TAGS = ("invoice", "password-reset", "welcome", "shipping", "digest", "verify", "receipt", "security")
# Outcomes, as (state, last event, weight): mostly delivered, a few of everything else.
FATES = (
    ("delivered", "delivered", 930),
    ("bounced", "bounced", 30),
    ("deferred", "deferred", 15),
    ("expired", "expired", 10),
    ("suppressed", "suppressed", 5),
    ("queued", None, 10),
)
BOUNCE_REASONS = ("userunknown", "mailboxfull", "hostunknown", "blocked", "spamdetected", "rejected")
DEFER_REASONS = ("ratelimited", "mailboxfull", "networkerror", "systemerror")


def _fate(rng: random.Random) -> tuple[str, str | None]:
    pick = rng.randrange(sum(w for _, _, w in FATES))
    for state, event, weight in FATES:
        if pick < weight:
            return state, event
        pick -= weight
    raise AssertionError("unreachable")


async def seed(url: str, total: int, have: int, t_end: float) -> None:
    from ulid import ULID

    from relay.logstore import LogStore
    from relay.model import EventView, Imported, NewMessage

    store = await LogStore.open(url)
    try:
        await store.upgrade()
        body = b"Subject: hello\r\n\r\n" + b"x" * 300 + b"\r\n"
        t_start = t_end - 30 * DAY
        for start in range(have, total, 10_000):
            rng = random.Random(start)
            batch = []
            for i in range(start, min(start + 10_000, total)):
                at = t_start + (i / total) * 30 * DAY
                qid = str(ULID.from_timestamp(at))
                kind = i % len(TAGS)
                domain = "gmail.com" if i % 3 == 0 else f"d{i % 50}.example"
                rcpts = [f"user{i}@{domain}"] + ([f"cc{i}@d{(i + 7) % 50}.example"] if i % 20 == 0 else [])
                subject = SUBJECTS[kind].format(i=i, name=f"user{i}")
                msg = NewMessage(qid, f"{qid.lower()}@app.example", f"app{i % 4}@example.com", tuple(rcpts),
                                 subject, (TAGS[kind],), f"user{i % 5}", "10.0.0.1", at, body)  # fmt: skip
                state, last = _fate(rng)
                evs = [EventView(at, "received", None, {})]
                for r in rcpts:
                    if state == "deferred" or (last in ("bounced", "expired") and rng.random() < 0.5):
                        reason = rng.choice(DEFER_REASONS)
                        evs.append(EventView(at + 60, "deferred", r, {"attempt": 1, "code": 451, "reason": reason}))
                    if last == "delivered":
                        evs.append(EventView(at + 1.5, "delivered", r, {"attempt": 1, "code": 250}))
                        if rng.random() < 0.25:
                            evs.append(EventView(at + 600, "opened", r, {"machine": rng.random() < 0.3}))
                            if rng.random() < 0.3:
                                evs.append(EventView(at + 700, "clicked", r, {"machine": False, "url": "u"}))
                        if rng.random() < 0.002:
                            evs.append(EventView(at + 900, "complained", r, {"reason": "feedback"}))
                    elif last == "bounced":
                        reason = rng.choice(BOUNCE_REASONS)
                        evs.append(EventView(at + 120, "bounced", r, {"code": 550, "reason": reason, "hard": True}))
                    elif last == "expired":
                        evs.append(EventView(at + 3 * DAY, "expired", r, {"reason": "expired"}))
                    elif last == "suppressed":
                        evs.append(EventView(at, "suppressed", r, {"reason": "suppressed"}))
                next_at = t_end + 3600 if state in ("deferred", "queued") else None
                batch.append(Imported(msg, state, 1, next_at, "250 2.0.0 ok", tuple(evs)))
            await store.bulk_import(batch)
            if (start // 10_000) % 10 == 0:
                print(f"  seeded {min(start + 10_000, total):,}", flush=True)
    finally:
        await store.close()


async def one_row(url: str, sql: str) -> tuple[object, ...]:
    """One row of ``sql`` (none: an empty tuple), run beside the store (SQLite file or PostgreSQL)."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.split("///", 1)[1])) as conn:
            row = conn.execute(sql).fetchone()
            return () if row is None else tuple(row)
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        row = await conn.fetchrow(sql)
        return () if row is None else tuple(row)
    finally:
        await conn.close()


async def queries(url: str) -> list[tuple[str, str]]:
    """The representative set, with real values picked from the store."""
    (addr,) = await one_row(url, "SELECT address FROM recipients ORDER BY random() LIMIT 1")
    (bounced,) = await one_row(url, "SELECT address FROM recipients WHERE status = 'bounced' ORDER BY random() LIMIT 1")
    qid, mid = await one_row(url, "SELECT queue_id, message_id FROM messages ORDER BY random() LIMIT 1")
    assert isinstance(qid, str)
    return [
        ("to: exact", f"to:{addr}"),
        ("to: + status:bounced", f"to:{bounced} status:bounced"),
        ("id:", f"id:{qid.lower()}"),
        ("message-id:", f"message-id:<{mid}>"),
        ("tag + after:7d", "tag:invoice after:7d"),
        ("subject phrase", 'subject:"password reset"'),
        ("free text word", "shipped"),
        ("free text, rare", "user123457"),
        ("-is:opened tag:", "-is:opened tag:welcome"),
        ("domain + status", "domain:d7.example status:bounced"),
        ("status:bounced", "status:bounced"),
        ("reason:", "reason:userunknown"),
        ("reason: + after:3d", "reason:ratelimited after:3d"),
        ("is:complained", "is:complained"),
        ("is:clicked + after:1d", "is:clicked after:1d"),
        ("to:@domain substring", "to:@d13.example"),
        ("from: + before:", "from:app1@example.com before:20d"),
        ("user + -status:delivered", "user:user2 -status:delivered"),
        ("everything (no terms)", ""),
    ]


async def run(total: int, n: int, url: str | None = None) -> list[dict[str, object]]:
    """Seed (up to ``total``) and time; ``url``: a PostgreSQL store instead of the SQLite file."""
    from relay.logstore import LogStore

    WORK.mkdir(parents=True, exist_ok=True)
    url = url or f"sqlite+aiosqlite:///{WORK / f'search-{total}.db'}"
    store = await LogStore.open(url)
    await store.upgrade()
    have = sum((await store.queue_summary()).counts.values())
    await store.close()
    (newest,) = await one_row(url, "SELECT max(received_at) FROM messages")
    t_end = float(newest) if isinstance(newest, int | float) else time.time()
    if have < total:
        print(f"seeding {total - have:,} messages into {display(url)} ...", flush=True)
        t = time.perf_counter()
        await seed(url, total, have, t_end if have else time.time())
        print(f"  seeded in {time.perf_counter() - t:.0f} s", flush=True)
    if not url.startswith("sqlite"):
        # The planner's statistics, as autovacuum keeps them on a live server (a bulk load, or a
        # server with autovacuum off, has none, and PostgreSQL then plans searches blind).
        await one_row(url, "ANALYZE")
    store = await LogStore.open(url)
    rows: list[dict[str, object]] = []
    try:
        # Relative times (after:7d) count from the newest message, as if the store were live.
        (newest,) = await one_row(url, "SELECT max(received_at) FROM messages")
        assert isinstance(newest, int | float)
        now = float(newest) + 60
        for name, text in await queries(url):
            await store.search_messages(text, now=now)  # warm the page cache
            times, cpu, page = [], [], None
            for _ in range(n):
                t, c = time.perf_counter(), time.process_time()
                page = await store.search_messages(text, now=now)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)  # SQLite runs in this process's threads
            assert page is not None
            total_shown = f"{page.total:,}" + ("+" if page.total_capped else "")
            row = {"name": name, "query": text, "total": total_shown, "page": len(page.messages),
                   "p50_ms": round(statistics.median(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1),
                   "cpu_ms": round(statistics.median(cpu) * 1000, 1)}  # fmt: skip
            print(f"  {row}", flush=True)
            rows.append(row)
        times, cpu = [], []
        for _ in range(n):  # the console's dashboard, on the same store (a day is ~33,000 messages)
            t, c = time.perf_counter(), time.process_time()
            await store.dashboard(now=now)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        rows.append({"name": "dashboard (LogStore.dashboard)", "query": "", "total": "-", "page": "-",
                     "p50_ms": round(statistics.median(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1),
                     "cpu_ms": round(statistics.median(cpu) * 1000, 1)})  # fmt: skip
    finally:
        await store.close()
    return rows


def display(url: str) -> str:
    from relay.logstore import display_url

    return display_url(url)


def table(total: int, rows: list[dict[str, object]], n: int, backend: str = "SQLite") -> str:
    lines = [
        f"Search at {total:,} messages on {backend} (one 20-message page plus the count, capped at 10,000; "
        f"median and worst of {n} runs after one warm-up, and the median CPU time, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end).",
        "",
        "| query | example | matches | page | p50 ms | max ms | CPU ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = str(r["query"]).replace("|", "\\|") or ("-" if r["total"] == "-" else "(empty)")
        lines.append(
            f"| {r['name']} | `{q}` | {r['total']} | {r['page']} | {r['p50_ms']} | {r['max_ms']} | {r['cpu_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--n", type=int, default=5, help="timed runs per query")
    ap.add_argument("--seed-only", action="store_true")
    ap.add_argument("--postgres", metavar="URL", help="time a PostgreSQL store (seeded there) instead of SQLite")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.md")
    args = ap.parse_args()
    if args.seed_only:
        WORK.mkdir(parents=True, exist_ok=True)
        asyncio.run(seed(f"sqlite+aiosqlite:///{WORK / f'search-{args.messages}.db'}", args.messages, 0, time.time()))
        return 0
    rows = asyncio.run(run(args.messages, args.n, args.postgres))
    text = table(args.messages, rows, args.n, "PostgreSQL" if args.postgres else "SQLite")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
