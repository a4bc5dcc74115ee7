"""``relay serve`` with N > 1 processes (``[server] processes``, by default one per CPU core, or
``--processes N``): N worker processes sharing the listening sockets.

The parent binds every listener, has a short-lived child apply migrations, forks the workers,
waits until each reports that it is ready (or prints the first one's error, one line, and
stops the others) and supervises them; it never imports the heavy modules itself, so it
stays small.
Each worker is a whole Relay (intake, delivery) on the shared store; the kernel hands each
new connection to one of them. SIGTERM/SIGINT to the parent is passed on to the workers,
which shut down gracefully. A worker that dies unexpectedly stops the others, and the
parent exits 1 so that the service manager can restart the whole. A parent that dies (even
by SIGKILL) takes its workers along: each gets SIGTERM from the kernel and stops gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import sys
from collections.abc import Callable

from relay.config import Config
from relay.errors import StartError, one_line
from relay.net import bound_address
from relay.service.listeners import Sockets, prepare, warn_if_tracking_loopback
from relay.service.signals import StopSignals

log = logging.getLogger(__name__)


def _upgrade(config: Config) -> str | None:
    """Apply the migrations; None, or what went wrong in one line."""
    import asyncio

    from relay.errors import RelayError
    from relay.logstore import LogStore

    async def upgrade() -> None:
        store = await LogStore.open(config.store.url)
        try:
            await store.upgrade()
        finally:
            await store.close()

    try:
        asyncio.run(upgrade())
    except RelayError as exc:
        return one_line(exc)
    except Exception as exc:  # e.g. PostgreSQL refusing the connection (OSError)
        return f"cannot open the store: {one_line(exc)}"
    return None


def _worker(config: Config, sockets: Sockets, ready_fd: int) -> int:
    from relay.service import lifecycle

    return lifecycle.run(
        lambda: lifecycle.serve(
            config, smtp_sockets=sockets.smtp, http_sockets=sockets.http, tracking_sockets=sockets.tracking,
            bounce_sockets=sockets.bounces, smtp_tls_sockets=sockets.smtp_tls,
            upgrade=False, quiet=True, ready_fd=ready_fd,
        )
    )  # fmt: skip


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM (a graceful stop) when the parent dies, even by SIGKILL: an
    orphaned worker would keep the listeners and its leases with nobody supervising it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _in_child(fn: Callable[[], str | None]) -> str | None:
    """Run fn in a forked child (so that the parent never imports the heavy modules); return
    its error line, passed back through a pipe, or None."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 1
        try:
            error = fn()
            if error is not None:
                os.write(write_end, error.encode(errors="replace"))
            code = 0 if error is None else 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return message or f"start-up child exited with {os.waitstatus_to_exitcode(status)}"


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def serve(config: Config, processes: int, sockets: Sockets | None = None, *, why: str = "") -> int:
    """Bind (unless given the sockets), migrate, fork the workers; "relay ready" once every
    worker is. Anything that fails before then raises StartError (one line) and stops the rest.
    ``why``: where the number of processes came from, for the start's line."""
    if sockets is None:
        sockets = prepare(config)
    try:
        error = _in_child(lambda: _upgrade(config))
        if error is not None:
            raise StartError(error)
        # Workers write their metrics here; /metrics in any of them merges all (prometheus_client).
        metrics_dir = config.data_dir / f"metrics-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(mode=0o700, parents=True)
    except BaseException:
        sockets.close()
        raise
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        return _run_workers(config, processes, sockets, why)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_workers(config: Config, processes: int, sockets: Sockets, why: str) -> int:
    children: dict[int, int] = {}
    ready_pipes: dict[int, int] = {}  # read end -> worker index
    # A signal that arrives while forking waits until the handler that passes it on to every
    # child is in place (a child forked after it would otherwise never hear of it).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    parent = os.getpid()
    try:
        for index in range(processes):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    for fd in ready_pipes:
                        os.close(fd)
                    os.close(read_end)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                    _die_with_parent(parent)
                    code = _worker(config, sockets, write_end)
                except BaseException as exc:  # report it: the parent prints the one line
                    with contextlib.suppress(OSError):
                        os.write(write_end, f"error cannot start: {one_line(exc)}\n".encode(errors="replace"))
                finally:
                    os._exit(code)
            os.close(write_end)
            children[pid] = index
            ready_pipes[read_end] = index
        addresses = [("smtp", bound_address(sock)) for sock in sockets.smtp]
        addresses.extend(("smtps", bound_address(sock)) for sock in sockets.smtp_tls)
        addresses.append(("http", bound_address(sockets.http[0])))
        if sockets.tracking:
            addresses.append(("tracking", bound_address(sockets.tracking[0])))
        addresses.extend(("bounces", bound_address(sock)) for sock in sockets.bounces)
        sockets.close()  # the workers have them
        supervisor = _Supervisor(children)
        supervisor.install()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    error = _wait_ready(ready_pipes, supervisor)
    if error is not None:
        supervisor.stop()
        supervisor.wait(quiet=True)  # the error line is all there is to say
        raise StartError(error)
    if not supervisor.stopping:
        for name, address in addresses:
            log.info("%s listening on %s", name, address)
        reason = f" ({why})" if why else ""
        log.info("started %d worker processes%s: %s", processes, reason, ", ".join(map(str, children)))
        warn_if_tracking_loopback(config)
        log.info("relay ready")
    return supervisor.wait()


def _wait_ready(pipes: dict[int, int], supervisor: _Supervisor) -> str | None:
    """Wait until every worker has said "ready"; the first error line otherwise."""
    error: str | None = None
    buffers = {fd: b"" for fd in pipes}
    while buffers:
        readable, _, _ = select.select(list(buffers), [], [])
        for fd in readable:
            chunk = os.read(fd, 4096)
            buffers[fd] += chunk
            if chunk and b"\n" not in buffers[fd]:
                continue
            line = buffers.pop(fd).decode(errors="replace").strip()
            os.close(fd)
            if line == "ready":
                continue
            if error is None and not supervisor.stopping:
                index = pipes[fd]
                error = line.removeprefix("error ") if line else f"worker {index} exited before it was ready"
    return error


class _Supervisor:
    """Passes SIGTERM/SIGINT on to the workers; waits for them; a worker that exits on its own
    stops the others, and the parent then exits 1."""

    def __init__(self, children: dict[int, int]) -> None:
        self.children = children
        self.signals = StopSignals(self._on_signal, self._kill_all)

    @property
    def stopping(self) -> bool:
        return self.signals.stopping

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.signals)
        signal.signal(signal.SIGINT, self.signals)

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("received %s; stopping workers", signum.name)
        self._terminate()

    def _kill_all(self) -> None:
        for pid in self.children:
            _kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        self.signals.stop_without_signal()
        self._terminate()

    def _terminate(self) -> None:
        for pid in self.children:
            _kill(pid, signal.SIGTERM)

    def wait(self, *, quiet: bool = False) -> int:
        code = 0
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = self.children.pop(pid, None)
            exit_code = os.waitstatus_to_exitcode(status)
            if not self.stopping:
                log.critical("worker %s (pid %d) exited with %d; stopping the others", index, pid, exit_code)
                code = 1
                self.stop()
            elif exit_code != 0 and -exit_code not in _STOP_SIGNALS:
                # A worker still starting when the stop came has no handler yet and dies of
                # the passed-on signal itself: that is a clean stop too.
                code = 1
        if not quiet:
            log.info("stopped")
        return code


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
