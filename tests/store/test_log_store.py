"""The store's contract: the same named operations behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers import store_url
from relay.migrations import alembic_config

from relay.errors import Conflict, NotFound
from relay.logstore import LogStore, metadata
from relay.model import HistoricEvent, Imported, NewMessage, Outcome


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogStore]:
    async with AsyncExitStack() as stack:
        url = await store_url(request.param, tmp_path / "relay.db", stack)
        s = await LogStore.open(url)
        stack.push_async_callback(s.close)
        await s.upgrade()
        yield s


def message(
    qid: str, rcpts: tuple[str, ...] = ("jane@example.com",), *, at: float | None = None, **kw: object
) -> NewMessage:
    fields: dict[str, object] = {
        "queue_id": qid,
        "message_id": f"{qid.lower()}@app.example",
        "mail_from": "app@example.com",
        "recipients": rcpts,
        "subject": "Hello",
        "tags": ("welcome",),
        "user": "app",
        "client_ip": "127.0.0.1",
        "received_at": time.time() if at is None else at,
        "raw": b"Subject: Hello\r\n\r\nbody\r\n",
        "details": {"client_ip": "127.0.0.1"},
    }
    fields.update(kw)
    return NewMessage(**fields)  # type: ignore[arg-type]


def outcome(
    c_id: int, qid: str, address: str, status: str, *, attempts: int = 1, next_at: float | None = None
) -> Outcome:
    event = "delivered" if status == "delivered" else "deferred"
    return Outcome(
        recipient_id=c_id, queue_id=qid, address=address, status=status, attempts=attempts,
        next_attempt_at=next_at, last_response="250 2.0.0 ok", event=event,
        details={"attempt": attempts, "code": 250}, at=time.time(),
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*expression-based index:UserWarning", "ignore:.*expression-based index")
async def test_schema_matches_the_migrations(store: LogStore) -> None:
    diff = await store._engines.read(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
    assert diff == []


async def test_enqueue_and_lookup(store: LogStore) -> None:
    await store.enqueue(message("01AAA", ("jane@example.com", "Bob@Example.org")))
    (m,) = await store.lookup("01AAA")
    assert m.tags == ("welcome",)
    assert [r.address for r in m.recipients] == ["jane@example.com", "Bob@Example.org"]
    assert [e.type for e in m.events] == ["received"]
    assert [x.queue_id for x in await store.lookup("bob@example.org")] == ["01AAA"]
    assert [x.queue_id for x in await store.lookup("<01aaa@app.example>")] == ["01AAA"]
    assert await store.lookup("nobody@example.com") == []
    assert (await store.get_message("01AAA")) is not None
    assert (await store.get_message("01ZZZ")) is None


async def test_lookup_by_recipient_is_newest_first(store: LogStore) -> None:
    now = time.time()
    for i, qid in enumerate(["01A1", "01A2", "01A3"]):
        await store.enqueue(message(qid, at=now + i))
    assert [m.queue_id for m in await store.lookup("jane@example.com")] == ["01A3", "01A2", "01A1"]
    assert [m.queue_id for m in await store.lookup("jane@example.com", limit=2)] == ["01A3", "01A2"]


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
    assert await store.release("w1", [c.recipient_id], now=now) == 1
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


async def test_users(store: LogStore) -> None:
    await store.add_user("app", "scrypt$hash")
    with pytest.raises(Conflict):
        await store.add_user("app", "other")
    assert [name for name, _ in await store.list_users()] == ["app"]
    assert await store.password_hash("app") == "scrypt$hash"
    await store.remove_user("app")
    with pytest.raises(NotFound):
        await store.remove_user("app")
    assert await store.password_hash("app") is None


async def test_a_failed_write_leaves_nothing(store: LogStore) -> None:
    await store.enqueue(message("01D1"))
    with pytest.raises(Exception, match="store operation failed"):
        await store.enqueue(message("01D1", ("other@example.com",)))  # duplicate queue id
    (m,) = await store.lookup("01D1")
    assert [r.address for r in m.recipients] == ["jane@example.com"]
    assert await store._engines.read(lambda c: c.scalar(sa.text("SELECT count(*) FROM recipients"))) == 1


async def test_bulk_import_and_stats(store: LogStore) -> None:
    day = 86400.0
    t0 = 1_800_000_000.0
    items = []
    for i in range(12):
        tag = "reset" if i % 2 else "welcome"
        at = t0 + i * 60
        msg = message(
            f"01B{i:04d}",
            (f"u{i}@{'a' if i % 3 else 'b'}.example",),
            at=at,
            tags=(tag,),
            user="app" if i < 6 else "shop",
        )
        status = "delivered" if i < 9 else "bounced"
        evs = [
            HistoricEvent(at, "received", None, {}),
            HistoricEvent(at + 2 + i, status, msg.recipients[0], {"code": 250}),
        ]
        if i in (1, 3):
            evs.append(HistoricEvent(at + 100, "opened", msg.recipients[0], {"machine": False}))
            evs.append(HistoricEvent(at + 101, "opened", msg.recipients[0], {"machine": False}))  # still one unique
        if i == 5:
            evs.append(HistoricEvent(at + 3, "opened", msg.recipients[0], {"machine": True}))
            evs.append(HistoricEvent(at + 200, "clicked", msg.recipients[0], {"machine": False, "url": "https://x"}))
        items.append(Imported(msg, status, 1, None, "250 ok", tuple(evs)))
    await store.bulk_import(items)
    (m,) = await store.lookup("01B0003")
    assert m.recipients[0].status == "delivered"
    assert [e.type for e in m.events] == ["received", "delivered", "opened", "opened"]

    by_tag = {r.group: r for r in await store.stats(t0, t0 + day, "tag")}
    assert set(by_tag) == {"reset", "welcome"}
    reset = by_tag["reset"]
    assert (reset.received, reset.delivered, reset.bounced) == (6, 4, 2)
    assert (reset.unique_opens, reset.unique_opens_machine, reset.unique_clicks) == (2, 1, 1)
    assert reset.latency_p50 is not None
    assert by_tag["welcome"].unique_opens == 0

    by_user = {r.group: r.received for r in await store.stats(t0, t0 + day, "user")}
    assert by_user == {"app": 6, "shop": 6}
    by_domain = {r.group: (r.received, r.delivered + r.bounced) for r in await store.stats(t0, t0 + day, "domain")}
    assert by_domain == {"a.example": (8, 8), "b.example": (4, 4)}
    assert await store.stats(t0 + day, t0 + 2 * day, "tag") == []


# -- tracked links: stored 256 to a row (link_chunks), one chunk read per click


def urls(qid: str, n: int) -> tuple[str, ...]:
    return tuple(f"https://example.com/{qid}/{i}" for i in range(n))


async def recipient_ids(store: LogStore) -> dict[str, int]:
    rows = await store._engines.read(lambda c: c.execute(sa.text("SELECT message_id, id FROM recipients")).all())
    return {r.message_id: r.id for r in rows}


async def test_a_click_resolves_its_link_in_its_chunk(store: LogStore) -> None:
    await store.enqueue(message("01L1", links=urls("01L1", 600)))
    await store.enqueue(message("01L2", links=urls("01L2", 3)))
    await store.enqueue(message("01L3"))
    ids = await recipient_ids(store)
    for ordinal in (0, 255, 256, 599):
        target = await store.tracking_target(ids["01L1"], ordinal)
        assert target is not None
        assert (target.queue_id, target.address, target.url) == (
            "01L1",
            "jane@example.com",
            f"https://example.com/01L1/{ordinal}",
        )
    for qid, ordinal in (("01L1", 600), ("01L1", 767), ("01L1", 768), ("01L1", -1), ("01L2", 3), ("01L3", 0)):
        assert await store.tracking_target(ids[qid], ordinal) is None, (qid, ordinal)
    opened = await store.tracking_target(ids["01L3"], None)
    assert opened is not None
    assert opened.url is None
    chunks = await store._engines.read(
        lambda c: c.execute(sa.text("SELECT message_id, chunk FROM link_chunks ORDER BY message_id, chunk")).all()
    )
    assert [tuple(r) for r in chunks] == [("01L1", 0), ("01L1", 1), ("01L1", 2), ("01L2", 0)]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_upgrading_from_0002_moves_links_into_chunks_and_back(backend: str, tmp_path: Path) -> None:
    # 41,000 links cross the migration's pages (20,000 links, not a multiple of 256); 01M3 has a gap.
    ordinals = {"01M1": list(range(41_000)), "01M2": list(range(600)), "01M3": [0, 1, 3]}
    rows = [{"m": qid, "o": o, "u": f"https://example.com/{qid}/{o}"} for qid, found in ordinals.items() for o in found]
    async with AsyncExitStack() as stack:
        url = await store_url(backend, tmp_path / "relay.db", stack)
        store = await LogStore.open(url)
        stack.push_async_callback(store.close)
        await store._engines.write(lambda conn: command.upgrade(alembic_config(conn), "0002"))
        for qid in (*ordinals, "01M4"):
            await store.enqueue(message(qid))  # no links: nothing written to a links table
        insert = sa.text("INSERT INTO links (message_id, ordinal, url) VALUES (:m, :o, :u)")
        await store._engines.write(lambda conn: conn.execute(insert, rows))

        await store.upgrade()
        assert await store.schema_state() == "current"
        ids = await recipient_ids(store)
        for qid, found in ordinals.items():
            for o in {*found[:2], *found[-2:], 255, 256, 20_000, 40_999}:
                target = await store.tracking_target(ids[qid], o)
                expected = f"https://example.com/{qid}/{o}" if o in found else None
                assert (target and target.url) == expected, (qid, o)
            assert await store.tracking_target(ids[qid], found[-1] + 1) is None
        assert await store.tracking_target(ids["01M3"], 2) is None  # the gap stays a gap
        assert await store.tracking_target(ids["01M4"], 0) is None
        count = sa.text("SELECT count(*) FROM link_chunks")
        assert await store._engines.read(lambda c: c.scalar(count)) == 161 + 3 + 1

        await store._engines.write(lambda conn: command.downgrade(alembic_config(conn), "0002"))
        back = await store._engines.read(
            lambda c: c.execute(
                sa.text("SELECT message_id, ordinal, url FROM links ORDER BY message_id, ordinal")
            ).all()
        )
        assert [{"m": m, "o": o, "u": u} for m, o, u in back] == rows
