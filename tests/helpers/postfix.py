"""A private Postfix instance on loopback, as a real peer that queues mail and writes its own
DSNs: its own config directory, queue and data directories under one temp dir, chroot off,
no DNS, and a transport map that says where each domain's mail goes. The system instance
(/etc/postfix) is never touched. Needs Debian's postfix package and root."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None)

# Only what relaying and bouncing needs; "n" in the chroot column (the 5th) everywhere, since
# the queue lives in a temp dir with no chroot tree set up.
MASTER_CF = """\
{ip}:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def unavailable() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    if POSTFIX is None:
        return "the postfix binary is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


def free_port(ip: str) -> int:
    """A port nothing listens on at ip now (Relay's [delivery] port must be fixed before Postfix starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Postfix:
    ip: str
    port: int
    hostname: str
    root: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def maillog(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    async def run(self, *args: str) -> tuple[int, str]:
        """Run `postfix -c DIR ARGS`; its exit code and output."""
        assert POSTFIX is not None
        proc = await asyncio.create_subprocess_exec(
            POSTFIX, "-c", str(self.config_dir), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode(errors="replace")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def _main_cf(root: Path, hostname: str, transports: dict[str, str], settings: dict[str, str]) -> str:
    transport_map = ", ".join(f"{domain}={nexthop}" for domain, nexthop in transports.items())
    values = {
        "compatibility_level": "3.6",
        "myhostname": hostname,
        "mydomain": hostname.partition(".")[2] or hostname,
        "myorigin": "$myhostname",
        "mydestination": "",
        # inet_interfaces must name an address configured on an interface: 127.0.0.1 is, other
        # 127.0.0.x are not; the smtpd's own address comes from its master.cf service name.
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relay_domains": ",".join(d for d in transports if d != "*"),
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtp_dns_support_level": "disabled",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "transport_maps": f"inline:{{ {transport_map} }}",
        # retry fast, so a test sees a second attempt (and a delay notice) in seconds
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtp_connect_timeout": "5s",
        "notify_classes": "",
        **settings,
    }
    return "".join(f"{k} = {v}\n" for k, v in values.items())


@contextlib.asynccontextmanager
async def postfix(
    ip: str, port: int, transports: dict[str, str], *, hostname: str = "postfix.test", **settings: str
) -> AsyncIterator[Postfix]:
    """A running private Postfix whose smtpd listens on ip:port and relays each domain in
    ``transports`` (domain -> nexthop such as ``smtp:[127.0.0.2]:2525``); stopped and removed
    on exit, also when the test fails. ``settings`` add to or override main.cf."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    # The postfix user must reach the queue: no pytest tmp_path (under a 0700 directory).
    root = Path(tempfile.mkdtemp(prefix="relay-postfix-", dir="/tmp"))
    root.chmod(0o755)
    pf = Postfix(ip, port, hostname, root)
    try:
        pf.config_dir.mkdir()
        (root / "queue").mkdir(mode=0o755)  # root-owned; `postfix start` creates its subdirectories
        (root / "data").mkdir(mode=0o700)
        user = pwd.getpwnam("postfix")
        os.chown(root / "data", user.pw_uid, user.pw_gid)
        (pf.config_dir / "main.cf").write_text(_main_cf(root, hostname, transports, settings))
        (pf.config_dir / "master.cf").write_text(MASTER_CF.format(ip=ip, port=port))
        code, out = await pf.run("start")
        if code != 0:
            raise RuntimeError(f"postfix start failed ({code}): {out}\n{pf.maillog}")
        yield pf
    finally:
        await _stop(pf)
        log = pf.maillog
        if log:
            print(f"--- postfix maillog ({root}) ---\n{log}")  # shown by pytest when the test fails
        shutil.rmtree(root, ignore_errors=True)


async def _stop(pf: Postfix) -> None:
    pid = pf.master_pid()
    if pid is None:
        return
    await pf.run("stop")
    if await _exited(pid, 5.0):
        return
    await pf.run("abort")
    if not await _exited(pid, 2.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await _exited(pid, 2.0)


async def _exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        # master daemonized, so it is not our child: a zombie (Z) until init reaps it is gone
        if stat.rpartition(")")[2].split()[0] == "Z":
            return True
        await asyncio.sleep(0.02)
    return False
