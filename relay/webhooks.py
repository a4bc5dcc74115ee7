"""Webhooks, as Standard Webhooks 1.0 has them: the wire format (headers, signatures), the
retry schedule (a value), and the dispatcher that sends the outbox's rows. The only aiohttp
import (its client costs ~0.1 ms of CPU a request where httpx's cost over 1 ms: two webhooks a
message were most of Relay's work with them on).

The rows are written by the store in the transaction of the event they report
(``relay.store.webhooks``); the dispatcher leases due rows (several processes or nodes on one
store never send a row twice at once), POSTs each body as stored, and writes what happened:
delivered, due again later, failed for good, or the endpoint disabled (410 Gone). Each
endpoint has a few requests in flight at most, each bounded by its timeout, so a slow or
hostile receiver holds only its own slots.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from ulid import ULID

from relay import metrics
from relay.config import WebhookConfig
from relay.errors import StoreError, StoreUnavailable, one_line
from relay.logstore import LogStore
from relay.model import iso
from relay.store.webhooks import Attempted, Pending

if TYPE_CHECKING:
    import aiohttp  # imported when a client is made: ~20 MB a process that sends no webhooks never needs

log = logging.getLogger(__name__)

# After a failed attempt: 5 s, 5 m, 30 m, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h; then failed.
SCHEDULE: Final = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
MAX_RESPONSE: Final = 4096  # bytes of a response read at most (the rest is never read)
USER_AGENT: Final = "Relay-Webhooks/1"
TEST_TYPE: Final = "webhook.test"  # `relay webhooks test`: not an event, never stored

_random = secrets.SystemRandom()


# -- the wire format


def new_secret() -> str:
    """A new endpoint secret: "whsec_" + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(secrets_: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: "v1,<base64 HMAC-SHA256>" for each secret, space-separated,
    over "{id}.{timestamp}.{body}" with the bytes the secret's base64 (after "whsec_") decodes to."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_key(s), signed, hashlib.sha256).digest()).decode() for s in secrets_
    )


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def request_headers(secrets_: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets_, webhook_id, timestamp, body),
    }


# -- the retry schedule


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """When to try again after a failed attempt: ``delays[n - 1]`` after the n-th attempt,
    give or take ``jitter`` of it, and never before the receiver's Retry-After (capped at
    ``max_retry_after``); after the last delay, give up."""

    delays: tuple[float, ...] = SCHEDULE
    jitter: float = 0.1  # a fraction of the delay, either way: receivers that failed together do not retry together
    max_retry_after: float = 86400.0

    def next_delay(self, attempts: int, retry_after: float | None = None) -> float | None:
        """Seconds until the next attempt after ``attempts`` attempts failed; None: failed."""
        if attempts < 1 or attempts > len(self.delays):
            return None
        delay = self.delays[attempts - 1] * (1 + _random.uniform(-self.jitter, self.jitter))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


