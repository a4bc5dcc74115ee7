"""Delivery: claim due recipients, send them, record what happened.

A dispatcher claims only what can start at once (``LogStore.claim_due`` with a ``Planner``):
at most ``[delivery] concurrency`` transactions in total and ``per_domain`` per destination
domain, counting those in flight, so a claimed recipient never waits for a slot while its lease
runs out, and a full domain never holds mail for the others. A message's recipients in one
domain go in one SMTP transaction (a ``Job``).

Every job ends as one recorded attempt per recipient (``LogStore.record``: new states and one
event each, in one transaction), whatever happens inside it: a library error, a store error, a
cancelled task are temporary failures. The attempt gives up at 80 % of the lease, counted from
the claim. What a reply means is decided by ``relay.retry.RetryPolicy``, a pure value.

New mail wakes the dispatcher at once (on PostgreSQL, mail taken by any node: LISTEN/NOTIFY);
retries are found by polling the next due time. With ``[delivery] per_domain_scope = "cluster"``
per_domain counts every node's transactions, read inside the claim.
On shutdown, transactions in flight get a grace period, then they are cancelled and recorded.

Beside this front door: ``relay.retry`` (the policy value), ``relay.transport`` (SMTP out, the
only aiosmtplib import), ``relay.mx`` (MX and addresses, the only dnspython import) and
``relay.dkim`` (signing, the last step before sending, in a worker thread).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from relay import metrics
from relay.bounces.classify import classify, expired
from relay.bounces.inbound import sender_dsn
from relay.bounces.verp import PREFIX, ReturnPath
from relay.config import Config
from relay.errors import Reply, StoreError, StoreUnavailable
from relay.logs import with_ids
from relay.logstore import LogStore
from relay.model import Claimed, Outcome, ReportTarget, Suppression, header_section, iso
from relay.retry import RetryPolicy
from relay.tracking import Tracker
from relay.transport import Hop, Result, Transport

if TYPE_CHECKING:
    from relay.dkim import Signer  # imported by the service only when [[dkim]] entries are set

log = logging.getLogger(__name__)

REWRITE_IN_THREAD = 256 * 1024  # bytes; a larger message is rewritten off the event loop
# Bytes of large messages (over REWRITE_IN_THREAD) in flight per process: each holds its body,
# its rewrite and the client's encoded copy, so `concurrency` of them could take gigabytes.
# One always may start; small messages never count.
LARGE_IN_FLIGHT = 64 * 1024 * 1024
# Seconds over which wake-ups from other nodes (NOTIFY) are gathered into one claim.
WAKE_COALESCE = 0.05


@dataclass(frozen=True, slots=True)
class Job:
    """One SMTP transaction: one message, the recipients of one domain."""

    queue_id: str
    mail_from: str
    received_at: float
    domain: str
    recipients: tuple[Claimed, ...]
    track: str = ""  # tracked: exactly one recipient
    size: int = 0  # the message's, in bytes

    @property
    def large(self) -> int:
        """Its bytes against LARGE_IN_FLIGHT (0 for a small message)."""
        return self.size if self.size > REWRITE_IN_THREAD else 0


def job_key(c: Claimed, *, alone: bool = False) -> tuple[str, str, int]:
    """Recipients with the same key go in one transaction: a message's recipients per domain.
    A tracked message is rewritten per recipient, and with a return path (VERP) each recipient
    has its own MAIL FROM: then (``alone``) each recipient is a job alone. Relay's own DSNs
    (from ``<>``) have no return path."""
    return c.queue_id, c.domain, c.recipient_id if c.track or (alone and c.mail_from) else 0


def group(claimed: Sequence[Claimed], *, alone: bool = False) -> list[Job]:
    jobs: dict[tuple[str, str, int], list[Claimed]] = {}
    for c in claimed:
        jobs.setdefault(job_key(c, alone=alone), []).append(c)
    return [
        Job(mid, rs[0].mail_from, rs[0].received_at, domain, tuple(rs), rs[0].track, rs[0].size)
        for (mid, domain, _), rs in jobs.items()
    ]


@dataclass(slots=True)
class Planner:
    """Chooses, inside the claiming transaction, the due recipients that can start at once:
    at most ``jobs`` new transactions and ``per_domain`` per domain, counting those running,
    and large messages within ``large_budget`` bytes, counting ``large_running``.
    A claimed recipient never waits for a slot while its lease runs out, and a domain that is
    full never stops the others from being claimed (the candidates are in due order, and
    full domains are skipped)."""

    jobs: int
    per_domain: int
    running: dict[str, int]  # a snapshot: transactions in flight per domain
    window: int  # how many candidates the claim reads
    large_budget: int = LARGE_IN_FLIGHT
    large_running: int = 0  # a snapshot: bytes of large messages in flight
    alone: bool = False  # one recipient per transaction (VERP)
    waiting: bool = False  # something due was left for later (no free slot, or beyond the window)

    @property
    def full_domains(self) -> list[str]:
        return [d for d, n in self.running.items() if n >= self.per_domain]

    def cluster_running(self, running: Mapping[str, int]) -> list[str]:
        """per_domain across the cluster: every node's transactions in flight per domain, read in
        the claiming transaction, replace the local snapshot; the full domains are skipped."""
        self.running = dict(running)
        return self.full_domains

    @property
    def max_size(self) -> int | None:
        """Messages bigger than this cannot start now (None: any can), so the claim skips them
        and a queue of large messages never hides the small ones behind it."""
        if self.large_running == 0:
            return None
        return max(REWRITE_IN_THREAD, self.large_budget - self.large_running)

    def __call__(self, candidates: Sequence[Claimed]) -> list[Claimed]:
        running = dict(self.running)
        large = self.large_running
        started: set[tuple[str, str, int]] = set()
        chosen: list[Claimed] = []
        for c in candidates:
            key = job_key(c, alone=self.alone)
            if key not in started:
                size = c.size if c.size > REWRITE_IN_THREAD else 0
                if (
                    len(started) >= self.jobs
                    or running.get(c.domain, 0) >= self.per_domain
                    or (size and large and large + size > self.large_budget)
                ):
                    self.waiting = True
                    continue
                started.add(key)
                running[c.domain] = running.get(c.domain, 0) + 1
                large += size
            chosen.append(c)
        if len(candidates) >= self.window:
            self.waiting = True
        return chosen


class DeliveryEngine:
    record_retry_max = 2.0  # seconds between tries to record an attempt while the store fails

    def __init__(
        self,
        config: Config,
        store: LogStore,
        transport: Transport,
        tracker: Tracker | None = None,
        return_path: ReturnPath | None = None,
        *,
        signer: Signer | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.tracker = tracker
        self.return_path = return_path  # [bounces] domain set: VERP, one recipient per transaction
        self.signer = signer if signer is not None and signer.keys else None  # [[dkim]] entries
        d = config.delivery
        self.policy = RetryPolicy(d.retry_schedule, d.max_age)
        # The node's name: the lease owner its claims write, its row in the node registry.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # Seconds between looks for due work when no wake-up came (retries, other nodes' mail
        # while their NOTIFY could not reach us).
        self.poll_interval = d.poll_interval
        self.cluster = d.per_domain_scope == "cluster"  # per_domain counts every node's transactions
        self._wake = asyncio.Event()
        self._stopping = False
        self._jobs: set[asyncio.Task[None]] = set()
        self._held: set[int] = set()  # recipient ids leased to this process
        self._running: dict[str, int] = {}  # transactions in flight per domain
        self._large = 0  # bytes of large messages in flight (see LARGE_IN_FLIGHT)
        self.large_budget = LARGE_IN_FLIGHT
        self._backlog = False  # the last claim left due work behind
        self._next_retry = float("inf")  # the earliest retry this process scheduled
        self._wake_timer: asyncio.TimerHandle | None = None  # wake_soon's pending wake-up
        self._task: asyncio.Task[None] | None = None  # the dispatcher's, while run() runs
        store.on_enqueued.append(lambda _msg: self._wake.set())
        store.on_due.append(self._wake.set)  # a retry or release from the console or the API

    def wake(self) -> None:
        self._wake.set()

    def wake_soon(self) -> None:
        """A wake-up from another node (NOTIFY): one claim for every burst of them within
        WAKE_COALESCE seconds. Each node's own intake wakes it at once, so every notification
        of a busy cluster would otherwise cost every node a claim that mostly finds nothing."""
        if self._wake_timer is None:
            self._wake_timer = asyncio.get_running_loop().call_later(WAKE_COALESCE, self._woken_soon)

    def _woken_soon(self) -> None:
        self._wake_timer = None
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def in_flight(self) -> int:
        """SMTP transactions running now (the node's heartbeat reports it)."""
        return len(self._jobs)

    async def run(self) -> None:
        """The dispatcher; runs until shutdown()."""
        self._task = asyncio.current_task()
        log.info("delivery running as %s (concurrency %d, %d per domain)", self.owner,
                 self.config.delivery.concurrency, self.config.delivery.per_domain)  # fmt: skip
        polled = True  # at start, look for what is due already
        while not self._stopping:
            self._wake.clear()
            self.transport.sweep()
            try:
                if await self._dispatch(check_first=polled):
                    continue
            except StoreError as exc:  # a store that comes back resumes delivery
                # A lost database is logged once by the store, not at every poll.
                log.log(logging.DEBUG if isinstance(exc, StoreUnavailable) else logging.WARNING,
                        "delivery paused: %s", exc)  # fmt: skip
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
        """Claim what can start now and start it. True when more may be startable right away."""
        d = self.config.delivery
        free = d.concurrency - len(self._jobs)
        if free <= 0 or self._stopping:
            self._backlog = True  # a finishing job wakes the dispatcher
            return False
        if check_first and not await self.store.anything_due():
            return False
        alone = self.return_path is not None
        planner = Planner(
            free, d.per_domain, {} if self.cluster else dict(self._running), window=max(4 * free, 64),
            large_budget=self.large_budget, large_running=self._large, alone=alone,
        )  # fmt: skip
        claimed = await self.store.claim_due(
            self.owner, lease=d.lease, limit=planner.window, pick=planner,
            skip_domains=planner.full_domains, max_size=planner.max_size,
            cluster=planner.cluster_running if self.cluster else None, alone=alone,
        )  # fmt: skip
        lease_ends = time.time() + d.lease  # the store's lease ends a moment before this
        if self.stopping:  # shutdown began during the claim: nothing starts, shutdown gives them back
            self._held.update(c.recipient_id for c in claimed if c.suppressed is None)
            return False
        for c in claimed:
            if c.suppressed is not None:  # ended by the claim, never attempted
                metrics.SUPPRESSED.labels(c.suppressed.reason).inc()
                metrics.FINAL.labels("suppressed").inc()
                with with_ids(queue_id=c.queue_id):
                    log.info("to=<%s> status=suppressed entry=%s reason=%s", c.address, c.suppressed.address,
                             c.suppressed.reason)  # fmt: skip
        claimed = [c for c in claimed if c.suppressed is None]
        fresh = [c for c in claimed if c.recipient_id not in self._held]  # re-claims only renewed our lease
        for job in group(fresh, alone=self.return_path is not None):
            self._start(job, lease_ends)
        # Due work left behind (or possibly behind a full domain): a finishing job looks again.
        self._backlog = planner.waiting or bool(planner.full_domains) or planner.max_size is not None
        return bool(fresh) and planner.waiting and len(self._jobs) < d.concurrency

    def _start(self, job: Job, lease_ends: float) -> None:
        self._held.update(c.recipient_id for c in job.recipients)
        self._running[job.domain] = self._running.get(job.domain, 0) + 1
        self._large += job.large
        task = asyncio.get_running_loop().create_task(self._run(job, lease_ends), name=f"deliver-{job.queue_id}")
        self._jobs.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if self._backlog:
            self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery job failed", exc_info=task.exception())

    async def _run(self, job: Job, lease_ends: float) -> None:
        """One attempt, always ending as a recorded outcome for every recipient: whatever
        goes wrong inside it (a library error, a cancelled task) is a temporary failure."""
        with with_ids(queue_id=job.queue_id, domain=job.domain):
            started = time.monotonic()
            signed: tuple[dict[str, str], ...] = ()  # the DKIM signatures the message went with
            try:
                result, signed = await self._attempt(job, deadline=lease_ends - 0.2 * self.config.delivery.lease)
            except asyncio.CancelledError:
                result = _failed(job, Reply(None, "4.4.2", "delivery attempt interrupted: Relay is shutting down"))
            except StoreError as exc:
                log.warning("could not read the message for delivery: %s", exc)
                result = _failed(job, Reply(None, "4.3.0", "could not read the message from the store"))
            except Exception as exc:
                log.exception("delivery attempt failed unexpectedly")
                result = _failed(job, Reply(None, "4.3.0", f"Relay failed during the attempt ({type(exc).__name__})"))
            duration_ms = int((time.monotonic() - started) * 1000)
            outcomes = self._outcomes(job, result, duration_ms, time.time(), signed)
            if self.config.bounces.notify_sender and job.mail_from:
                outcomes = await self._with_dsns(job, outcomes, result)
            try:
                await self._record(outcomes, lease_ends)
            finally:
                self._held.difference_update(c.recipient_id for c in job.recipients)
                self._large -= job.large
                left = self._running.get(job.domain, 1) - 1
                if left > 0:
                    self._running[job.domain] = left
                else:
                    self._running.pop(job.domain, None)
            metrics.ATTEMPT_SECONDS.observe(duration_ms / 1000)
            for o in outcomes:
                if o.next_attempt_at is not None:
                    self._next_retry = min(self._next_retry, o.next_attempt_at)
                metrics.attempt(o.status, o.at - job.received_at)
                if o.status == "bounced":
                    metrics.BOUNCES.labels("sync", str(o.details.get("reason", "undefined"))).inc()
                log.info("to=<%s> status=%s attempt=%d relay=%s reply=%s", o.address, o.status, o.attempts,
                         _relay_name(result), o.last_response)  # fmt: skip

    async def _record(self, outcomes: Sequence[Outcome], lease_ends: float) -> None:
        """Write the outcomes; while the store fails, try again until the lease runs out. Past
        that, the recipients are due again for whoever claims them (at worst a second delivery).
        While the database is out of reach, though, keep trying past the lease: the recipients
        stay held here (our own claims only renew the lease), and the record applies only while
        our lease stands, so a late one never undoes another node's claim. Without that, every
        attempt in flight when the database went for longer than the lease would be made again."""
        delay = 0.1
        failed: StoreError | None = None
        try:
            while True:
                try:
                    await self.store.record(self.owner, outcomes)
                    return
                except StoreError as exc:
                    failed = exc
                    if time.time() + delay >= lease_ends and not isinstance(exc, StoreUnavailable):
                        log.error("could not record the attempt (%s); the lease runs out and it will be tried again",
                                  exc)  # fmt: skip
                        return
                    log.log(logging.DEBUG if isinstance(exc, StoreUnavailable) else logging.WARNING,
                            "could not record the attempt (%s); trying again in %.1fs", exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.record_retry_max)
        except asyncio.CancelledError:
            if failed is not None:  # shutting down with the store gone: say what that costs
                log.warning("could not record the attempt before stopping (%s); it will be made again once "
                            "the lease runs out", failed)  # fmt: skip
            raise

    async def _attempt(self, job: Job, deadline: float) -> tuple[Result, tuple[dict[str, str], ...]]:
        """Send the message; give up at ``deadline`` (well before the lease runs out). With it,
        the DKIM signatures it was sent with."""
        addresses = [c.address for c in job.recipients]
        body = (await self.store.load_bodies([job.queue_id])).get(job.queue_id)
        if body is None:
            return _failed(job, Reply(None, "5.3.0", "message body missing from the store")), ()
        if job.track and self.tracker is not None:
            body = await self._rewrite(body, job)
        mail_from = job.mail_from
        if self.return_path is not None and mail_from:
            # VERP: a bounce to this address names the recipient; X-Relay-Ref names it too
            # inside the message, for complaints whose envelope is redacted.
            token = self.return_path.token(job.recipients[0].recipient_id)
            mail_from = f"{PREFIX}{token}@{self.return_path.domain}"
            body = b"X-Relay-Ref: " + token.encode() + b"\r\n" + body
        signed: tuple[dict[str, str], ...] = ()
        if self.signer is not None:  # last: the signature covers the message as it goes out
            body, signed = await self._sign(body)
        budget = deadline - time.time()
        try:
            async with asyncio.timeout(budget):
                return await self.transport.send(job.domain, mail_from, addresses, body), signed
        except TimeoutError:
            reply = Reply(None, "4.4.7", f"delivery attempt gave up after {max(budget, 0):.0f}s")
            return _failed(job, reply), signed

    async def _sign(self, body: bytes) -> tuple[bytes, tuple[dict[str, str], ...]]:
        """DKIM-sign with the keys for the From: domain, in a worker thread (an RSA signature is
        CPU work); a message that cannot be signed goes out unsigned, and the log says why."""
        assert self.signer is not None
        keys, why = self.signer.keys_for(body)
        if not keys:
            log.info("not signed with DKIM: %s", why)
            return body, ()
        signed = await asyncio.to_thread(self.signer.sign, body, keys)
        return signed.body, signed.signatures

    async def _rewrite(self, body: bytes, job: Job) -> bytes:
        assert self.tracker is not None
        recipient_id = job.recipients[0].recipient_id
        if len(body) < REWRITE_IN_THREAD:
            return self.tracker.rewrite(body, recipient_id, job.track)
        return await asyncio.to_thread(self.tracker.rewrite, body, recipient_id, job.track)  # keep the loop free

    def _outcomes(
        self, job: Job, result: Result, duration_ms: int, now: float, signed: tuple[dict[str, str], ...] = ()
    ) -> list[Outcome]:
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
                "node": self.owner,  # which node made the attempt
            }
            if result.tried:
                details["tried"] = list(result.tried)
            if signed:
                details["dkim"] = [dict(s) for s in signed]
            if decision.next_attempt_at is not None:
                details["next_attempt_at"] = iso(decision.next_attempt_at)
            suppress = None
            if decision.status != "delivered":
                cls = (
                    expired()
                    if decision.status == "expired"
                    else classify(reply.code, reply.enhanced, reply.text, command=reply.command)
                )
                details.update(cls.details())
                if decision.status == "bounced" and cls.hard and self.config.suppression.hard_bounces:
                    suppress = Suppression(c.address.lower(), "hard_bounce", "bounce", job.queue_id, now, None,
                                           str(reply)[:500])  # fmt: skip
            outcomes.append(
                Outcome(
                    recipient_id=c.recipient_id,
                    queue_id=job.queue_id,
                    address=c.address,
                    status=decision.status,
                    attempts=attempt,
                    next_attempt_at=decision.next_attempt_at,
                    last_response=str(reply),
                    event=decision.status,
                    details=details,
                    at=now,
                    suppress=suppress,
                )
            )
        return outcomes

    async def _with_dsns(self, job: Job, outcomes: list[Outcome], result: Result) -> list[Outcome]:
        """[bounces] notify_sender: a bounce or an expiry also queues a DSN to the sender."""
        ending = [o for o in outcomes if o.status in ("bounced", "expired")]
        if not ending:
            return outcomes
        try:
            body = (await self.store.load_bodies([job.queue_id])).get(job.queue_id, b"")
        except StoreError as exc:
            log.warning("no DSN to the sender: cannot read the message (%s)", exc)
            return outcomes
        headers = header_section(body)
        out = []
        for o in outcomes:
            if o.status not in ("bounced", "expired"):
                out.append(o)
                continue
            target = ReportTarget(o.recipient_id, o.queue_id, o.address, o.status, job.mail_from,
                                  job.received_at, headers)  # fmt: skip
            reply = result.replies[o.address]
            status = "5.4.7" if o.status == "expired" else (reply.enhanced or "5.0.0")
            dsn = sender_dsn(target, status=status, diagnostic=o.last_response, remote_mta=result.hop.host,
                             hostname=self.config.server.hostname, now=o.at)  # fmt: skip
            out.append(replace(o, notify=dsn, details={**o.details, "dsn_queue_id": dsn.queue_id}))
        return out

    async def shutdown(self, grace: float) -> None:
        """Stop claiming; let transactions in flight finish for up to ``grace`` seconds, cancel
        the rest; release every recipient still held; close idle connections."""
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        self._stopping = True
        self._wake.set()
        if self._task is not None and self._task is not asyncio.current_task():
            await asyncio.wait([self._task], timeout=grace)  # a claim under way ends first
        if self._jobs:
            _, pending = await asyncio.wait(set(self._jobs), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled %d delivery attempts still running after %.0fs", len(pending), grace)
                await asyncio.gather(*pending, return_exceptions=True)
        if self._held:
            try:
                released = await self.store.release_leases(self.owner, self._held)
                log.info("released %d recipients", released)
            except StoreError as exc:  # the database is gone: the leases run out instead
                log.warning("could not give back %d recipients (%s); due again when their lease runs out",
                            len(self._held), exc)  # fmt: skip
            self._held.clear()
        await self.transport.close()


def _relay_name(result: Result) -> str:
    hop = result.hop
    if hop.ip is None:
        return "none"
    return f"{hop.host}[{hop.ip}]:{hop.port}"


def _failed(job: Job, reply: Reply) -> Result:
    """The same reply for every recipient of the job, from no server."""
    return Result(dict.fromkeys((c.address for c in job.recipients), reply), Hop())
