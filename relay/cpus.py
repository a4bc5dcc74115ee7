"""How many CPU cores this process may use: what ``[server] processes = "auto"`` becomes.

Not ``os.cpu_count()`` alone: a process pinned to some cores (taskset, a cpuset) or held to a
CPU quota (``docker run --cpus 2``, systemd ``CPUQuota=200%``) would otherwise start a worker
per core of the host, and the workers would take turns on the cores it really has.
A module of its own, not part of ``relay.config``: loading the configuration (every command
does) reads no system files; ``relay serve`` counts once, when it starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """The cores this process may run on (its affinity), capped by its cgroup v2 CPU quota; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """The tightest ``cpu.max`` of this process's cgroup (v2) and its ancestors, in whole cores;
    None without one. In a container with its own cgroup namespace (Docker's default on cgroup
    v2) the process's cgroup is the root, ``/sys/fs/cgroup/cpu.max`` itself; a systemd service's
    ``CPUQuota=`` is on its own cgroup below the root."""
    try:
        own = cgroup_path(proc_self_cgroup.read_text())
    except OSError:
        own = None
    directories = [cgroup_root]
    if own and (cgroup_root / own).is_dir():
        parts = Path(own).parts
        directories += [cgroup_root.joinpath(*parts[:depth]) for depth in range(1, len(parts) + 1)]
    quotas = [quota for directory in directories if (quota := _cpu_max(directory)) is not None]
    return min(quotas, default=None)


def _cpu_max(directory: Path) -> int | None:
    try:
        return parse_cpu_max((directory / "cpu.max").read_text())
    except OSError:  # no such file: no cpu controller there, or not cgroup v2
        return None


def cgroup_path(proc_self_cgroup: str) -> str | None:
    """The cgroup v2 path in ``/proc/self/cgroup`` (its "0::/path" line), relative; None without one."""
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and path.startswith("/"):
            relative = path.strip().lstrip("/")
            # "/.." when the process sits outside the namespace's root: the root is all we see.
            return None if ".." in relative.split("/") else relative
    return None


def parse_cpu_max(text: str) -> int | None:
    """cgroup v2 ``cpu.max``, "QUOTA PERIOD" in microseconds: ceil(quota / period) cores (at
    least 1), so that 1.5 CPUs run 2 workers; None for "max" (no quota) or text that is not one."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000  # the kernel's default period
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))
