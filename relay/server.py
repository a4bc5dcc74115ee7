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
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from relay import tracking
from relay.auth import Authenticator
from relay.config import Config, Listen
from relay.delivery import DeliveryEngine
from relay.errors import RelayError, one_line
from relay.http import HttpContext, HttpServer, create_app
from relay.listeners import StartError, bind, bound_address, check_tls, warn_if_tracking_loopback
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
        self.http: HttpServer | None = None
        self.tracking_http: HttpServer | None = None  # the public side, with [tracking] listen
        self.smtp_addresses: list[Listen] = []
        self.http_address: Listen | None = None
        self.tracking_address: Listen | None = None
        self._delivery_task: asyncio.Task[Any] | None = None
        self.failed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def startup(
        self,
        *,
        smtp_sockets: Sequence[socket.socket] | None = None,
        http_sockets: Sequence[socket.socket] | None = None,
        tracking_sockets: Sequence[socket.socket] | None = None,
        upgrade: bool = True,
        deliver: bool = True,
        announce: bool = True,
    ) -> None:
        """Open the store, then listen, then deliver: delivery starts only once every listener
        serves. On failure, what has started is stopped and the error raised (a RelayError,
        one line, for anything expected)."""
        try:
            await self._startup(smtp_sockets, http_sockets, tracking_sockets, upgrade=upgrade, deliver=deliver)
        except BaseException as exc:
            await self._stop_started()
            if isinstance(exc, RelayError | asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            raise StartError(f"cannot start: {one_line(exc)}") from exc
        if announce:
            for address in self.smtp_addresses:
                log.info("smtp listening on %s", address)
            log.info("http listening on %s", self.http_address)
            if self.tracking_address is not None:
                log.info("tracking listening on %s", self.tracking_address)

    async def _startup(
        self,
        smtp_sockets: Sequence[socket.socket] | None,
        http_sockets: Sequence[socket.socket] | None,
        tracking_sockets: Sequence[socket.socket] | None,
        *,
        upgrade: bool,
        deliver: bool,
    ) -> None:
        config = self.config
        self.store = store = await LogStore.open(config.store.url)
        if upgrade:
            await store.upgrade()
        signer = tracking.TokenSigner(tracking_secret(config))
        if smtp_sockets is None:  # else listeners.prepare has bound them and checked the TLS files
            check_tls(config)  # a readable error here rather than an ssl traceback below
            smtp_sockets = [bind(listen) for listen in config.smtp.listen]
        self.smtp = SmtpServer(config, store, Authenticator(store.password_hash))
        http_socks = list(http_sockets) if http_sockets is not None else [bind(config.http.listen)]
        if tracking_sockets is None and config.tracking.listen is not None:
            tracking_sockets = [bind(config.tracking.listen)]
        self.smtp_addresses = await self.smtp.start(smtp_sockets)
        context = HttpContext(config, store, signer, self._not_ready, self._wake_delivery)
        # With [tracking] listen, /t/... are served there and only there; the private side
        # (metrics, health, API) never on the public listener.
        separate = tracking_sockets is not None
        self.http = HttpServer(create_app(context, public=not separate))
        await self.http.start(http_socks)
        self.http_address = bound_address(http_socks[0])
        if tracking_sockets is not None:
            tracking_socks = list(tracking_sockets)
            self.tracking_http = HttpServer(create_app(context, private=False))
            await self.tracking_http.start(tracking_socks)
            self.tracking_address = bound_address(tracking_socks[0])
        if deliver:
            # Tracking is off until [tracking] base_url says where recipients reach Relay: then
            # no Tracker, and even mail queued with tracking on goes out unchanged.
            tracker = tracking.Tracker(config.tracking.base_url, signer) if config.tracking.enabled else None
            transport = Transport(config, MxResolver(config.dns))
            self.delivery = DeliveryEngine(config, store, transport, tracker)
            self._delivery_task = self.spawn(self.delivery.run(), "delivery")

    async def _stop_started(self) -> None:
        """After a failed start: stop what did start, quietly (the error says it all)."""
        with contextlib.suppress(Exception):
            if self.smtp is not None:
                await self.smtp.shutdown(0)
            for http in (self.http, self.tracking_http):
                if http is not None:
                    await http.shutdown()
            if self.store is not None:
                await self.store.close()

    def _not_ready(self) -> list[str]:
        problems = []
        if self.smtp is None or not self.smtp.listening:
            problems.append("smtp not listening")
        if self._delivery_task is not None and self._delivery_task.done():
            problems.append("delivery stopped")
        return problems

    def _wake_delivery(self) -> None:
        if self.delivery is not None:
            self.delivery.wake()

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
        for http in (self.http, self.tracking_http):
            if http is not None:
                await http.shutdown()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        log.info("stopped")


async def serve(
    config: Config,
    *,
    smtp_sockets: Sequence[socket.socket] | None = None,
    http_sockets: Sequence[socket.socket] | None = None,
    tracking_sockets: Sequence[socket.socket] | None = None,
    upgrade: bool = True,
    quiet: bool = False,
    ready_fd: int | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code. ``quiet``: a worker of ``--processes``,
    whose parent announces the listeners and readiness; it reports its start on ``ready_fd``
    ("ready", or "error <one line>") and then closes it. Otherwise a failed start raises."""
    relay = Relay(config)
    stop = asyncio.Event()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    first_signal = 0.0

    def on_signal(signum: int) -> None:
        nonlocal first_signal
        if stop.is_set():
            # The same stop can arrive twice at once (the service manager signals the whole
            # process group, and the --processes parent passes it on): only a later one forces.
            if time.monotonic() - first_signal > 1.0:
                log.warning("second signal: exiting now")
                if main is not None:
                    main.cancel()
            return
        first_signal = time.monotonic()
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await relay.startup(
                smtp_sockets=smtp_sockets, http_sockets=http_sockets, tracking_sockets=tracking_sockets,
                upgrade=upgrade, announce=not quiet,
            )  # fmt: skip
        except RelayError as exc:
            if ready_fd is None:
                raise
            _report(ready_fd, f"error {one_line(exc)}")
            return 1
        if ready_fd is not None:
            _report(ready_fd, "ready")
        # Start-up objects (modules, compiled SQL, config) never die: keep them out of the
        # collector's way, and collect young objects less often (a p99 latency measure).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        if not quiet:
            warn_if_tracking_loopback(config)
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


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):  # the parent may be gone
        os.write(fd, line.encode(errors="replace") + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)


def tracking_secret(config: Config) -> bytes:
    """[tracking] secret, or the one generated into data_dir on first start."""
    if config.tracking.secret:
        return config.tracking.secret.encode()
    path = config.data_dir / "tracking.secret"
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        log.info("generated a tracking secret in %s", path)
    for _ in range(50):  # another process may be writing it right now
        text = path.read_text().strip()
        if text:
            return text.encode()
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty")


def run(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro_fn())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_fn())
