"""The service's lifecycle: startup -> serve -> shutdown(grace).

SIGTERM or SIGINT starts a graceful shutdown: listeners close, sessions in a transaction
finish (bounded by ``[smtp] shutdown_grace``), delivery stops claiming and gives back what it
has not started. A second signal exits at once. A background task that crashes stops the
process with exit code 1 instead of dying silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from relay.auth import Authenticator
from relay.config import Config, Listen
from relay.delivery import DeliveryEngine
from relay.logstore import LogStore
from relay.mx import MxResolver
from relay.smtp_in import SmtpServer
from relay.transport import Transport

log = logging.getLogger(__name__)


class Relay:
    """Owns the store, the SMTP listeners and the background tasks of one process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: LogStore | None = None
        self.smtp: SmtpServer | None = None
        self.delivery: DeliveryEngine | None = None
        self.smtp_addresses: list[Listen] = []
        self.failed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def startup(
        self,
        *,
        smtp_sockets: Sequence[socket.socket] | None = None,
        upgrade: bool = True,
        deliver: bool = True,
        announce: bool = True,
    ) -> None:
        self.store = store = await LogStore.open(self.config.store.url)
        if upgrade:
            await store.upgrade()
        if deliver:
            self.delivery = DeliveryEngine(self.config, store, Transport(self.config, MxResolver(self.config.dns)))
            self.spawn(self.delivery.run(), "delivery")
        self.smtp = SmtpServer(self.config, store, Authenticator(store.password_hash))
        self.smtp_addresses = await self.smtp.start(smtp_sockets)
        for address in self.smtp_addresses if announce else ():
            log.info("smtp listening on %s", address)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background task that must not die: if it crashes, the process stops."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.critical("background task %s crashed; stopping", task.get_name(), exc_info=task.exception())
            self.failed.set()

    async def shutdown(self) -> None:
        log.info("shutting down")
        if self.smtp is not None:
            await self.smtp.shutdown(self.config.smtp.shutdown_grace)
        if self.delivery is not None:
            await self.delivery.shutdown(self.config.delivery.shutdown_grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        log.info("stopped")


async def serve(
    config: Config, *, smtp_sockets: Sequence[socket.socket] | None = None, upgrade: bool = True, quiet: bool = False
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code. ``quiet``: a worker of ``--processes``,
    whose parent announces the listeners and readiness."""
    relay = Relay(config)
    stop = asyncio.Event()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            if main is not None:
                main.cancel()
            return
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await relay.startup(smtp_sockets=smtp_sockets, upgrade=upgrade, announce=not quiet)
        # Start-up objects (modules, compiled SQL, config) never die: keep them out of the
        # collector's way, and collect young objects less often (a p99 latency measure).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        if not quiet:
            log.info("relay ready")
        waiters = [loop.create_task(stop.wait()), loop.create_task(relay.failed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        await relay.shutdown()
        return 1 if relay.failed.is_set() else 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


def run(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro_fn())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_fn())
