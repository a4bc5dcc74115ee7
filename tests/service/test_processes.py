"""[server] processes: "auto" (one worker per usable CPU core, cgroup quota included) by default,
a number, or `relay serve --processes N` above both."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import ServeProcess, relay_cli, send_to, wait_for, write_config
from helpers.peers import sinks

from relay import config
from relay.cpus import cgroup_cpu_quota, cgroup_path, parse_cpu_max, usable_cpus
from relay.errors import ConfigError


@pytest.mark.parametrize(("raw", "value"), [("auto", "auto"), (1, 1), (3, 3), (64, 64)])
def test_the_key_takes_auto_or_a_count(raw: Any, value: Any) -> None:
    assert config.from_mapping({"server": {"processes": raw}}).server.processes == value


def test_auto_is_the_default() -> None:
    assert config.from_mapping({}).server.processes == "auto"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (0, 'must be "auto" or at least 1, got 0'),
        (-2, 'must be "auto" or at least 1, got -2'),
        ("many", "expected \"auto\" or a number of processes, got 'many'"),
        ("Auto", "expected \"auto\" or a number of processes, got 'Auto'"),
        ("4", "expected \"auto\" or a number of processes, got '4'"),
        ("", "expected \"auto\" or a number of processes, got ''"),
        (True, 'expected "auto" or a number of processes, got True'),
        (False, 'expected "auto" or a number of processes, got False'),
        (2.0, 'expected "auto" or a number of processes, got 2.0'),
        (1.5, 'expected "auto" or a number of processes, got 1.5'),
        ([2], 'expected "auto" or a number of processes, got [2]'),
    ],
)
def test_the_key_refuses_anything_else(raw: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"server": {"processes": raw}})
    assert (err.value.key, err.value.problem) == ("server.processes", reason)


@pytest.mark.parametrize(("text", "value"), [("auto", "auto"), ("4", 4)])
def test_the_environment_sets_it(text: str, value: Any) -> None:
    assert config.from_mapping({}, {"RELAY_SERVER_PROCESSES": text}).server.processes == value


def test_the_environment_refuses_zero() -> None:
    with pytest.raises(ConfigError) as err:
        config.from_mapping({}, {"RELAY_SERVER_PROCESSES": "0"})
    assert (err.value.key, err.value.problem) == ("server.processes", 'must be "auto" or at least 1, got 0')


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("max 100000", None),  # no quota
        ("max", None),
        ("200000 100000", 2),  # docker run --cpus 2
        ("150000 100000", 2),  # --cpus 1.5: rounded up, the half core is worth a worker
        ("50000 100000", 1),  # --cpus 0.5: still one
        ("1000 100000", 1),
        ("400000 50000", 8),  # another period
        ("300000", 3),  # the period left out: the kernel's 100 ms
        ("100000 100000\n", 1),
        ("", None),
        ("garbage 100000", None),
        ("0 100000", None),
        ("200000 0", None),
    ],
)
def test_cpu_max_is_whole_cores(text: str, cores: int | None) -> None:
    assert parse_cpu_max(text) == cores


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("0::/\n", ""),  # a container with its own cgroup namespace
        ("0::/system.slice/relay.service\n", "system.slice/relay.service"),
        ("12:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n", "docker/abc"),
        ("4:memory:/x\n1:cpu:/\n", None),  # cgroup v1 only
        ("0::/../../user.slice\n", None),  # outside the namespace's root: only the root is visible
        ("", None),
    ],
)
def test_the_own_cgroup_is_the_v2_line(text: str, path: str | None) -> None:
    assert cgroup_path(text) == path


def _cgroup(root: Path, own: str, limits: dict[str, str]) -> Path:
    """A cgroup v2 tree under ``root``: ``limits`` maps a directory to its cpu.max; returns the
    /proc/self/cgroup that puts this process in ``own``."""
    (root / own).mkdir(parents=True, exist_ok=True)
    for directory, cpu_max in limits.items():
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory / "cpu.max").write_text(cpu_max + "\n")
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::/{own}\n")
    return proc


def test_a_container_quota_is_on_the_root(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _cgroup(root, "", {"": "200000 100000"})
    assert cgroup_cpu_quota(root, proc) == 2


def test_a_service_quota_is_on_its_own_cgroup_and_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    own = "system.slice/relay.service"
    proc = _cgroup(root, own, {own: "max 100000", "system.slice": "300000 100000"})
    assert cgroup_cpu_quota(root, proc) == 3
    (root / own / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_quota(root, proc) == 1


def test_no_quota_anywhere_is_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _cgroup(root, "user.slice", {"user.slice": "max 100000"})
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(tmp_path / "nothing", tmp_path / "no-proc-file") is None


def test_auto_is_the_affinity_capped_by_the_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    root = tmp_path / "cgroup"
    proc = _cgroup(root, "", {})
    assert usable_cpus(root, proc) == cores
    (root / "cpu.max").write_text("100000 100000\n")  # --cpus 1
    assert usable_cpus(root, proc) == 1
    (root / "cpu.max").write_text(f"{(cores + 8) * 100000} 100000\n")  # a quota above the cores
    assert usable_cpus(root, proc) == cores
    assert usable_cpus() >= 1  # this machine's own


# -- `relay serve`


def _config(tmp_path: Path, sink_port: int, processes: str = "") -> Path:
    """A real config: every listener on an ephemeral port, all mail to the sink on 127.0.0.2.
    ``processes``: a line for [server], or nothing (the default)."""
    return write_config(
        tmp_path / "relay.toml",
        f"""[server]
