"""Retention beside delivery: a pass soon after start, then one every ``interval`` (jittered so
that nodes started together do not all try at once), each deleting what [retention] no longer
keeps, a batch at a time with a pause between batches. Only one process of every node on the
store purges at a time (``LogStore.retention_run`` takes the lock; the others skip the pass).
A store error is logged and the pass tried again later: this task must never crash the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from relay import metrics
from relay.config import Config
from relay.errors import StoreError
from relay.logstore import LogStore
from relay.model import RetentionCount

log = logging.getLogger(__name__)

INTERVAL = 600.0  # seconds between passes
FIRST = 30.0  # seconds after start before the first pass (at most; jittered)
PAUSE = 0.05  # seconds between batches: intake and delivery get the store in between


def _counted(count: RetentionCount) -> None:
    metrics.retention_deleted(count.kind, count.rows)


class RetentionService:
    def __init__(
        self, store: LogStore, config: Config, *, interval: float = INTERVAL, first: float = FIRST, pause: float = PAUSE
    ) -> None:
        self.store = store
        self.config = config
        self.interval = interval
        self.first = first
        self.pause = pause
        self._stop = asyncio.Event()

    def _enabled(self) -> bool:
        r = self.config.retention
        return any(keep > 0 for keep in (r.bodies, r.messages, r.webhook_deliveries, r.audit))

    async def run(self) -> None:
        if not self._enabled():
            log.info("retention: every kind is kept forever ([retention] all 0)")
            return
        delay = random.uniform(0.5, 1.0) * self.first  # noqa: S311 -- spreading nodes, not secrecy
        while not await self._sleep(delay):
            await self.once()
            delay = self.interval * random.uniform(0.8, 1.2)  # noqa: S311

    async def _sleep(self, seconds: float) -> bool:
        """Wait; True when asked to stop meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def once(self) -> list[RetentionCount] | None:
        """One pass; None when another process is purging, or the store failed (logged)."""
        try:
            counts = await self.store.retention_run(
                self.config.retention, session_idle=self.config.console.session_idle, on_batch=_counted,
                pause=self.pause,
            )  # fmt: skip
        except StoreError as exc:
            log.warning("retention: pass failed (%s); trying again in about %gs", exc, self.interval)
            return None
        except Exception:  # a bug must not stop intake and delivery: log it, try later
            log.exception("retention: pass failed; trying again in about %gs", self.interval)
            return None
        if counts is None:
            log.debug("retention: another process is purging; skipped")
            return None
        done = [c for c in counts if c.rows]
        if done:
            log.info("retention: deleted %s", ", ".join(f"{c.rows} {c.kind} ({c.bytes} bytes)" for c in done))
        return counts

    async def shutdown(self) -> None:
        self._stop.set()
