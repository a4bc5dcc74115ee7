"""Small-message latency while 20 MB HTML messages with 100k links flow through Relay.

    python bench/heavy.py                  baseline, then under heavy load; prints a markdown table
                                           and writes it to bench/results/heavy.md
    python bench/heavy.py --heavy 2 --baseline 5     a shorter run

A `relay serve` subprocess (uvloop, SQLite) with click and open tracking on
(`[tracking] base_url = "https://t.example.com"`) accepts the messages; its delivery finds an
aiosmtpd sink on 127.0.0.2 through a loopback dnslib DNS server (MX dest.test). The sink runs in
a process of its own so that it takes no time from the client measuring latency. A probe sends
2 KB messages one at a time, each on a new connection, and measures end of DATA -> 250: first
with nothing else going on, then while a sender pushes 20 MB HTML messages (100,000 links each)
one after another. Intake scans each big message for links, and delivery rewrites every link,
both in worker threads; the probe's figures show what that costs the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (
    DOMAIN,
    ROOT,
    WORK,
    free_port,
    one_message,
    peak_rss_mb,
    proc_tree,
    relay_config,
    start_dns,
)

RESULTS = ROOT / "bench" / "results" / "heavy.md"
SMALL = 2000
HEAVY_SIZE = 20_000_000
HEAVY_LINKS = 100_000


def small_message() -> bytes:
    head = f"From: <a@bench.test>\r\nTo: <b@{DOMAIN}>\r\nSubject: probe\r\n\r\n".encode()
    return head + (b"X" * 78 + b"\r\n") * (SMALL // 80)


def heavy_message(size: int = HEAVY_SIZE, links: int = HEAVY_LINKS) -> bytes:
    """HTML of about `size` bytes with `links` distinct trackable links, lines under 1000 octets."""
    per = size // links
    parts = []
    for i in range(links):
        link = b'<p><a href="https://shop.example.com/item/%06d?utm_source=mail&amp;c=%d">Item %06d</a> ' % (i, i, i)
        parts.append(link + b"x" * max(0, per - len(link) - 2) + b"\r\n")
    head = (
        f"From: <news@bench.test>\r\nTo: <b@{DOMAIN}>\r\nSubject: heavy\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n"
    ).encode()
    return head + b"<html><body>\r\n" + b"".join(parts) + b"</body></html>\r\n"


# -- the sink, in a process of its own


def sink_main(host: str, port: int) -> None:
    """An aiosmtpd sink that prints one line per message received."""
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Count:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            print(len(envelope.content or b""), flush=True)
            return "250 2.0.0 ok"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        handler = Count()
        server = await loop.create_server(
            lambda: SMTP(handler, data_size_limit=0, enable_SMTPUTF8=True, hostname="sink.bench.test"), host, port
        )
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


class Sink:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sizes: list[int] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--sink", f"{self.host}:{self.port}", stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        assert (await asyncio.wait_for(self.proc.stdout.readline(), 30)).strip() == b"ready"
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.sizes.append(int(line))

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


# -- load


class Probe:
    """Small messages, one at a time, each on a new connection; end of DATA -> 250 latencies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.body = small_message()
        self.samples: list[float] = []
        self.failures = 0

    async def run(self, until: asyncio.Event | float) -> None:
        deadline = until if isinstance(until, float) else None
        while not (until.is_set() if isinstance(until, asyncio.Event) else time.monotonic() > (deadline or 0)):
            try:
                self.samples.append(await one_message("127.0.0.1", self.port, self.body))
            except (OSError, RuntimeError):
                self.failures += 1
            await asyncio.sleep(0.02)

    def row(self) -> dict[str, str]:
        if len(self.samples) < 2:
            return {"p50": "-", "p99": "-", "max": "-", "n": str(len(self.samples))}
        q = statistics.quantiles(self.samples, n=100, method="inclusive")
        return {
            "p50": f"{q[49] * 1000:.1f}",
            "p99": f"{q[98] * 1000:.1f}",
            "max": f"{max(self.samples) * 1000:.1f}",
            "n": str(len(self.samples)),
        }