hostname = "relay.test"
data_dir = "{tmp_path / "data"}"
{processes}
[smtp]
listen = ["127.0.0.1:0"]
shutdown_grace = "2s"
[http]
listen = "127.0.0.1:0"
[delivery]
retry_schedule = ["200ms"]
shutdown_grace = "1s"
[[routes]]
domains = ["*"]
host = "127.0.0.2"
port = {sink_port}
""",
    )


def _children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def _started(server: ServeProcess) -> tuple[str, set[int]]:
    """The start's "started N processes (why): pids" line, without the pids; and the pids."""
    (line,) = [line for line in server.log if re.search(r"INFO relay\.service\.\w+: started \d+", line)]
    m = re.search(r": (started .*\)): ([\d, ]+)$", line)
    assert m, line
    return m.group(1), {int(pid) for pid in m.group(2).split(", ")}


async def _serve_and_deliver(server: ServeProcess, sink: Any, count: int) -> None:
    rcpts = [f"user{i}@example.com" for i in range(count)]
    await asyncio.gather(*(send_to(server.smtp_port, r) for r in rcpts))
    await wait_for(lambda: len(sink.messages) >= count, timeout=30)
    assert sorted(sink.rcpts) == sorted(rcpts)


async def _stop(server: ServeProcess) -> None:
    server.terminate()
    assert await server.wait() == 0


async def test_the_default_runs_a_worker_per_core_and_delivers(tmp_path: Path) -> None:
    cores = usable_cpus()
    async with sinks("127.0.0.2") as (sink,):
        server = await ServeProcess(_config(tmp_path, sink.port)).start()
        try:
            assert server.proc is not None
            line, pids = _started(server)
            if cores == 1:  # the single-process path: nothing forked
                assert line == "started 1 process (processes = auto: 1 CPU core)"
                assert pids == {server.proc.pid}
                assert _children(server.proc.pid) == set()
            else:
                assert line == f"started {cores} worker processes (processes = auto: {cores} CPU cores)"
                assert _children(server.proc.pid) == pids
                assert len(pids) == cores
            await _serve_and_deliver(server, sink, 20)
        finally:
            await _stop(server)


async def test_the_flag_overrides_the_config(tmp_path: Path) -> None:
    async with sinks("127.0.0.2") as (sink,):
        server = await ServeProcess(_config(tmp_path, sink.port, "processes = 3"), "--processes", "1").start()
        try:
            assert server.proc is not None
            assert _started(server) == ("started 1 process (--processes 1)", {server.proc.pid})
            assert _children(server.proc.pid) == set()
            await _serve_and_deliver(server, sink, 5)
        finally:
            await _stop(server)


async def test_a_count_in_the_config_without_the_flag(tmp_path: Path) -> None:
    async with sinks("127.0.0.2") as (sink,):
        server = await ServeProcess(_config(tmp_path, sink.port, "processes = 2")).start()
        try:
            assert server.proc is not None
            line, pids = _started(server)
            assert line == "started 2 worker processes (processes = 2)"
            assert _children(server.proc.pid) == pids
            assert len(pids) == 2
            await _serve_and_deliver(server, sink, 10)
        finally:
            await _stop(server)


@pytest.mark.parametrize("flag", ["0", "-1"])
async def test_the_flag_refuses_less_than_one(tmp_path: Path, flag: str) -> None:
    code, out, err = await relay_cli("serve", "--config", str(_config(tmp_path, 9)), "--processes", flag)
    assert (code, out) == (2, "")
    assert err.splitlines() == ["relay: --processes must be at least 1"]
    assert not (tmp_path / "data").exists()


async def test_a_bad_key_stops_serve_with_the_config_error(tmp_path: Path) -> None:
    code, out, err = await relay_cli("serve", "--config", str(_config(tmp_path, 9, "processes = 0")))
    assert (code, out) == (2, "")
    assert err.splitlines() == ['relay: config error: server.processes: must be "auto" or at least 1, got 0']
