"""Several `relay serve` nodes on one PostgreSQL database against one node on SQLite, end to end.

    python bench/cluster.py                 1, 2 and 3 nodes on PostgreSQL, 1 on SQLite; writes
                                            bench/results/cluster.md (and cluster.json beside it)
    python bench/cluster.py --smoke         200 messages: SQLite, and 2 nodes on PostgreSQL (the harness works)

The same load for every run: N messages of S bytes over C concurrent SMTP sessions (one message
per connection, as Postfix's smtp-source sends them), the sessions spread evenly over the
nodes; every node delivers through a loopback DNS server (MX -> 127.0.0.2) into one sink. The
figures: accepted -> delivered messages per second (all in the sink), acceptance latency p50/p99
(end of DATA -> 250, from a probe client sending to each node in turn during the load), and CPU
seconds per 1,000 messages of the Relay processes and of PostgreSQL's server processes.

Each PostgreSQL run gets a fresh database (dropped and created again). The first node starts
alone and migrates the schema; the others start after it. Pieces come from bench/bench.py
(the DNS server, the sinks, the load, the probe, the CPU readings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (
    POSTGRES_ADMIN,
    ROOT,
    WORK,
    PostgresCpu,
    Probe,
    PySink,
    Scenario,
    ToolSink,
    cpu_seconds,
    drop_database,
    free_port,
    fresh_database,
    have_tools,
    one_message,
    peak_rss_mb,
    proc_tree,
    py_source,
    relay_config,
    smtp_source,
    start_dns,
    wait_delivered,
)

RESULTS = ROOT / "bench" / "results" / "cluster.md"
ADMIN = POSTGRES_ADMIN
DATABASE = "relay_bench_cluster"


@dataclass
class ClusterRun:
    label: str
    nodes: int
    store: str
    messages: int
    e2e_per_s: float
    accepted_per_s: float
    e2e_seconds: float
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    probes: int
    relay_cpu_s_per_1000: float
    postgres_cpu_s_per_1000: float | None
    peak_rss_mb_total: float
    delivered: int
    extra: dict[str, Any] = field(default_factory=dict)


class RoundRobinProbe(Probe):
    """bench.Probe, sending to each node in turn: the latency every node's clients see."""

    def __init__(self, host: str, ports: list[int], size: int) -> None:
        super().__init__(host, ports[0], size)
        self.ports = ports

    async def _run(self) -> None:
        while not self._stop.is_set():
            port = self.ports[self.sent % len(self.ports)]
            self.sent += 1
            with contextlib.suppress(OSError, RuntimeError, ConnectionError):
                self.samples.append(await one_message(self.host, port, self.body))
            await asyncio.sleep(0.01)


# -- a run


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _start_node(work: Path, index: int, config: str) -> asyncio.subprocess.Process:
    cfg = work / f"node{index}.toml"
    cfg.write_text(config)
    log_path = work / f"node{index}.log"
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(cfg), "--processes", "1", stdout=log, stderr=log, cwd=ROOT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 60
    while b"relay ready" not in log_path.read_bytes():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node {index} did not start:\n" + log_path.read_text()[-2000:])
        await asyncio.sleep(0.05)
    return proc


async def run(
    label: str, nodes: int, store_url: str | None, sc: Scenario, dns_port: int, use_tools: bool
) -> ClusterRun:
    """``store_url`` None: SQLite in the node's data_dir (one node only)."""
    work = Path(tempfile.mkdtemp(prefix="relay-cluster-", dir=WORK))
    sink_port = free_port("127.0.0.2")
    sink = ToolSink("127.0.0.2", sink_port) if use_tools else PySink("127.0.0.2", sink_port)
    await sink.start()
    ports = [free_port("127.0.0.1") for _ in range(nodes)]
    procs: list[asyncio.subprocess.Process] = []
    try:
        configs = []
        for i, port in enumerate(ports):
            config = relay_config(work / f"data{i}", port, sink_port, dns_port)
            configs.append(config if store_url is None else config + f'[store]\nurl = "{store_url}"\n')
        procs.append(await _start_node(work, 0, configs[0]))  # the first node migrates a fresh database alone
        started = await asyncio.gather(
            *(_start_node(work, i, c) for i, c in enumerate(configs) if i), return_exceptions=True
        )
        procs += [p for p in started if isinstance(p, asyncio.subprocess.Process)]
        for failed in started:
            if isinstance(failed, BaseException):
                raise failed
        await asyncio.sleep(0.5)
        relay_pids = [pid for p in procs for pid in proc_tree(p.pid)]
        pg = PostgresCpu(store_url.rsplit("/", 1)[1]) if store_url is not None else None
        if pg is not None:
            pg.start()
        cpu0 = cpu_seconds(relay_pids)
        probe = RoundRobinProbe("127.0.0.1", ports, sc.size)
        before = sink.count()
        t0 = time.perf_counter()
        probe.start()
        loads = []
        for port, sessions, messages in zip(ports, _split(sc.sessions, nodes), _split(sc.messages, nodes), strict=True):
            part = Scenario(sc.name, messages, sessions, sc.size)
            loads.append(smtp_source("127.0.0.1", port, part) if use_tools else py_source("127.0.0.1", port, part))
        await asyncio.gather(*loads)
        t1 = time.perf_counter()
        await probe.stop()
        await wait_delivered(sink, before + sc.messages + len(probe.samples))
        t2 = time.perf_counter()
        got = sink.count() - before
        relay_cpu = cpu_seconds(relay_pids) - cpu0
        pg_cpu = None if pg is None else await pg.stop()
        p50, p99 = probe.percentiles()
        total = sc.messages + len(probe.samples)
        result = ClusterRun(
            label=label, nodes=nodes, store="PostgreSQL" if store_url else "SQLite", messages=total,
            e2e_per_s=round(got / (t2 - t0), 1), accepted_per_s=round(sc.messages / (t1 - t0), 1),
            e2e_seconds=round(t2 - t0, 2), latency_ms_p50=p50, latency_ms_p99=p99, probes=len(probe.samples),
            relay_cpu_s_per_1000=round(relay_cpu / total * 1000, 3),
            postgres_cpu_s_per_1000=None if pg_cpu is None else round(pg_cpu / total * 1000, 3),
            peak_rss_mb_total=round(sum(peak_rss_mb(relay_pids)), 1), delivered=got,
        )  # fmt: skip
        if got < total:
            result.extra["incomplete"] = f"sink saw {got} of {total}"
        return result
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.wait(), 30)
            if p.returncode is None:
                p.kill()
        await sink.stop()
        shutil.rmtree(work, ignore_errors=True)


