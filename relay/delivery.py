"""Delivery: claim due recipients, send them, record what happened.

A dispatcher claims due recipients with a lease (``LogStore.claim_due``), groups a message's
recipients by domain into one SMTP transaction, and runs the transactions within
``[delivery] concurrency`` in total and ``per_domain`` per destination domain. Each
attempt ends in one ``LogStore.record`` call: new states and one event per recipient,
in one transaction. What a failure means is decided by ``RetryPolicy``, a pure value.

New mail wakes the dispatcher at once; retries are found by polling the next due time.
On shutdown, transactions in flight get a grace period, then everything this process still
holds is released (due at once) for the next run or another node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from relay import metrics
from relay.config import Config
from relay.errors import StoreError
from relay.logs import with_ids
from relay.logstore import LogStore
from relay.model import BOUNCED, DEFERRED, DELIVERED, EXPIRED, Claimed, EventType, Outcome, iso
from relay.tracking import Tracker
from relay.transport import Hop, Reply, Result, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    status: EventType  # delivered | deferred | bounced | expired
    next_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What an attempt's reply means for a recipient.

    2xx: delivered. 5xx: bounced. Anything else is temporary: retry after the schedule step
    for this attempt (the last step repeats), but never later than received_at + max_age;
    an attempt that fails at or after that moment expires the recipient."""

    schedule: tuple[float, ...]
    max_age: float

    def decide(self, reply: Reply, *, attempt: int, received_at: float, now: float) -> Decision:
        if reply.ok:
            return Decision(DELIVERED)
        if reply.permanent:
            return Decision(BOUNCED)
        deadline = received_at + self.max_age
        if now >= deadline:
            return Decision(EXPIRED)
        delay = self.schedule[min(attempt, len(self.schedule)) - 1]
        return Decision(DEFERRED, min(now + delay, deadline))


@dataclass(frozen=True, slots=True)
class Job:
    """One SMTP transaction: one message, the recipients of one domain."""

    message_id: str
    mail_from: str
    received_at: float
    domain: str
    recipients: tuple[Claimed, ...]
    track: str = ""  # tracked: exactly one recipient


def group(claimed: Sequence[Claimed]) -> list[Job]:
    """A message's recipients per domain in one transaction; a tracked message is rewritten
    per recipient, so each of its recipients gets a transaction of its own."""
    jobs: dict[tuple[str, str, int], list[Claimed]] = {}
    for c in claimed:
        jobs.setdefault((c.message_id, c.domain, c.recipient_id if c.track else 0), []).append(c)
    return [
        Job(mid, rs[0].mail_from, rs[0].received_at, domain, tuple(rs), rs[0].track)
        for (mid, domain, _), rs in jobs.items()
    ]


@dataclass(slots=True)
class _DomainSlot:
    semaphore: asyncio.Semaphore
    users: int = 0  # holding or waiting


