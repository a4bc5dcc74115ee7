"""The service's lifecycle: startup -> serve -> shutdown(grace).

Start-up runs under one ``AsyncExitStack``: every step that starts something registers how to
stop it, so a failure at any step stops exactly what had started, in reverse, and shutdown is
that same stack unwound. The steps start the store, the HTTP listeners, delivery and SMTP in
that order, so that they stop as the service always has: SMTP stops listening and lets
sessions in a transaction finish (bounded by ``[smtp] shutdown_grace``), delivery stops
claiming and gives back what it has not started, HTTP closes, the store closes last.

SIGTERM or SIGINT starts that shutdown; a later signal exits at once (``signals``). A
background task that crashes stops the process with exit code 1 instead of dying silently.
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
from typing import TYPE_CHECKING, Any

from relay import tracking
from relay.auth import Authenticator
from relay.bounces.inbound import BounceInbox
from relay.bounces.verp import ReturnPath
from relay.config import Config, Listen
from relay.console.web import console_key
from relay.delivery import DeliveryEngine
from relay.errors import RelayError, StartError, one_line
from relay.http import HttpContext, HttpServer, create_app
from relay.logstore import LogStore
from relay.mx import MxResolver
from relay.net import bind, bound_address
from relay.service.confirmations import CaseConfirmer
from relay.service.heartbeat import Heartbeat
from relay.service.listeners import check_tls, warn_if_tracking_loopback
from relay.service.retention import RetentionService
from relay.service.signals import StopSignals
from relay.smtp_in import BounceServer, SmtpServer
from relay.transport import Transport
from relay.webhooks import Dispatcher

if TYPE_CHECKING:
    from relay.dkim import Signer
    from relay.store.wakeups import Wakeups

log = logging.getLogger(__name__)


class Relay:
    """Owns the store, the listeners and the background tasks of one process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: LogStore | None = None
        self.smtp: SmtpServer | None = None
        self.delivery: DeliveryEngine | None = None
        self.http: HttpServer | None = None
        self.tracking_http: HttpServer | None = None  # the public side, with [tracking] listen
        self.bounces: BounceServer | None = None  # the bounce listener, with [bounces] listen
        self.webhooks: Dispatcher | None = None  # with [[webhooks]], beside delivery
        self.heartbeat: Heartbeat | None = None  # the node registry, beside delivery
        self.wakeups: Wakeups | None = None  # PostgreSQL LISTEN, beside delivery
        self.smtp_addresses: list[Listen] = []
        self.http_address: Listen | None = None
        self.tracking_address: Listen | None = None
        self.bounce_addresses: list[Listen] = []
        self.smtp_tls_addresses: list[Listen] = []  # [smtp] listen_tls: implicit TLS submission
        self.failed = asyncio.Event()
        self._delivery_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stack = contextlib.AsyncExitStack()  # how to stop what has started, newest first

    @property
    def delivery_task(self) -> asyncio.Task[Any] | None:
        """The task running delivery (None when this Relay does not deliver)."""
        return self._delivery_task

    async def startup(
        self,
        *,
        smtp_sockets: Sequence[socket.socket] | None = None,
        http_sockets: Sequence[socket.socket] | None = None,
        tracking_sockets: Sequence[socket.socket] | None = None,
        bounce_sockets: Sequence[socket.socket] | None = None,
        smtp_tls_sockets: Sequence[socket.socket] | None = None,
        upgrade: bool = True,
        deliver: bool = True,
        announce: bool = True,
    ) -> None:
        """Open the store, then listen, then deliver, then take mail. On failure, what has
        started is stopped and the error raised (a RelayError, one line, for anything expected)."""
        try:
            await self._startup(
                smtp_sockets, http_sockets, tracking_sockets, bounce_sockets, smtp_tls_sockets,
                upgrade=upgrade, deliver=deliver,
            )  # fmt: skip
        except BaseException as exc:
            with contextlib.suppress(Exception):  # quietly: the start's error says it all
                await self._stack.aclose()
            if isinstance(exc, RelayError | asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            raise StartError(f"cannot start: {one_line(exc)}") from exc
        if announce:
            for address in self.smtp_addresses:
                log.info("smtp listening on %s", address)
            for address in self.smtp_tls_addresses:
                log.info("smtp (implicit TLS) listening on %s", address)
            log.info("http listening on %s", self.http_address)
            if self.tracking_address is not None:
                log.info("tracking listening on %s", self.tracking_address)
            for address in self.bounce_addresses:
                log.info("bounces listening on %s", address)

    async def _startup(
        self,
        smtp_sockets: Sequence[socket.socket] | None,
        http_sockets: Sequence[socket.socket] | None,
        tracking_sockets: Sequence[socket.socket] | None,
        bounce_sockets: Sequence[socket.socket] | None,
        smtp_tls_sockets: Sequence[socket.socket] | None,
        *,
        upgrade: bool,
        deliver: bool,
    ) -> None:
        config = self.config
        stack = self._stack
        dkim_signer = None
        if deliver and config.dkim:  # each key read once, here: a bad one fails the start first
            from relay import dkim

            dkim_signer = dkim.Signer(dkim.load_keys(config))
        self.store = store = await LogStore.open(config.store.url, webhooks=config.webhooks, delivery=config.delivery)
        stack.push_async_callback(store.close)
        stack.push_async_callback(self._cancel_tasks)
        if upgrade:
            await store.upgrade()
        signer_secret = tracking_secret(config)
        signer = tracking.TokenSigner(signer_secret)

        # Every listener bound (unless given: listeners.prepare has bound them and checked the
        # TLS files), each closed again if a later step fails.
        if smtp_sockets is None:
            check_tls(config)  # a readable error here rather than an ssl traceback below
            smtp_sockets = [stack.enter_context(bind(listen)) for listen in config.smtp.listen]
        if smtp_tls_sockets is None:
            smtp_tls_sockets = [stack.enter_context(bind(listen)) for listen in config.smtp.listen_tls]
        http_socks = list(http_sockets) if http_sockets is not None else [stack.enter_context(bind(config.http.listen))]
        if tracking_sockets is None and config.tracking.listen is not None:
            tracking_sockets = [stack.enter_context(bind(config.tracking.listen))]
        if bounce_sockets is None:
            bounce_sockets = [stack.enter_context(bind(listen)) for listen in config.bounces.listen]
        # The return path's tokens are signed with the tracking secret (their own HMAC context).
        return_path = ReturnPath(signer_secret, config.bounces.domain) if config.bounces.enabled else None
        self.smtp = smtp = SmtpServer(config, store, Authenticator(store.password_hash))

        # With [tracking] listen, /t/... are served there and only there; the private side
        # (metrics, health, API) never on the public listener. The public side starts first
        # so that it stops last.
        context = HttpContext(
            config, store, signer, self._not_ready, self._wake_delivery, console_key=console_key(signer_secret)
        )
        if tracking_sockets is not None:
            tracking_socks = list(tracking_sockets)
            self.tracking_http = tracking_http = HttpServer(create_app(context, private=False))
            stack.push_async_callback(tracking_http.shutdown)
            await tracking_http.start(tracking_socks)
            self.tracking_address = bound_address(tracking_socks[0])
        self.http = http = HttpServer(create_app(context, public=tracking_sockets is None))
        stack.push_async_callback(http.shutdown)
        await http.start(http_socks)
        self.http_address = bound_address(http_socks[0])

        if deliver:
            await self._start_delivery(store, signer, return_path, dkim_signer)

        if return_path is not None and bounce_sockets:
            self.bounces = bounces = BounceServer(config, store, BounceInbox(config, store, return_path))
            stack.push_async_callback(bounces.shutdown, config.smtp.shutdown_grace)
            self.bounce_addresses = await bounces.start(bounce_sockets)

        # Last to start, first to stop: SMTP stops taking mail before delivery stops.
        stack.push_async_callback(smtp.shutdown, config.smtp.shutdown_grace)
        addresses = await smtp.start(smtp_sockets, smtp_tls_sockets)
        self.smtp_addresses = addresses[: len(smtp_sockets)]
        self.smtp_tls_addresses = addresses[len(smtp_sockets) :]

    async def _start_delivery(
        self,
        store: LogStore,
        signer: tracking.TokenSigner,
        return_path: ReturnPath | None,
        dkim_signer: Signer | None,
    ) -> None:
        config = self.config
        # Tracking is off until [tracking] base_url says where recipients reach Relay: then
        # no Tracker, and even mail queued with tracking on goes out unchanged.
        tracker = tracking.Tracker(config.tracking.base_url, signer) if config.tracking.enabled else None
        transport = Transport(config, MxResolver(config.dns))
        self.delivery = delivery = DeliveryEngine(config, store, transport, tracker, return_path, signer=dkim_signer)
        # This node in the registry: stopped after delivery has given its leases back.
        self.heartbeat = heartbeat = Heartbeat(store, delivery, config.cluster.heartbeat)
        await heartbeat.start()
        self._stack.push_async_callback(heartbeat.shutdown)
        self.spawn(heartbeat.run(), "heartbeat")
        self.wakeups = wakeups = store.wakeups(delivery.wake_soon)  # PostgreSQL: mail taken by any node
        if wakeups is not None:
            listening = self.spawn(wakeups.run(), "wakeups")
            self._stack.push_async_callback(_stop_wakeups, wakeups, listening)
        self._delivery_task = self.spawn(delivery.run(), "delivery")
        self._stack.push_async_callback(delivery.shutdown, config.delivery.shutdown_grace)
        if config.webhooks:
            # Beside delivery: the outbox's rows are durable, so whichever process runs
            # next (this one after a crash, another node) sends what is left. It leases under
            # the node's name, so that a dead node's deliveries are freed with its recipients.
            self.webhooks = webhooks = Dispatcher(config.webhooks, store, owner=delivery.owner)
            self.spawn(webhooks.run(), "webhooks")
            self._stack.push_async_callback(webhooks.shutdown, config.delivery.shutdown_grace)
        confirmer = CaseConfirmer(store)  # cases whose retried recipients are all delivered
        self.spawn(confirmer.run(), "case-confirmations")
        self._stack.push_async_callback(confirmer.shutdown)
        purger = RetentionService(store, config)  # [retention]: one process of every node purges at a time
        self.spawn(purger.run(), "retention")
        self._stack.push_async_callback(purger.shutdown)

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

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def shutdown(self) -> None:
        """Stop what startup started, newest first (see the module's docstring)."""
        log.info("shutting down")
        await self._stack.aclose()
        log.info("stopped")


async def serve(
    config: Config,
    *,
    smtp_sockets: Sequence[socket.socket] | None = None,
    http_sockets: Sequence[socket.socket] | None = None,
    tracking_sockets: Sequence[socket.socket] | None = None,
    bounce_sockets: Sequence[socket.socket] | None = None,
    smtp_tls_sockets: Sequence[socket.socket] | None = None,
    upgrade: bool = True,
    quiet: bool = False,
    ready_fd: int | None = None,
    why: str = "",
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code. ``quiet``: a worker of ``--processes``,
    whose parent announces the listeners and readiness; it reports its start on ``ready_fd``
    ("ready", or "error <one line>") and then closes it. Otherwise a failed start raises.
    ``why``: where the single process came from ([server] processes, --processes), said once
    it has started (a start that fails says one line, its error)."""
    relay = Relay(config)
    stop = asyncio.Event()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def force() -> None:
        log.warning("second signal: exiting now")
        if main is not None:
            main.cancel()

    def graceful(signum: signal.Signals) -> None:
        log.info("received %s", signum.name)
        stop.set()

    on_signal = StopSignals(graceful, force)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await relay.startup(
                smtp_sockets=smtp_sockets, http_sockets=http_sockets, tracking_sockets=tracking_sockets,
                bounce_sockets=bounce_sockets, smtp_tls_sockets=smtp_tls_sockets, upgrade=upgrade,
                announce=not quiet,
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
            if why:
                log.info("started 1 process (%s): %d", why, os.getpid())
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


async def _stop_wakeups(wakeups: Wakeups, task: asyncio.Task[Any]) -> None:
    """Stop listening; a connection attempt to a database that does not answer is cancelled."""
    wakeups.close()
    _, pending = await asyncio.wait([task], timeout=2.0)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


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
