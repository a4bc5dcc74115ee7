"""The queue's operations, on SQLite and PostgreSQL: enqueue, claim, record, release, retry, cancel, summary."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import sqlalchemy as sa
import store_fixtures
from helpers import raw_sql
from store_fixtures import message, outcome

from relay.errors import NotFound
from relay.logstore import LogStore
from relay.model import NewMessage

store, url = store_fixtures.store, store_fixtures.url  # the fixtures, on both backends


async def test_group_commit_keeps_each_message_whole(store: LogStore) -> None:
    await asyncio.gather(
        *(store.enqueue(message(f"01G{i:03d}", (f"u{i}@example.com", "x@example.com"))) for i in range(50))
    )
    summary = await store.queue_summary()
    assert summary.counts["queued"] == 100


async def test_claim_leases_and_expired_leases_come_back(store: LogStore) -> None:
    now = time.time()
    await store.enqueue(message("01C1", ("a@example.com", "b@example.net"), at=now))
    claimed = await store.claim_due("w1", limit=10, lease=60, now=now)
    assert {c.address for c in claimed} == {"a@example.com", "b@example.net"}
    assert {c.domain for c in claimed} == {"example.com", "example.net"}
    assert all(c.attempts == 0 and c.mail_from == "app@example.com" for c in claimed)
    assert await store.claim_due("w2", limit=10, lease=60, now=now + 1) == []  # leased
    again = await store.claim_due("w2", limit=10, lease=60, now=now + 61)  # w1 crashed
    assert len(again) == 2
    # w1's late result no longer counts: the lease moved to w2
    await store.record("w1", [outcome(claimed[0].recipient_id, "01C1", claimed[0].address, "delivered")])
    (m,) = await store.lookup("01C1")
    assert {r.status for r in m.recipients} == {"sending"}


async def test_record_and_release(store: LogStore) -> None:
    now = time.time()
    await store.enqueue(message("01R1", ("a@example.com", "b@example.com", "c@example.com"), at=now))
    a, b, c = await store.claim_due("w1", limit=10, lease=60, now=now)
    await store.record("w1", [outcome(a.recipient_id, "01R1", a.address, "delivered"),
                              outcome(b.recipient_id, "01R1", b.address, "deferred", next_at=now + 300)])  # fmt: skip
    assert await store.release_leases("w1", [c.recipient_id], now=now) == 1
    (m,) = await store.lookup("01R1")
    states = {r.address: (r.status, r.attempts, r.next_attempt_at) for r in m.recipients}
    assert states["a@example.com"] == ("delivered", 1, None)
    assert states["b@example.com"] == ("deferred", 1, pytest.approx(now + 300))
    assert states["c@example.com"] == ("queued", 0, pytest.approx(now))
    assert [e.type for e in m.events] == ["received", "delivered", "deferred"]
    assert await store.anything_due(now=now)
    assert [x.address for x in await store.claim_due("w1", limit=10, lease=60, now=now + 1)] == ["c@example.com"]


async def test_retry_and_cancel(store: LogStore) -> None:
    now = time.time()
    await store.enqueue(message("01Q1", ("a@example.com", "b@example.com"), at=now))
    a, b = await store.claim_due("w1", limit=10, lease=60, now=now)
    await store.record("w1", [outcome(a.recipient_id, "01Q1", a.address, "deferred", next_at=now + 3600),
                              outcome(b.recipient_id, "01Q1", b.address, "delivered")])  # fmt: skip
    assert await store.retry("01Q1", by="test", reason="mx fixed", now=now + 5) == 1
    (m,) = await store.lookup("01Q1")
    retried = [e for e in m.events if e.type == "retried"]
    assert [(e.recipient, e.details["by"], e.details["reason"]) for e in retried] == [
        ("a@example.com", "test", "mx fixed")
    ]
    assert await store.cancel("01Q1", by="test", now=now + 6) == 1
    (m,) = await store.lookup("01Q1")
    assert {r.address: r.status for r in m.recipients} == {"a@example.com": "cancelled", "b@example.com": "delivered"}
    assert await store.claim_due("w1", limit=10, lease=60, now=now + 10) == []
    with pytest.raises(NotFound):
        await store.cancel("01NOPE")
    with pytest.raises(NotFound):
        await store.retry("01NOPE")


async def test_queue_summary(store: LogStore) -> None:
    now = time.time()
    await store.enqueue(message("01S1", ("a@example.com",), at=now - 100))
    await store.enqueue(message("01S2", ("b@example.com",), at=now))
    summary = await store.queue_summary()
    assert summary.counts["queued"] == 2
    assert summary.counts["delivered"] == 0
    assert summary.oldest_queued_at == pytest.approx(now - 100)


async def test_a_failed_write_leaves_nothing(store: LogStore, url: str) -> None:
    await store.enqueue(message("01D1"))
    with pytest.raises(Exception, match="store operation failed"):
        await store.enqueue(message("01D1", ("other@example.com",)))  # duplicate queue id
    (m,) = await store.lookup("01D1")
    assert [r.address for r in m.recipients] == ["jane@example.com"]
    assert await raw_sql(url, lambda c: c.scalar(sa.text("SELECT count(*) FROM recipients"))) == 1


async def test_a_failing_post_commit_callback_cannot_fail_the_enqueue(
    store: LogStore, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def broken(msg: NewMessage) -> None:
        raise RuntimeError("wake-up failed")

    store.on_enqueued.append(broken)
    store.on_enqueued.append(lambda msg: seen.append(msg.queue_id))  # later callbacks still run
    with caplog.at_level(logging.ERROR, logger="relay.logstore"):
        await store.enqueue(message("01CB1"))  # returns normally: the message is committed
    assert seen == ["01CB1"]
    (m,) = await store.lookup("01CB1")
    assert [e.type for e in m.events] == ["received"]
    assert "01CB1" in caplog.text
    assert "wake-up failed" in caplog.text
