"""The outbox in the store: rows written in the transaction of their event (and only then),
which endpoints get which types, first deferrals, suppression changes, replay. SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa
import webhook_fixtures
from sqlalchemy.ext.asyncio import create_async_engine
from ulid import ULID
from webhook_fixtures import endpoints, message, opened

from relay.logstore import LogStore
from relay.model import Outcome, Suppression
from relay.store import webhooks as webhook_store
from relay.store.log import NewEvent, append_events
from relay.webhooks import new_secret

url = webhook_fixtures.url  # the fixture, on both backends
A, B = "http://127.0.0.1:9/a", "http://127.0.0.1:9/b"


async def bodies(store: LogStore, url: str | None = None) -> list[dict[str, object]]:
    found, _ = await store.webhook_deliveries(url=url, limit=500)
    return [d.to_json() for d in reversed(found)]


async def payloads(store: LogStore, url: str) -> list[dict[str, object]]:
    """The stored bodies of an endpoint's deliveries, oldest first (read back as sent)."""
    out = []
    before = None
    while True:
        found, before = await store.webhook_deliveries(url=url, limit=100, before=before)
        out += found
        if before is None:
            break
    ids = {d.id for d in out}
    assert len(ids) == len(out)
    return [json.loads(b) for b in await _raw_bodies(store, sorted(ids))]


async def _raw_bodies(store: LogStore, ids: list[int]) -> list[bytes]:
    # The body column is not part of the API's view: the dispatcher's claim is what reads it.
    claimed = await store.webhook_claim("reader", slots={A: 1000, B: 1000}, lease=60)
    await store.webhook_release("reader", [p.id for p in claimed])
    by_id = {p.id: p.body for p in claimed}
    return [by_id[i] for i in ids]


async def deliver(store: LogStore, qid: str, status: str, *, attempts: int) -> None:
    claimed = await store.claim_due("w", lease=60)
    (c,) = [c for c in claimed if c.queue_id == qid]
    event = "delivered" if status == "delivered" else "deferred"
    now = time.time()
    details = {"attempt": attempts, "code": 250 if event == "delivered" else 451, "enhanced_code": None,
               "reply": "ok" if event == "delivered" else "try later"}  # fmt: skip
    await store.record("w", [Outcome(c.recipient_id, qid, c.address, status, attempts,
                                     None if status == "delivered" else now, "x", event, details, now)])  # fmt: skip


async def test_received_and_delivered_carry_the_message_fields(url: str) -> None:
    hooks = endpoints({"url": A, "secret": new_secret()})
    async with opened(url, hooks) as store:
        qid = str(ULID())
        await store.enqueue(message(qid))
        await deliver(store, qid, "delivered", attempts=1)
        docs = await payloads(store, A)
    assert [d["type"] for d in docs] == ["message.received", "message.delivered"]
    received, delivered = docs
    for doc in docs:
        data = doc["data"]
        assert {k: data[k] for k in ("queue_id", "message_id", "mail_from", "tags", "user", "subject")} == {
            "queue_id": qid, "message_id": f"{qid.lower()}@app.example", "mail_from": "app@example.com",
            "tags": ["welcome"], "user": "app", "subject": "Hello",
        }  # fmt: skip
        assert str(doc["timestamp"]).endswith("Z")
    assert received["data"]["recipient"] is None
    assert received["data"]["protocol"] == "ESMTP"
    assert delivered["data"]["recipient"] == "jane@example.com"
    assert delivered["data"]["code"] == 250
    assert delivered["data"]["attempt"] == 1


async def test_a_rolled_back_transaction_leaves_no_outbox_row(url: str) -> None:
    hooks = endpoints({"url": A, "secret": new_secret()})
    async with opened(url, hooks) as store:
        qid = str(ULID())
        await store.enqueue(message(qid))
        before = await bodies(store)
        # The same seam as Relay's writer, on an engine that carries the same outbox.
        outbox = webhook_store.Outbox((webhook_store.Route(A),))
        engine = create_async_engine(url, execution_options={webhook_store.OUTBOX: outbox})
        inside: list[int] = []

        def fail_after_append(conn: sa.Connection) -> None:
            append_events(conn, [NewEvent(qid, "jane@example.com", time.time(), "delivered", {"attempt": 1})])
            inside.append(conn.scalar(sa.text("SELECT count(*) FROM webhook_deliveries")) or 0)
            raise RuntimeError("the transaction fails after the event was appended")

        try:
            with pytest.raises(RuntimeError):
                async with engine.begin() as conn:
                    await conn.run_sync(fail_after_append)
        finally:
            await engine.dispose()
        assert inside == [len(before) + 1]  # written in that transaction...
        after = await bodies(store)
        view = await store.get_message(qid)
    assert after == before  # ...and gone with it, as the event is
    assert view is not None
    assert [e.type for e in view.events] == ["received"]