def retry_after(value: str | None, now: float) -> float | None:
    """A Retry-After header's seconds (delta-seconds or an HTTP date); None if absent or garbage."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


# -- one request


@dataclass(frozen=True, slots=True)
class Response:
    """What one POST came to: the receiver's status (None: no answer) or why it failed."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def client(max_connections: int = 100) -> aiohttp.ClientSession:
    """An HTTP client for webhooks: no proxy or certificate settings from the environment
    (Relay's config says where webhooks go), answers read as sent (no decompression).
    Redirects are never followed (``post``)."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0),
        trust_env=False,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),  # ``post`` bounds each request as a whole
    )


async def post(
    http: aiohttp.ClientSession, url: str, secrets_: Sequence[str], webhook_id: str, body: bytes, *, within: float
) -> Response:
    """POST one webhook, signed for this attempt, within ``within`` seconds all told; read
    at most MAX_RESPONSE bytes of the answer."""
    import aiohttp  # loaded by ``client`` already: a dictionary lookup

    now = time.time()
    headers = request_headers(secrets_, webhook_id, int(now), body)
    try:
        async with (
            asyncio.timeout(within),
            http.post(url, data=body, headers=headers, allow_redirects=False) as response,
        ):
            head = b""
            while len(head) < MAX_RESPONSE and (chunk := await response.content.read(MAX_RESPONSE - len(head))):
                head += chunk
            status = response.status
            location = response.headers.get("location", "?")
            wait = response.headers.get("retry-after")
    except TimeoutError:
        return Response(None, f"no answer within {within:g}s")
    except aiohttp.ClientError as exc:
        return Response(None, one_line(exc) or type(exc).__name__)
    except (OSError, ValueError) as exc:  # a URL the client cannot use, a socket error it did not wrap
        return Response(None, one_line(exc) or type(exc).__name__)
    except Exception as exc:  # whatever else a receiver provokes is its failure, never the dispatcher's
        log.exception("webhook %s to %s: unexpected error", webhook_id, url)
        return Response(None, f"unexpected error: {type(exc).__name__}")
    if 200 <= status < 300:
        return Response(status)
    text = head[:200].decode("utf-8", "replace").strip().replace("\n", " ")
    if 300 <= status < 400:
        text = f"redirect to {location[:200]} (not followed)"
    return Response(status, f"HTTP {status}{': ' + text if text else ''}", retry_after(wait, now))


async def send_test(endpoint: WebhookConfig) -> tuple[str, Response]:
    """Send a signed test webhook to an endpoint now (`relay webhooks test`): its id and what came of it."""
    at = time.time()
    webhook_id = "msg_" + str(ULID())
    doc = {"type": TEST_TYPE, "timestamp": iso(at), "data": {"message": "a test webhook from Relay"}}
    body = json.dumps(doc, separators=(",", ":")).encode()
    async with client(1) as http:
        return webhook_id, await post(http, endpoint.url, endpoint.secret, webhook_id, body, within=endpoint.timeout)


# -- the dispatcher


@dataclass
class _Endpoint:
    config: WebhookConfig
    in_flight: set[int] = field(default_factory=set)  # ids of deliveries being sent


class Dispatcher:
    """Sends the outbox's due rows to the configured endpoints until shut down."""

    def __init__(
        self,
        endpoints: Sequence[WebhookConfig],
        store: LogStore,
        *,
        schedule: RetrySchedule | None = None,
        per_endpoint: int = 16,
        poll: float = 0.5,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.schedule = schedule or RetrySchedule()
        self.per_endpoint = per_endpoint
        self.poll = poll  # seconds between looks at the outbox when nothing is due sooner
        self.owner = owner or f"webhooks-{ULID()}"
        self._endpoints = {e.url: _Endpoint(e) for e in endpoints if e.url}
        self._lease = max(e.timeout for e in endpoints) + 30.0 if endpoints else 60.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        if not self._endpoints:
            return
        self._http = client(self.per_endpoint * len(self._endpoints))
        self.store.on_outbox_rows(self.wake)  # rows this process wrote: sent now, not at the next poll
        try:
            while not self._stopping:
                try:
                    started = await self._claim()
                    wait = 0.0 if started else await self._until_due()
                except StoreError as exc:
                    level = logging.DEBUG if isinstance(exc, StoreUnavailable) else logging.WARNING  # logged once
                    log.log(level, "webhooks: cannot read the outbox (%s); trying again in %gs", exc, self.poll)
                    wait = self.poll
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                self._wake.clear()
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._http.close()

    async def shutdown(self, grace: float) -> None:
        """Stop claiming; let requests in flight finish for up to ``grace`` seconds, cancel the
        rest and give their rows back, due at once."""
        self._stopping = True
        self.wake()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        leased = [i for e in self._endpoints.values() for i in e.in_flight]
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if leased:
            with contextlib.suppress(StoreError):
                await self.store.webhook_release(self.owner, leased)

    async def _claim(self) -> int:
        # An endpoint claims once half its slots are free (or all are): a claim per finished
        # request would be a write transaction per webhook.
        slots = self._open_slots()
        if not slots:
            return 0
        claimed = await self.store.webhook_claim(self.owner, slots=slots, lease=self._lease)
        for p in claimed:
            endpoint = self._endpoints[p.url]
            endpoint.in_flight.add(p.id)
            task = asyncio.get_running_loop().create_task(self._send(endpoint, p), name=f"webhook-{p.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claimed)

    def _open_slots(self) -> dict[str, int]:
        """Endpoints that may claim now, with their free slots."""
        least = max(1, self.per_endpoint // 2)
        return {
            url: free
            for url, e in self._endpoints.items()
            if (free := self.per_endpoint - len(e.in_flight)) > 0 and (free >= least or not e.in_flight)
        }

    async def _until_due(self) -> float:
        urls = list(self._open_slots())  # the others wait for their requests (each wakes us when done)
        if not urls:
            return self.poll
        due = await self.store.webhook_next_due(urls)
        if due is None:
            return self.poll
        return max(0.0, min(self.poll, due - time.time()))

    async def _send(self, endpoint: _Endpoint, p: Pending) -> None:
        assert self._http is not None
        cfg = endpoint.config
        try:
            response = await post(self._http, p.url, cfg.secret, p.webhook_id, p.body, within=cfg.timeout)
            outcome = self._decide(p, response)
            if not await self._record(p, outcome):
                return
            self._count(p, outcome, response)
        finally:
            endpoint.in_flight.discard(p.id)
            self.wake()

    async def _record(self, p: Pending, outcome: Attempted) -> bool:
        """Write the attempt; while the database is out of reach, keep trying (the record applies
        only while our lease stands, so a late one is harmless) rather than send it again when
        the lease runs out. False when it could not be written: the row is due again once the
        lease runs out, sent twice, never lost."""
        delay = 0.1
        while True:
            try:
                await self.store.webhook_record(self.owner, p.url, [outcome])
                return True
            except StoreUnavailable as exc:
                if self._stopping:
                    log.warning("webhook %s to %s: cannot record the attempt (%s)", p.webhook_id, p.url, exc)
                    return False
                log.debug("webhook %s to %s: cannot record the attempt yet (%s)", p.webhook_id, p.url, exc)
            except StoreError as exc:
                log.warning("webhook %s to %s: cannot record the attempt (%s)", p.webhook_id, p.url, exc)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _decide(self, p: Pending, response: Response) -> Attempted:
        attempts = p.attempts + 1
        now = time.time()
        if response.ok:
            return Attempted(p.id, "delivered", attempts, None, response.status, None)
        if response.status == 410:
            # The receiver says it is gone for good: this delivery (and every other to it) waits
            # for `relay webhooks enable URL`; the attempt does not count against the schedule.
            return Attempted(p.id, "pending", p.attempts, now, 410, response.error, disable=True)
        delay = self.schedule.next_delay(attempts, response.retry_after)
        if delay is None:
            return Attempted(p.id, "failed", attempts, None, response.status, response.error)
        return Attempted(p.id, "pending", attempts, now + delay, response.status, response.error)

    def _count(self, p: Pending, outcome: Attempted, response: Response) -> None:
        if outcome.disable:
            metrics.webhook_delivery("disabled")
            log.warning(
                "webhook endpoint %s answered 410 Gone to %s: disabled until `relay webhooks enable %s`",
                p.url, p.webhook_id, p.url,
            )  # fmt: skip
        elif outcome.status == "delivered":
            metrics.webhook_delivery("delivered")
            log.debug("webhook %s (%s) delivered to %s: %s", p.webhook_id, p.type, p.url, response.status)
        elif outcome.status == "failed":
            metrics.webhook_delivery("failed")
            log.warning(
                "webhook %s (%s) to %s failed for good after %d attempts: %s",
                p.webhook_id, p.type, p.url, outcome.attempts, response.error,
            )  # fmt: skip
        else:
            log.info(
                "webhook %s (%s) to %s: attempt %d failed (%s); next at %s",
                p.webhook_id, p.type, p.url, outcome.attempts, response.error, iso(outcome.next_attempt_at),
            )  # fmt: skip