class DeliveryEngine:
    poll_interval = 1.0  # seconds between looks for retries that came due

    def __init__(self, config: Config, store: LogStore, transport: Transport, tracker: Tracker | None = None) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.tracker = tracker
        d = config.delivery
        self.policy = RetryPolicy(d.retry_schedule, d.max_age)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self._stopping = False
        self._jobs: set[asyncio.Task[None]] = set()
        self._held: set[int] = set()  # recipient ids leased to this process
        self._domain_slots: dict[str, _DomainSlot] = {}
        self._backlog = False  # the last claim was cut short by free slots
        self._next_retry = float("inf")  # the earliest retry this process scheduled
        store.on_enqueued.append(lambda _msg: self._wake.set())

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """The dispatcher; runs until shutdown()."""
        log.info("delivery running as %s (concurrency %d, %d per domain)", self.owner,
                 self.config.delivery.concurrency, self.config.delivery.per_domain)  # fmt: skip
        polled = True  # at start, look for what is due already
        while not self._stopping:
            self._wake.clear()
            self.transport.sweep()
            try:
                if await self._dispatch(check_first=polled):
                    continue
            except StoreError as exc:
                log.warning("delivery paused: %s", exc)  # a store that comes back resumes delivery
            polled = False
            try:
                await asyncio.wait_for(self._wake.wait(), self._idle_time())
            except TimeoutError:
                polled = True

    def _idle_time(self) -> float:
        """Until our own next retry is due, at most the poll interval (retries scheduled by
        other processes or `relay queue retry` are found by polling)."""
        now = time.time()
        if self._next_retry <= now:
            self._next_retry = float("inf")
            return 0.0
        return min(self._next_retry - now, self.poll_interval)

    async def _dispatch(self, *, check_first: bool = False) -> bool:
        """Claim what free slots allow and start it. True when the claim was full, so more
        may be due right now."""
        free = self.config.delivery.concurrency - len(self._jobs)
        if free <= 0 or self._stopping:
            self._backlog = True  # a finishing job wakes the dispatcher
            return False
        if check_first and not await self.store.anything_due():
            return False
        claimed = await self.store.claim_due(self.owner, limit=free, lease=self.config.delivery.lease)
        fresh = [c for c in claimed if c.recipient_id not in self._held]  # re-claims only renewed our lease
        for job in group(fresh):
            self._held.update(c.recipient_id for c in job.recipients)
            task = asyncio.get_running_loop().create_task(self._run(job), name=f"deliver-{job.message_id}")
            self._jobs.add(task)
            task.add_done_callback(self._job_done)
        self._backlog = len(claimed) >= free
        return self._backlog

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if self._backlog:
            self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery job failed", exc_info=task.exception())

    async def _run(self, job: Job) -> None:
        with with_ids(queue_id=job.message_id, domain=job.domain):
            async with self._slot(job.domain):
                result, duration_ms = await self._attempt(job)
                outcomes = self._outcomes(job, result, duration_ms, time.time())
                await self.store.record(self.owner, outcomes)
                self._held.difference_update(c.recipient_id for c in job.recipients)
            metrics.ATTEMPT_SECONDS.observe(duration_ms / 1000)
            for o in outcomes:
                if o.next_attempt_at is not None:
                    self._next_retry = min(self._next_retry, o.next_attempt_at)
                metrics.attempt(o.status, o.at - job.received_at)
                log.info("to=<%s> status=%s attempt=%d relay=%s reply=%s", o.address, o.status, o.attempts,
                         _relay_name(result), o.last_response)  # fmt: skip

    @contextlib.asynccontextmanager
    async def _slot(self, domain: str) -> AsyncIterator[None]:
        """One of the domain's ``per_domain`` slots; a domain nobody uses is forgotten."""
        slot = self._domain_slots.get(domain)
        if slot is None:
            slot = self._domain_slots[domain] = _DomainSlot(asyncio.Semaphore(self.config.delivery.per_domain))
        slot.users += 1
        try:
            async with slot.semaphore:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._domain_slots[domain]

    async def _attempt(self, job: Job) -> tuple[Result, int]:
        started = time.monotonic()
        addresses = [c.address for c in job.recipients]
        body = (await self.store.load_bodies([job.message_id])).get(job.message_id)
        if body is None:
            missing = Reply(None, "5.3.0", "message body missing from the store")
            result = Result(dict.fromkeys(addresses, missing), Hop())
        else:
            if job.track and self.tracker is not None:
                body = self.tracker.rewrite(body, job.recipients[0].recipient_id, job.track)
            budget = self.config.delivery.lease * 0.8  # finish (or give up) well before the lease runs out
            try:
                async with asyncio.timeout(budget):
                    result = await self.transport.send(job.domain, job.mail_from, addresses, body)
            except TimeoutError:
                reply = Reply(None, "4.4.7", f"delivery attempt gave up after {budget:.0f}s")
                result = Result(dict.fromkeys(addresses, reply), Hop())
        return result, int((time.monotonic() - started) * 1000)

    def _outcomes(self, job: Job, result: Result, duration_ms: int, now: float) -> list[Outcome]:
        hop = result.hop
        outcomes = []
        for c in job.recipients:
            reply = result.replies[c.address]
            attempt = c.attempts + 1
            decision = self.policy.decide(reply, attempt=attempt, received_at=job.received_at, now=now)
            details: dict[str, object] = {
                "attempt": attempt,
                "mx_host": hop.host,
                "ip": hop.ip,
                "port": hop.port,
                "tls": hop.tls or "none",
                "code": reply.code,
                "enhanced_code": reply.enhanced,
                "reply": reply.text,
                "duration_ms": duration_ms,
            }
            if result.tried:
                details["tried"] = list(result.tried)
            if decision.next_attempt_at is not None:
                details["next_attempt_at"] = iso(decision.next_attempt_at)
            outcomes.append(
                Outcome(
                    recipient_id=c.recipient_id,
                    message_id=job.message_id,
                    address=c.address,
                    status=decision.status,
                    attempts=attempt,
                    next_attempt_at=decision.next_attempt_at,
                    last_response=str(reply),
                    event=decision.status,
                    details=details,
                    at=now,
                )
            )
        return outcomes

    async def shutdown(self, grace: float) -> None:
        """Stop claiming; let transactions in flight finish for up to ``grace`` seconds, cancel
        the rest; release every recipient still held; close idle connections."""
        self._stopping = True
        self._wake.set()
        if self._jobs:
            _, pending = await asyncio.wait(set(self._jobs), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled %d delivery attempts still running after %.0fs", len(pending), grace)
                await asyncio.gather(*pending, return_exceptions=True)
        if self._held:
            released = await self.store.release(self.owner, self._held)
            log.info("released %d recipients", released)
            self._held.clear()
        await self.transport.close()


def _relay_name(result: Result) -> str:
    hop = result.hop
    if hop.ip is None:
        return "none"
    return f"{hop.host}[{hop.ip}]:{hop.port}"
