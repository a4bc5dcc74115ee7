"""``relay serve --processes N``: N worker processes sharing the listening sockets.

The parent binds the listeners, has a short-lived child apply migrations, forks the workers
and supervises them; it never imports the heavy modules itself, so it stays small.
Each worker is a whole Relay (intake, delivery) on the shared store; the kernel hands each
new connection to one of them. SIGTERM/SIGINT to the parent is passed on to the workers,
which shut down gracefully. A worker that dies unexpectedly stops the others, and the
parent exits 1 so that the service manager can restart the whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable

from relay.config import Config
from relay.listeners import bind, bound_address

log = logging.getLogger(__name__)


def _upgrade(config: Config) -> int:
    import asyncio

    from relay.logstore import LogStore

    async def upgrade() -> int:
        store = await LogStore.open(config.store.url)
        try:
            await store.upgrade()
        finally:
            await store.close()
        return 0

    return asyncio.run(upgrade())


def _worker(config: Config, smtp: list[socket.socket], http: list[socket.socket]) -> int:
    from relay import server

    return server.run(lambda: server.serve(config, smtp_sockets=smtp, http_sockets=http, upgrade=False, quiet=True))


def _in_child(fn: Callable[[], int]) -> int:
    """Run fn in a forked child; return its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        except BaseException:
            log.exception("failed")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def serve(config: Config, processes: int) -> int:
    if _in_child(lambda: _upgrade(config)) != 0:
        log.critical("database migration failed")
        return 1
    sockets = [bind(listen) for listen in config.smtp.listen]
    http = [bind(config.http.listen)]
    for sock in sockets:
        log.info("smtp listening on %s", bound_address(sock))
    log.info("http listening on %s", bound_address(http[0]))
    # Workers write their metrics here; /metrics in any of them merges all (prometheus_client).
    metrics_dir = config.data_dir / f"metrics-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    children: dict[int, int] = {}
    for index in range(processes):
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = _worker(config, list(sockets), list(http))
            finally:
                os._exit(code)
        children[pid] = index
    for sock in (*sockets, *http):
        sock.close()
    log.info("started %d worker processes: %s", processes, ", ".join(map(str, children)))
    log.info("relay ready")
    try:
        return _supervise(children)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(children: dict[int, int]) -> int:
    stopping = False
    first_signal = 0.0

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping, first_signal
        if stopping:
            if time.monotonic() - first_signal > 1.0:  # a later signal, not the same stop twice
                for pid in children:
                    _kill(pid, signal.SIGKILL)
            return
        stopping = True
        first_signal = time.monotonic()
        log.info("received %s; stopping workers", signal.Signals(signum).name)
        for pid in children:
            _kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        exit_code = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.critical("worker %s (pid %d) exited with %d; stopping the others", index, pid, exit_code)
            stopping = True
            code = 1
            for other in children:
                _kill(other, signal.SIGTERM)
        elif exit_code != 0:
            code = 1
    log.info("stopped")
    return code


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
