"""The automatic confirmation of cases: every few seconds, cases whose retried or resent
recipients have all been delivered are confirmed (``LogStore.confirm_cases``), and the time each
took is observed in relay_case_time_to_confirmation_seconds. Runs beside delivery; the store's
guarded update makes it safe in every process at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from relay import metrics
from relay.errors import StoreError
from relay.logstore import LogStore

log = logging.getLogger(__name__)


class CaseConfirmer:
    def __init__(self, store: LogStore, interval: float = 2.0) -> None:
        self.store = store
        self.interval = interval
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def once(self) -> list[tuple[int, float]]:
        try:
            done = await self.store.confirm_cases()
        except StoreError as exc:
            log.warning("cases: cannot confirm (%s); trying again in %gs", exc, self.interval)
            return []
        for _, took in done:
            metrics.CASE_TIME_TO_CONFIRMATION.observe(took)
        return done

    async def shutdown(self) -> None:
        self._stop.set()
