"""Relay and Postfix side by side, end to end, on this machine.

    python bench/bench.py                 every scenario, Postfix too, the lookup benchmark; writes
                                          bench/results/<time>.json, latest.json, latest.md, latest.png
    python bench/bench.py --smoke         200 messages through Relay only (CI keeps the harness working)

Load comes from Postfix's smtp-source (N messages of S bytes over C parallel sessions, a new
connection per message) and lands in Postfix's smtp-sink on 127.0.0.2. Relay finds the sink
through a loopback DNS server that answers MX for the test domain (its real MX path), runs
with SQLite (synchronous=FULL) and logs every attempt. Postfix is the reference peer set up by
../shared/bench/postfix-peer.sh (127.0.0.1:2526 -> 127.0.0.2:2626); the two runs never overlap.
A client of our own measures acceptance latency (end of DATA -> 250) during each load.
Without smtp-source/smtp-sink (smoke mode on a bare machine), Python stand-ins take their place.
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
DOMAIN = "dest.test"
CLK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(ROOT))


@dataclass
class Scenario:
    name: str
    messages: int
    sessions: int
    size: int
    backlog: int = 0


SCENARIOS = [
    Scenario("2KB x 20 sessions", 5000, 20, 2000),
    Scenario("2KB x 50 sessions", 5000, 50, 2000),
    Scenario("20KB x 20 sessions", 5000, 20, 20000),
    Scenario("20KB x 50 sessions", 5000, 50, 20000),
    Scenario("2KB x 20 sessions, 100k deferred in store", 5000, 20, 2000, backlog=100_000),
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
    cpu_s_per_1000: float | None = None
    peak_rss_mb_total: float | None = None
    peak_rss_mb_max_process: float | None = None
    processes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- loopback DNS: MX dest.test -> mx.dest.test -> 127.0.0.2


def start_dns() -> tuple[int, Any]:
    from dnslib import MX, QTYPE, RCODE, RR, A
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    class Static(BaseResolver):  # type: ignore[misc]
        def resolve(self, request: Any, handler: Any) -> Any:
            reply = request.reply()
            name, qtype = str(request.q.qname).lower(), QTYPE[request.q.qtype]
            if name == f"{DOMAIN}." and qtype == "MX":
                reply.add_answer(RR(name, QTYPE.MX, rdata=MX(f"mx.{DOMAIN}.", 10), ttl=300))
            elif name == f"mx.{DOMAIN}." and qtype == "A":
                reply.add_answer(RR(name, QTYPE.A, rdata=A("127.0.0.2"), ttl=300))
            elif name not in (f"{DOMAIN}.", f"mx.{DOMAIN}."):
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
    """A minimal counting SMTP sink (stand-in when smtp-sink is not installed)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.n = host, port, 0
        self.server: asyncio.Server | None = None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
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


async def smtp_source(host: str, port: int, sc: Scenario) -> None:
    proc = await asyncio.create_subprocess_exec(
        tool("smtp-source"), "-s", str(sc.sessions), "-m", str(sc.messages), "-l", str(sc.size),
        "-f", "a@bench.test", "-t", f"b@{DOMAIN}", f"{host}:{port}",
    )  # fmt: skip
    if await proc.wait() != 0:
        raise RuntimeError("smtp-source failed")


def _payload(size: int, n: int) -> bytes:
    head = f"From: <a@bench.test>\r\nTo: <b@{DOMAIN}>\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * max(1, size // len(line))


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


async def py_source(host: str, port: int, sc: Scenario) -> None:
    queue = iter(range(sc.messages))
    body = _payload(sc.size, 0)

    async def session() -> None:
        for _ in queue:
            await one_message(host, port, body)

    await asyncio.gather(*(session() for _ in range(sc.sessions)))


class Probe:
    """Acceptance latency from a client of our own, one message at a time during the load."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.body = host, port, _payload(size, 0)
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


async def drive(host: str, port: int, sink: Any, sc: Scenario, use_tools: bool) -> Run:
    probe = Probe(host, port, sc.size)
    before = sink.count()
    t0 = time.perf_counter()
    probe.start()
    await (smtp_source(host, port, sc) if use_tools else py_source(host, port, sc))
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
    )
    if got < sc.messages:
        run.extra["incomplete"] = f"sink saw {got} of {sc.messages + len(probe.samples)}"
    return run


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
concurrency = 100
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
"""


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


