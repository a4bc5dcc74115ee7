"""The event log, on SQLite and PostgreSQL: lookups, bulk import and stats, tracked links."""

from __future__ import annotations

import time

import sqlalchemy as sa
import store_fixtures
from helpers import raw_sql
from store_fixtures import message, recipient_ids

from relay.logstore import LogStore
from relay.model import EventView, Imported

store, url = store_fixtures.store, store_fixtures.url  # the fixtures, on both backends


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
            EventView(at, "received", None, {}),
            EventView(at + 2 + i, status, msg.recipients[0], {"code": 250}),
        ]
        if i in (1, 3):
            evs.append(EventView(at + 100, "opened", msg.recipients[0], {"machine": False}))
            evs.append(EventView(at + 101, "opened", msg.recipients[0], {"machine": False}))  # still one unique
        if i == 5:
            evs.append(EventView(at + 3, "opened", msg.recipients[0], {"machine": True}))
            evs.append(EventView(at + 200, "clicked", msg.recipients[0], {"machine": False, "url": "https://x"}))
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


async def test_a_click_resolves_its_link_in_its_chunk(store: LogStore, url: str) -> None:
    await store.enqueue(message("01L1", links=urls("01L1", 600)))
    await store.enqueue(message("01L2", links=urls("01L2", 3)))
    await store.enqueue(message("01L3"))
    ids = await recipient_ids(url)
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
    chunks = await raw_sql(
        url, lambda c: c.execute(sa.text("SELECT queue_id, chunk FROM link_chunks ORDER BY queue_id, chunk")).all()
    )
    assert [tuple(r) for r in chunks] == [("01L1", 0), ("01L1", 1), ("01L1", 2), ("01L2", 0)]
