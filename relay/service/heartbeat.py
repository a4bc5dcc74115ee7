"""The node's heartbeat: registers this node, beats every ``[cluster] heartbeat``, and frees
the leases of nodes found dead (silent for 3 of their own intervals) at once.

A dead node's last heartbeat came before it died, so the look that finds it dead is timed
from the others' heartbeats: after each look the task sleeps until its own next beat or the
moment the first other node would be dead, whichever comes first. A store that fails (say
PostgreSQL restarting) is logged and tried again; this task never stops the process. A node
cut off from the store for longer than 3 intervals may find, at its next heartbeat, that its
leases were freed: it is alive again from that heartbeat on, and what it was sending when cut
off may be sent a second time by another node (its late records are refused by the lease
check: never a lost recipient).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

import relay
from relay.errors import StoreError, one_line
from relay.model import Node

if TYPE_CHECKING:
    from relay.delivery import DeliveryEngine
    from relay.logstore import LogStore

log = logging.getLogger(__name__)

SLACK = 0.05  # seconds past another node's deadline before looking (it is dead only strictly after)


class Heartbeat:
    """The node registry's side of one delivering process; ``run()`` until ``shutdown()``."""

    def __init__(self, store: LogStore, delivery: DeliveryEngine, interval: float) -> None:
        self.store = store
        self.delivery = delivery
        self.interval = interval
        self.name = delivery.owner
        self.started_at = time.time()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[object] | None = None
        self._next_beat = 0.0  # when this node beats next
        self._wake_at = 0.0  # when it looks at the registry next
        self.looks = 0  # successful looks at the registry (tests wait for the first)

    def node(self, now: float) -> Node:
        return Node(self.name, socket.gethostname(), os.getpid(), relay.__version__, self.started_at, now,
                    self.interval, self.delivery.in_flight, None)  # fmt: skip

    async def start(self) -> None:
        """Register (and free the leases of nodes dead already, such as this host's previous
        life after a kill -9) before delivery claims anything; a store that fails raises."""
        self._wake_at = await self._look(beat=True)

    async def run(self) -> None:
        self._task = asyncio.current_task()
        failing = False
        while not self._stopping.is_set():
            await self._sleep(self._wake_at - time.time())
            if self._stopping.is_set():
                break
            try:
                self._wake_at = await self._look(beat=time.time() >= self._next_beat)
            except StoreError as exc:
                if not failing:
                    log.warning("heartbeat failed (%s); trying again every %gs", one_line(exc), self.interval)
                failing = True
                self._wake_at = time.time() + self.interval
                continue
            except Exception:  # never stop the process for the registry's sake
                log.exception("heartbeat failed unexpectedly")
                self._wake_at = time.time() + self.interval
                continue
            if failing:
                log.info("heartbeat written again")
                failing = False

    async def _look(self, *, beat: bool) -> float:
        """Beat (when due), free dead nodes' leases; when to look next."""
        now = time.time()
        watch = await self.store.node_watch(self.node(now) if beat else None, self.name, now=now)
        self.looks += 1
        if beat:
            self._next_beat = now + self.interval
        if watch.revived:
            log.warning("this node %s was taken for dead while cut off from the store: its leases were freed, "
                        "and what it was sending may be sent twice; alive again", self.name)  # fmt: skip
        for f in watch.freed:
            log.warning("node %s is dead (silent for %.1fs): freed its %d recipients and %d webhook deliveries",
                        f.name, f.silent_for, f.recipients, f.webhook_deliveries)  # fmt: skip
        if watch.freed:
            self.delivery.wake()
        if watch.next_death is None:
            return self._next_beat
        return min(self._next_beat, watch.next_death + SLACK)

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    async def shutdown(self) -> None:
        """After delivery gave its leases back: mark this node stopped (a store that fails
        leaves it to look dead after 3 intervals, with nothing left to free)."""
        self._stopping.set()
        if self._task is not None and self._task is not asyncio.current_task():
            # a heartbeat being written lands before the stop (a store that hangs: not for long)
            _, pending = await asyncio.wait([self._task], timeout=5.0)
            for task in pending:
                task.cancel()
        try:
            await self.store.node_stop(self.name)
        except StoreError as exc:
            log.warning("could not mark this node stopped: %s", one_line(exc))