async def run_relay(sc: Scenario, dns_port: int, use_tools: bool, processes: int) -> Run:
    work = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=WORK))
    port, sink_port = free_port("127.0.0.1"), free_port("127.0.0.2")
    sink = ToolSink("127.0.0.2", sink_port) if use_tools else PySink("127.0.0.2", sink_port)
    await sink.start()
    cfg = work / "relay.toml"
    cfg.write_text(relay_config(work / "data", port, sink_port, dns_port))
    if sc.backlog:
        t = time.perf_counter()
        await seed_backlog(f"sqlite+aiosqlite:///{work / 'data' / 'relay.db'}", sc.backlog)
        print(f"  seeded {sc.backlog} deferred recipients in {time.perf_counter() - t:.1f}s", flush=True)
    log = (work / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(cfg), "--processes", str(processes),
        stdout=log, stderr=log, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"relay ready" not in (work / "serve.log").read_bytes():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("relay did not start:\n" + (work / "serve.log").read_text()[-2000:])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        pids = proc_tree(proc.pid)
        cpu0 = cpu_seconds(pids)
        run = await drive("127.0.0.1", port, sink, sc, use_tools)
        cpu = cpu_seconds(pids) - cpu0
        rss = peak_rss_mb(pids)
        run.cpu_s_per_1000 = round(cpu / (sc.messages + run.probes) * 1000, 3)
        run.peak_rss_mb_total = round(sum(rss), 1)
        run.peak_rss_mb_max_process = round(max(rss), 1)
        run.processes = len(pids)
        failures = (work / "serve.log").read_text(errors="replace").count("status=deferred")
        if failures:
            run.extra["deferred_attempts"] = failures
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
        await sink.stop()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return run


# -- Postfix


def postfix(action: str) -> None:
    if not PEER_SCRIPT.exists():
        raise FileNotFoundError(f"{PEER_SCRIPT} (the Postfix reference peer)")
    import subprocess

    subprocess.run(["bash", str(PEER_SCRIPT), action], check=True)


async def run_postfix(sc: Scenario) -> Run:
    sink = ToolSink(*POSTFIX_SINK)
    await sink.start()
    try:
        return await drive("127.0.0.1", POSTFIX_PORT, sink, sc, use_tools=True)
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


def table(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | Relay accepted/s | Relay e2e/s | Postfix accepted/s | Postfix e2e/s | e2e Relay/Postfix "
        "| Relay p50 / p99 ms | Postfix p50 / p99 ms | Relay peak RSS MB (total / largest process) | Relay CPU s per 1000 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        r, p = s["relay"], s.get("postfix") or {}
        ratio = f"{s['ratio_e2e']:.2f}x" if s.get("ratio_e2e") else "-"
        lines.append(
            f"| {s['name']} | {r['accepted_per_s']:.0f} | {r['e2e_per_s']:.0f} | {p.get('accepted_per_s', '-')} "
            f"| {p.get('e2e_per_s', '-')} | {ratio} | {r['latency_ms_p50']} / {r['latency_ms_p99']} "
            f"| {p.get('latency_ms_p50', '-')} / {p.get('latency_ms_p99', '-')} "
            f"| {r['peak_rss_mb_total']} / {r['peak_rss_mb_max_process']} | {r['cpu_s_per_1000']} |"
        )
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
    ap.add_argument("--smoke", action="store_true", help="200 messages through Relay only")
    ap.add_argument("--no-postfix", action="store_true", help="skip the Postfix reference runs")
    ap.add_argument("--no-lookup", action="store_true", help="skip the million-message lookup benchmark")
    ap.add_argument("--scenario", action="append", help="run only scenarios whose name contains this")
    ap.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="relay serve --processes (default: CPUs)"
    )
    ap.add_argument("--lookup-messages", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    ap.add_argument("--python-load", action="store_true", help="Python stand-ins for smtp-source/smtp-sink")
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    use_tools = have_tools() and not args.python_load
    scenarios = [Scenario("smoke 2KB x 10 sessions", 200, 10, 2000)] if args.smoke else SCENARIOS
    if args.scenario:
        scenarios = [s for s in scenarios if any(k in s.name for k in args.scenario)]
    with_postfix = not (args.smoke or args.no_postfix)
    if with_postfix:
        postfix("setup")
        use_tools = True
    dns_port, dns = start_dns()
    print(f"routing: Relay resolves MX for {DOMAIN} through a loopback DNS server (127.0.0.1:{dns_port}); "
          f"Postfix relays to its sink directly. Load: {'smtp-source/smtp-sink' if use_tools else 'Python stand-ins'}; "
          f"relay serve --processes {args.processes}.", flush=True)  # fmt: skip
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "routing": "MX via loopback DNS",
        "store": "SQLite, WAL, synchronous=FULL",
        "processes": args.processes,
        "scenarios": [],
    }
    try:
        for sc in scenarios:
            print(f"- {sc.name}: Relay ...", flush=True)
            relay = await run_relay(sc, dns_port, use_tools, args.processes)
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