def table(results: dict[str, Any]) -> str:
    sc = results["scenario"]
    lines = [
        "| Store, nodes | msg/s end to end | vs SQLite | accepted msg/s | p50 ms | p99 ms "
        "| Relay CPU s / 1,000 | PostgreSQL CPU s / 1,000 | Relay peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = results["runs"]
    base = next((r["e2e_per_s"] for r in runs if r["store"] == "SQLite"), None)
    for r in runs:
        ratio = f"{r['e2e_per_s'] / base:.2f}x" if base else "-"
        pg = "-" if r["postgres_cpu_s_per_1000"] is None else f"{r['postgres_cpu_s_per_1000']:.2f}"
        note = " (incomplete)" if "incomplete" in r["extra"] else ""
        lines.append(
            f"| {r['label']}{note} | {r['e2e_per_s']:.0f} | {ratio} | {r['accepted_per_s']:.0f} "
            f"| {r['latency_ms_p50']} | {r['latency_ms_p99']} | {r['relay_cpu_s_per_1000']:.2f} | {pg} "
            f"| {r['peak_rss_mb_total']:.0f} |"
        )
    head = (
        f"{sc['messages']:,} messages of {sc['size']:,} bytes over {sc['sessions']} concurrent SMTP sessions, "
        f"spread evenly over the nodes; load from {results['load']}; {results['machine']['cpus']} CPUs, "
        f"Python {results['machine']['python']}; {results['date']}; {results['revision']}."
    )
    return head + "\n\n" + "\n".join(lines)


def _revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "revision unknown"
    return f"commit {rev}"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="200 messages; SQLite, and 2 nodes on PostgreSQL")
    ap.add_argument("--messages", type=int, default=6000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--nodes", default="1,2,3", help="node counts on PostgreSQL (default 1,2,3)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each (default 2); the table shows the best")
    ap.add_argument("--postgres", default=ADMIN, help="an admin URL of the PostgreSQL server")
    ap.add_argument("--database", default=DATABASE, help="dropped and created again for every run")
    ap.add_argument("--python-load", action="store_true", help="Python stand-ins for smtp-source/smtp-sink")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the Markdown table (JSON beside it)")
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    use_tools = have_tools() and not args.python_load
    if args.smoke:
        args.out = WORK / "smoke" / "cluster.md" if args.out == RESULTS else args.out
        args.messages, args.sessions, args.nodes, args.repeat = 200, 10, "2", 1
    sc = Scenario(f"{args.size}B x {args.sessions} sessions", args.messages, args.sessions, args.size)
    plans: list[tuple[str, int, bool]] = [("SQLite, 1 node", 1, False)]
    plans += [(f"PostgreSQL, {n} node{'s' if n > 1 else ''}", n, True) for n in map(int, args.nodes.split(","))]
    dns_port, dns = start_dns()
    load = "Postfix's smtp-source/smtp-sink" if use_tools else "Python stand-ins (in the benchmark's process)"
    print(f"{sc.messages} messages, {sc.sessions} sessions, {sc.size} bytes; load: {load}", flush=True)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "revision": _revision(),
        "load": load,
        "scenario": asdict(sc),
        "runs": [],
    }
    try:
        for label, nodes, postgres in plans:
            best: ClusterRun | None = None
            for attempt in range(args.repeat):
                url = await fresh_database(args.postgres, args.database) if postgres else None
                print(f"- {label} (run {attempt + 1}) ...", flush=True)
                try:
                    got = await run(label, nodes, url, sc, dns_port, use_tools)
                finally:
                    if postgres:
                        await drop_database(args.postgres, args.database)
                print(f"  {asdict(got)}", flush=True)
                if best is None or got.e2e_per_s > best.e2e_per_s:
                    best = got
            assert best is not None
            results["runs"].append(asdict(best))
    finally:
        dns.stop()
    text = table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    _write_markdown(args.out, text)
    print("\n" + text)
    return 0 if all("incomplete" not in r["extra"] for r in results["runs"]) else 1


def _write_markdown(path: Path, text: str) -> None:
    """The table between markers, so that the notes around it (written by hand) stay."""
    start, end = "<!-- table: bench/cluster.py writes between these markers -->", "<!-- end of table -->"
    old = path.read_text() if path.exists() else f"# Benchmark: several nodes on one PostgreSQL\n\n{start}\n{end}\n"
    if start not in old or end not in old:
        old = old.rstrip() + f"\n\n{start}\n{end}\n"
    before, rest = old.split(start, 1)
    after = rest.split(end, 1)[1]
    path.write_text(f"{before}{start}\n{text}\n{end}{after}")


if __name__ == "__main__":
    threading.excepthook = lambda a: None  # dnslib's threads at exit
    sys.exit(asyncio.run(main()))
