"""A private PostgreSQL 15 server for one test: one that the test may stop, restart or cut off
without disturbing the machine's shared server (127.0.0.1:5432) that every other test uses.

``initdb`` refuses to run as root, so when the tests run as root the server belongs to the
``postgres`` OS user (``runuser``), in a directory of its own under /tmp that it owns. Trust
auth, fsync off (nothing here must survive a power cut), unix sockets in that directory, TCP on
127.0.0.1 at an ephemeral port.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(os.environ.get("RELAY_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One private server: ``start``, ``stop(mode)``, ``restart``, ``terminate_backends``, ``url``."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port
        self.logfile = root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False)

    def init(self) -> None:
        done = self._run(
            str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
            "--encoding=UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr or done.stdout}")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                # fsync off: a commit still reaches the kernel before it is acknowledged, so
                # killing the server (stop -m immediate) loses nothing; only an OS crash would.
                # synchronous_commit stays on: off, an immediate stop loses acknowledged commits.
                "fsync = off\nfull_page_writes = off\n"
                "max_connections = 100\nshared_buffers = 32MB\n"
            )

    def start(self) -> None:
        done = self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "30", "start")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr or done.stdout}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: backends terminated, a clean shutdown; ``immediate``: every process killed
        at once (recovery at the next start, as after a crash)."""
        done = self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        if done.returncode != 0 and self.running():
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr or done.stdout}")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "status").returncode == 0

    def psql(self, sql: str) -> str:
        done = self._run(
            str(BIN / "psql"), "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def terminate_backends(self) -> int:
        """Cut every client connection (pg_terminate_backend): the cheap outage. The number cut."""
        out = self.psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return int(out.strip() or 0)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """Certain cleanup: an immediate stop, then SIGKILL of the postmaster if it is still there."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split("\n", 1)[0])
            os.kill(pid, 9)


@contextlib.contextmanager
def pg_server() -> Iterator[PgServer]:
    """A started private server, killed and removed afterwards whatever happened. Skips when
    PostgreSQL's binaries (or the ``postgres`` user, when running as root) are missing."""
    if not (BIN / "initdb").exists():
        pytest.skip(f"no initdb in {BIN} (apt-get install postgresql-15)")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user for initdb")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and there is no runuser")
    root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    root.chmod(0o755)  # postgres reaches its directory below; the socket directory is root itself
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    server = PgServer(root, _free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)