async def send_heavy(port: int, body: bytes) -> float:
    """One big message on a new connection; returns end of DATA -> 250."""
    return await one_message("127.0.0.1", port, body, sender="news@bench.test")


async def main(args: argparse.Namespace) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="relay-heavy-", dir=WORK))
    dns_port, dns = start_dns()
    port, sink_port = free_port("127.0.0.1"), free_port("127.0.0.2")
    sink = Sink("127.0.0.2", sink_port)
    await sink.start()
    cfg = work / "relay.toml"
    cfg.write_text(
        relay_config(work / "data", port, sink_port, dns_port) + '[tracking]\nbase_url = "https://t.example.com"\n'
    )
    log = (work / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(cfg), stdout=log, stderr=log, cwd=ROOT
    )
    heavy = heavy_message()
    try:
        deadline = time.monotonic() + 60
        while b"relay ready" not in (work / "serve.log").read_bytes():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("relay did not start:\n" + (work / "serve.log").read_text()[-2000:])
            await asyncio.sleep(0.05)

        print(f"baseline: small messages alone for {args.baseline:.0f}s", flush=True)
        baseline = Probe(port)
        await baseline.run(time.monotonic() + args.baseline)

        print(f"heavy: {args.heavy} x {len(heavy) / 1e6:.0f} MB HTML with {HEAVY_LINKS} links each", flush=True)
        loaded = Probe(port)
        done = asyncio.Event()
        probe_task = asyncio.get_running_loop().create_task(loaded.run(done))
        accept: list[float] = []
        t0 = time.perf_counter()
        try:
            for _ in range(args.heavy):
                accept.append(await send_heavy(port, heavy))
            # Keep probing until the sink has every big message: delivery rewrites them meanwhile.
            wait_until = time.monotonic() + 900
            while sum(1 for s in sink.sizes if s > 1_000_000) < args.heavy and time.monotonic() < wait_until:
                await asyncio.sleep(0.1)
        finally:
            done.set()
            await probe_task
        elapsed = time.perf_counter() - t0
        delivered = sum(1 for s in sink.sizes if s > 1_000_000)
        rss = max(peak_rss_mb(proc_tree(proc.pid)) or [0.0])
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
        await sink.stop()
        dns.stop()
        log.close()
        shutil.rmtree(work, ignore_errors=True)

    b, h = baseline.row(), loaded.row()
    lines = [
        "| Small messages (2 KB), end of DATA -> 250 | p50 ms | p99 ms | max ms | probes |",
        "|---|---:|---:|---:|---:|",
        f"| alone | {b['p50']} | {b['p99']} | {b['max']} | {b['n']} |",
        f"| while 20 MB HTML messages with 100k links flow | {h['p50']} | {h['p99']} | {h['max']} | {h['n']} |",
        "",
        "| Heavy messages | value |",
        "|---|---:|",
        f"| sent, one after another | {args.heavy} x {len(heavy) / 1e6:.1f} MB, {HEAVY_LINKS} links each |",
        f"| end of DATA -> 250, median (intake link scan included) | {statistics.median(accept):.2f} s |",
        f"| delivered to the sink, rewritten (tracking on) | {delivered} of {args.heavy} |",
        f"| first byte sent -> last delivered | {elapsed:.1f} s |",
        f"| relay serve peak RSS | {rss:.0f} MB |",
        f"| small-message failures during the run | {baseline.failures + loaded.failures} |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Benchmark: heavy messages\n\n"
            f"`make bench-heavy` on {time.strftime('%Y-%m-%d', time.gmtime())}: one `relay serve` process "
            "(uvloop, SQLite), tracking on, 2 cores shared with other work.\n\n" + table + "\n"
        )
    return 0 if delivered == args.heavy and not loaded.failures and not baseline.failures else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heavy", type=int, default=5, help="20 MB messages to send (default 5)")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds of small messages alone (default 10)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results/heavy.md alone")
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.sink:
        host, _, sink_port = ns.sink.rpartition(":")
        sink_main(host, int(sink_port))
        sys.exit(0)
    sys.exit(asyncio.run(main(ns)))