async def test_no_endpoints_no_rows(url: str) -> None:
    async with opened(url, ()) as store:
        await store.enqueue(message(str(ULID())))
        assert await bodies(store) == []


async def test_events_filter_and_first_deferral_only(url: str) -> None:
    hooks = endpoints(
        {"url": A, "secret": new_secret(), "events": ["message.deferred"]},  # first deferral only
        {"url": B, "secret": new_secret(), "events": ["message.deferred", "message.delivered"], "deferred": "every"},
    )
    async with opened(url, hooks) as store:
        qid = str(ULID())
        await store.enqueue(message(qid))
        for n in (1, 2, 3):
            await deliver(store, qid, "deferred", attempts=n)
        await deliver(store, qid, "delivered", attempts=4)
        a, b = await payloads(store, A), await payloads(store, B)
    assert [d["type"] for d in a] == ["message.deferred"]
    assert a[0]["data"]["attempt"] == 1
    assert [d["type"] for d in b] == ["message.deferred"] * 3 + ["message.delivered"]
    assert [d["data"]["attempt"] for d in b] == [1, 2, 3, 4]


async def test_suppression_created_and_deleted(url: str) -> None:
    hooks = endpoints({"url": A, "secret": new_secret(), "events": ["suppression.created", "suppression.deleted"]})
    async with opened(url, hooks) as store:
        entry = Suppression("Jane@Example.com", "manual", "api", None, time.time(), None, "asked")
        await store.suppress(entry, actor="api:abc")
        await store.suppress(entry, actor="api:abc")  # in force already: no change, no webhook
        await store.unsuppress("jane@example.com", "a mistake", actor="ops", origin="cli")
        await store.enqueue(message(str(ULID())))  # not wanted by this endpoint
        docs = await payloads(store, A)
    assert [d["type"] for d in docs] == ["suppression.created", "suppression.deleted"]
    created, deleted = (d["data"] for d in docs)
    assert created["address"] == "jane@example.com"
    assert (created["reason"], created["origin"], created["note"]) == ("manual", "api", "asked")
    assert (created["actor"], created["via"]) == ("api:abc", "api")
    assert (deleted["address"], deleted["actor"], deleted["via"]) == ("jane@example.com", "ops", "cli")
    assert deleted["removal_reason"] == "a mistake"


async def test_replay_requeues_with_the_same_ids(url: str) -> None:
    hooks = endpoints({"url": A, "secret": new_secret()})
    async with opened(url, hooks) as store:
        start = time.time() - 1
        qid = str(ULID())
        await store.enqueue(message(qid))
        await deliver(store, qid, "delivered", attempts=1)
        await store.suppress(Suppression("x@example.com", "manual", "cli", None, time.time()), actor="ops")
        first = await payloads(store, A)
        count = await store.webhook_replay(hooks, since=start, until=time.time() + 1, kinds=["message.delivered"])
        assert count == 1
        count = await store.webhook_replay(hooks, since=start, until=time.time() + 1)
        assert count == 3
        rows = await bodies(store, A)
        docs = await payloads(store, A)
    assert len(rows) == 7
    ids: dict[str, set[str]] = {}
    for row in rows:
        ids.setdefault(str(row["type"]), set()).add(str(row["webhook_id"]))
    assert all(len(v) == 1 for v in ids.values()), ids  # a replay carries the first id
    assert docs[3] == first[1]  # the same body as the first time
    assert docs[4:6] == first[:2]
    assert docs[6]["type"] == "suppression.created"  # from the audit trail
    assert (docs[6]["data"]["address"], docs[6]["data"]["actor"]) == ("x@example.com", "ops")


async def test_claims_are_exclusive_and_leased(url: str) -> None:
    hooks = endpoints({"url": A, "secret": new_secret()})
    async with opened(url, hooks) as one, opened(url, hooks) as two:
        for _ in range(6):
            await one.enqueue(message(str(ULID())))
        slots = {A: 4}
        got_one = await one.webhook_claim("one", slots=slots, lease=60)
        got_two = await two.webhook_claim("two", slots=slots, lease=60)
        assert len(got_one) == 4  # at most the endpoint's free slots
        assert len(got_two) == 2
        assert not {p.id for p in got_one} & {p.id for p in got_two}
        assert await one.webhook_claim("three", slots=slots, lease=60) == []
        # A lease that runs out makes the row due again (a crashed process).
        expired = await two.webhook_claim("four", slots=slots, lease=60, now=time.time() + 3600)
        assert len(expired) == 4
