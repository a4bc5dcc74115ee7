"""Read latency of the store on SQLite: lookups, get_message, queue_summary, stats.

Bulk-imports MESSAGES messages into a temporary SQLite store, then times N calls of each read
and prints p50/p99 in milliseconds: run it before and after a change to how the store reads
(it measured SQLite readers in threads against aiosqlite; see relay/store/engine.py):

    .venv/bin/python bench/store_reads.py [--messages 50000] [--n 500]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.logstore import LogStore
from relay.model import EventView, Imported, NewMessage

T0 = 1_800_000_000.0


def imported(i: int) -> Imported:
    at = T0 + i
    rcpt = f"user{i}@d{i % 50}.example"
    msg = NewMessage(
        queue_id=f"01BENCH{i:019d}",
        message_id=f"m{i}@app.example",
        mail_from="app@example.com",
        recipients=(rcpt,),
        subject=f"Hello {i}",
        tags=("welcome" if i % 2 else "reset",),
        user="app",
        client_ip="127.0.0.1",
        received_at=at,
        raw=b"Subject: Hello\r\n\r\nbody\r\n",
    )
    events = (
        EventView(at, "received", None, {"client_ip": "127.0.0.1"}),
        EventView(at + 1.5, "delivered", rcpt, {"code": 250, "attempt": 1}),
    )
    return Imported(msg, "delivered", 1, None, "250 2.0.0 ok", events)


async def timed(name: str, n: int, call: Callable[[int], Awaitable[object]]) -> None:
    for i in range(min(n, 20)):  # warm the pools and caches
        await call(i)
    times = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    print(f"{name:<22} n={n:<5} p50={statistics.median(times):7.3f} ms  p99={p99:7.3f} ms")


async def main(messages: int, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await LogStore.open(f"sqlite+aiosqlite:///{Path(tmp) / 'relay.db'}")
        try:
            await store.upgrade()
            for start in range(0, messages, 5000):
                await store.bulk_import([imported(i) for i in range(start, min(messages, start + 5000))])
            rng = random.Random(1)
            picks = [rng.randrange(messages) for _ in range(n)]
            await timed("lookup recipient", n, lambda i: store.lookup(f"user{picks[i]}@d{picks[i] % 50}.example"))
            await timed("lookup Message-ID", n, lambda i: store.lookup(f"<m{picks[i]}@app.example>"))
            await timed("get_message", n, lambda i: store.get_message(f"01BENCH{picks[i]:019d}"))
            await timed("queue_summary", max(1, n // 10), lambda i: store.queue_summary())
            await timed("stats day by tag", max(1, n // 50), lambda i: store.stats(T0, T0 + 86400, "tag"))
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.n))
