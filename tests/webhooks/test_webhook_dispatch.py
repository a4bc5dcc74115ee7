"""The dispatcher against real receivers on loopback, each request verified with the
`standardwebhooks` reference library: retries keep the id, 410 disables the endpoint until it
is enabled, secrets rotate, hostile receivers fail alone, two dispatchers never send a row
twice. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime

import pytest
import webhook_fixtures
from helpers import metric, wait_for
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from ulid import ULID
from webhook_fixtures import dispatching, endpoints, message, opened
from webhook_receiver import Reply, Request, new_secret, receiver

from relay import metrics
from relay.logstore import LogStore
from relay.webhooks import RetrySchedule, retry_after, signature

url = webhook_fixtures.url  # the fixture, on both backends


def counted(result: str) -> float:
    return metric(metrics.render(metrics.QueueSummary({}, None)).decode(), "relay_webhook_deliveries_total",
                  result=result)  # fmt: skip


async def statuses(store: LogStore, hook: str) -> list[str]:
    found, _ = await store.webhook_deliveries(url=hook, limit=500)
    return sorted(d.status for d in found)


def test_signature_is_the_reference_librarys() -> None:
    secret = new_secret()
    body = b'{"type":"message.delivered","timestamp":"2026-01-01T00:00:00.000Z","data":{}}'
    ts = int(time.time())
    ours = signature([secret], "msg_1", ts, body)
    theirs = Webhook(secret).sign("msg_1", datetime.fromtimestamp(ts, UTC), body.decode())
    assert ours == theirs
    two = signature([secret, new_secret()], "msg_1", ts, body)
    assert two.split(" ")[0] == theirs
    assert len(two.split(" ")) == 2


def test_retry_schedule_and_retry_after() -> None:
    schedule = RetrySchedule()
    assert 4.5 <= (schedule.next_delay(1) or 0) <= 5.5
    assert 0.9 * 86400 <= (schedule.next_delay(9) or 0) <= 1.1 * 86400
    assert schedule.next_delay(10) is None  # after the last: failed
    assert (schedule.next_delay(1, retry_after=120) or 0) == 120  # never before the receiver's Retry-After
    assert (schedule.next_delay(1, retry_after=10**9) or 0) == 86400  # capped
    now = time.time()
    assert retry_after("30", now) == 30
    http_date = datetime.fromtimestamp(now + 60, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 58 <= (retry_after(http_date, now) or 0) <= 61
    assert retry_after("soon", now) is None
    assert retry_after("-5", now) is None


async def test_500_then_200_sends_the_same_id_again(url: str) -> None:
    answers = iter([Reply(500, body=b"oops"), Reply(503, headers=(("retry-after", "0"),))])
    secret = new_secret()
    async with receiver([secret], lambda _r: next(answers, Reply(204))) as r:
        hooks = endpoints({"url": r.url(), "secret": secret, "timeout": "5s"})
        async with opened(url, hooks) as store:
            before = counted("delivered")
            qid = str(ULID())
            await store.enqueue(message(qid))
            async with dispatching(store, hooks):
                await wait_for(r.ok, timeout=10)
                await wait_for(lambda: _delivered(store, r.url()), timeout=10)
            (row,), _ = await store.webhook_deliveries(url=r.url())
    assert [q.answered for q in r.requests] == [500, 503, 204]
    assert len({q.id for q in r.requests}) == 1
    assert all(q.verified == [True] for q in r.requests)
    assert r.requests[0].id.startswith("msg_")
    assert r.requests[0].body == r.requests[2].body  # sent as stored
    assert r.requests[0].headers["content-type"] == "application/json"
    assert (row.status, row.attempts, row.last_status) == ("delivered", 3, 204)
    assert r.requests[0].payload["data"]["queue_id"] == qid
    assert counted("delivered") == before + 1


async def test_new_rows_are_sent_at_once_not_at_the_next_poll(url: str) -> None:
    """The dispatcher polls once an hour here: the commit that wrote the rows wakes it."""
    secret = new_secret()
    async with receiver([secret]) as r:
        hooks = endpoints({"url": r.url(), "secret": secret})
        async with opened(url, hooks) as store, dispatching(store, hooks, poll=3600.0):
            await asyncio.sleep(0.3)  # it has looked, found nothing and waits
            for _ in range(3):
                await store.enqueue(message(str(ULID())))
                await wait_for(lambda n=len(r.ok()) + 1: len(r.ok()) >= n, timeout=5)
    assert len(r.ok()) == 3


async def _delivered(store: LogStore, hook: str) -> bool:
    return await statuses(store, hook) == ["delivered"]


async def test_gives_up_after_the_last_retry(url: str) -> None:
    secret = new_secret()
    async with receiver([secret], lambda _r: Reply(500)) as r:
        hooks = endpoints({"url": r.url(), "secret": secret})
        async with opened(url, hooks) as store:
            before = counted("failed")
            await store.enqueue(message(str(ULID())))
            async with dispatching(store, hooks, schedule=RetrySchedule((0.01, 0.01), jitter=0)):
                await wait_for(lambda: _status_is(store, r.url(), "failed"), timeout=10)
            (row,), _ = await store.webhook_deliveries(url=r.url(), status="failed")
    assert len(r.requests) == 3
    assert (row.attempts, row.last_status, row.last_error) == (3, 500, "HTTP 500")
    assert counted("failed") == before + 1


async def _status_is(store: LogStore, hook: str, status: str) -> bool:
    return await statuses(store, hook) == [status]


async def test_410_disables_the_endpoint_until_enabled(url: str) -> None:
    gone = True
    sa, sb = new_secret(), new_secret()

    def answer(_req: Request) -> Reply:
        return Reply(410) if gone else Reply(200)

    async with receiver([sa], answer) as ra, receiver([sb]) as rb:
        hooks = endpoints({"url": ra.url(), "secret": sa}, {"url": rb.url(), "secret": sb})
        async with opened(url, hooks) as store:
            before = counted("disabled")
            async with dispatching(store, hooks):
                await store.enqueue(message(str(ULID())))
                await wait_for(lambda: len(ra.requests) == 1 and len(rb.ok()) == 1, timeout=10)
                await wait_for(lambda: _disabled(store, ra.url()), timeout=10)
                # The next event: B gets it; A, disabled, gets nothing, yet keeps both deliveries.
                await store.enqueue(message(str(ULID())))
                await wait_for(lambda: len(rb.ok()) == 2, timeout=10)
                assert len(ra.requests) == 1
                assert await statuses(store, ra.url()) == ["pending", "pending"]
                summary = await store.webhook_summary()
                assert summary.disabled == 1
                gone = False
                assert await store.webhook_enable(ra.url())
                await wait_for(lambda: len(ra.ok()) == 2, timeout=10)
            assert not await _disabled(store, ra.url())
            assert not await store.webhook_enable(ra.url())  # not disabled any more
    assert counted("disabled") == before + 1
    assert {q.id for q in ra.requests} == {q.id for q in rb.requests}  # one id per event, for every endpoint


async def _disabled(store: LogStore, hook: str) -> bool:
    (e,) = [e for e in await store.webhook_endpoints([hook]) if e.url == hook]
    return e.disabled_at is not None


async def test_two_secrets_both_verify(url: str) -> None:
    old, new, stranger = new_secret(), new_secret(), new_secret()
    async with receiver([old, new, stranger]) as r:
        hooks = endpoints({"url": r.url(), "secret": [old, new]})
        async with opened(url, hooks) as store:
            await store.enqueue(message(str(ULID())))
            async with dispatching(store, hooks):
                await wait_for(r.ok, timeout=10)
    (req,) = r.requests
    assert req.verified == [True, True, False]  # a receiver with another secret refuses it
    assert len(req.headers["webhook-signature"].split(" ")) == 2
    assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 60
    forged = dict(req.headers, **{"webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()})
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook(old).verify(req.body, forged)


async def test_hostile_receivers_fail_alone(url: str) -> None:
    good, bad = new_secret(), new_secret()

    def hostile(req: Request) -> Reply:
        if req.path == "/stall":
            return Reply(stall=True)
        if req.path == "/huge":
            return Reply(500, body=b"x" * 10_000_000)
        if req.path == "/bighead":  # a 200 whose header line no HTTP client should swallow
            return Reply(200, headers=(("x-junk", "y" * 100_000),))
        return Reply(302, headers=(("location", "/elsewhere"),))

    async with receiver([bad], hostile) as h, receiver([good]) as g:
        hooks = endpoints(
            {"url": h.url("/stall"), "secret": bad, "timeout": "1s"},
            {"url": h.url("/huge"), "secret": bad},
            {"url": h.url("/redirect"), "secret": bad},
            {"url": h.url("/bighead"), "secret": bad},
            {"url": g.url(), "secret": good},
        )
        async with opened(url, hooks) as store:
            await store.enqueue(message(str(ULID())))
            async with dispatching(store, hooks, schedule=RetrySchedule((3600.0,))):
                await wait_for(g.ok, timeout=10)
                assert h.stalling == 1  # the good endpoint was served while the other stalls
                for path in ("/stall", "/huge", "/redirect", "/bighead"):
                    await wait_for(lambda p=path: _attempted(store, h.url(p)), timeout=15)
            rows = {d.url: d for d in (await store.webhook_deliveries(limit=10))[0]}
    assert h.on("/elsewhere") == []  # the redirect was not followed
    stall, huge, redirect = (rows[h.url(p)] for p in ("/stall", "/huge", "/redirect"))
    assert (stall.status, stall.last_status, stall.last_error) == ("pending", None, "no answer within 1s")
    assert (huge.status, huge.last_status) == ("pending", 500)
    assert huge.last_error is not None
    assert len(huge.last_error) < 300
    assert (redirect.status, redirect.last_status) == ("pending", 302)
    assert redirect.last_error == "HTTP 302: redirect to /elsewhere (not followed)"
    bighead = rows[h.url("/bighead")]
    assert (bighead.status, bighead.last_status) == ("pending", None)  # not taken for delivered
    assert bighead.last_error is not None
    assert len(bighead.last_error) < 300
    assert rows[g.url()].status == "delivered"


async def _attempted(store: LogStore, hook: str) -> bool:
    (found,), _ = await store.webhook_deliveries(url=hook)
    return found.attempts == 1


async def test_two_dispatchers_send_each_row_once(url: str) -> None:
    secret = new_secret()
    async with receiver([secret]) as r:
        hooks = endpoints({"url": r.url(), "secret": secret})
        async with opened(url, hooks) as one, opened(url, hooks) as two:
            for _ in range(20):
                await one.enqueue(message(str(ULID())))
            async with dispatching(one, hooks), dispatching(two, hooks):
                await wait_for(lambda: len(r.ok()) >= 20, timeout=20)
                await wait_for(lambda: _all_delivered(one, r.url(), 20), timeout=10)
    ids = [q.id for q in r.requests]
    assert len(ids) == len(set(ids)) == 20


async def _all_delivered(store: LogStore, hook: str, n: int) -> bool:
    return await statuses(store, hook) == ["delivered"] * n


async def test_shutdown_gives_leases_back(url: str) -> None:
    secret = new_secret()
    async with receiver([secret], lambda _r: Reply(stall=True)) as r:
        hooks = endpoints({"url": r.url(), "secret": secret, "timeout": "60s"})
        async with opened(url, hooks) as store:
            await store.enqueue(message(str(ULID())))
            async with dispatching(store, hooks, grace=0.1):
                await wait_for(lambda: r.stalling == 1, timeout=10)
            # given back, due at once: another process (or the next start) sends it now
            claimed = await store.webhook_claim("next", slots={r.url(): 1}, lease=60)
    assert len(claimed) == 1
    assert claimed[0].attempts == 0


async def test_a_dead_endpoint_is_a_failure_not_a_crash(url: str) -> None:
    secret = new_secret()
    hooks = endpoints({"url": "http://127.0.0.1:9/nothing-listens", "secret": secret})
    async with opened(url, hooks) as store:
        await store.enqueue(message(str(ULID())))
        async with dispatching(store, hooks, schedule=RetrySchedule((3600.0,))) as d:
            await wait_for(lambda: _attempted(store, hooks[0].url), timeout=10)
        (row,), _ = await store.webhook_deliveries()
    assert row.status == "pending"
    assert row.last_status is None
    assert row.last_error
    assert d.owner.startswith("webhooks-")
