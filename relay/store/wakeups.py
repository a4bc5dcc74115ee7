"""Wake-ups across nodes: PostgreSQL LISTEN on a connection of its own.

Every transaction that makes recipients due now sends ``NOTIFY relay_due`` (``nodes.notify_due``);
each node listens and wakes its delivery. A notification sent while the connection is down is
lost, so after every (re)connection delivery is woken once anyway, and delivery still polls
every ``[delivery] poll_interval``. The connection is checked with a small query now and then
(a silently dead TCP connection tells nobody) and reconnected with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from relay.errors import one_line
from relay.store.statements import DUE_CHANNEL

log = logging.getLogger(__name__)


class Wakeups:
    """Calls ``on_due`` for each notification on ``relay_due``; ``run()`` until ``close()``."""

    check_every = 5.0  # seconds between checks that the connection still works
    check_timeout = 5.0
    backoff_max = 5.0  # seconds between attempts to reconnect, at most

    def __init__(self, url: str, on_due: Callable[[], None]) -> None:
        self._url = url
        self._on_due = on_due
        self._closing = asyncio.Event()
        self.connected = asyncio.Event()  # set while listening (tests wait for it)
        self.notifications = 0

    async def run(self) -> None:
        """Listen, reconnecting when the connection drops; never raises but CancelledError."""
        engine = create_async_engine(self._url, poolclass=NullPool)
        delay, failing = 0.2, False
        try:
            while not self._closing.is_set():
                try:
                    await self._listen(engine)
                    delay, failing = 0.2, False
                except Exception as exc:  # PostgreSQL down or restarted: try again, delivery polls meanwhile
                    self.connected.clear()
                    if not failing:
                        log.warning("wake-ups: not listening (%s); delivery polls until they are back", one_line(exc))
                    failing = True
                    await self._sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
        finally:
            self.connected.clear()
            await engine.dispose()

    async def _listen(self, engine: Any) -> None:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection  # the asyncpg connection
            lost = asyncio.Event()
            driver.add_termination_listener(lambda _conn: lost.set())
            await driver.add_listener(DUE_CHANNEL, self._notified)
            log.info("wake-ups: listening on %s", DUE_CHANNEL)
            self.connected.set()
            self._on_due()  # something may have come due while nobody listened
            try:
                while not self._closing.is_set() and not lost.is_set():
                    await self._sleep(self.check_every, lost)
                    if self._closing.is_set() or lost.is_set():
                        break
                    await asyncio.wait_for(driver.fetchval("SELECT 1"), self.check_timeout)
                if lost.is_set() and not self._closing.is_set():
                    raise ConnectionError("the listening connection was closed")
            finally:
                self.connected.clear()
                if not driver.is_closed():
                    with contextlib.suppress(Exception):  # the connection is closed next anyway
                        await asyncio.wait_for(driver.remove_listener(DUE_CHANNEL, self._notified), 1.0)

    def _notified(self, *_args: object) -> None:
        self.notifications += 1
        try:
            self._on_due()
        except Exception:
            log.exception("wake-ups: the callback failed")

    async def _sleep(self, seconds: float, also: asyncio.Event | None = None) -> None:
        waiters = [asyncio.ensure_future(self._closing.wait())]
        if also is not None:
            waiters.append(asyncio.ensure_future(also.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def close(self) -> None:
        self._closing.set()
