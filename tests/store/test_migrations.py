"""The migrations, on SQLite and PostgreSQL: they create exactly the tables the code declares,
and a store written by an older Relay is found whole after the upgrade (and back after a
downgrade)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
import store_fixtures
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers import raw_sql, store_url
from sqlalchemy.engine import Connection
from store_fixtures import message, recipient_ids

from relay.logstore import LogStore
from relay.store.migrations import alembic_config
from relay.store.schema import metadata

store, url = store_fixtures.store, store_fixtures.url  # the fixtures, on both backends


@pytest.mark.filterwarnings("ignore:.*expression-based index:UserWarning", "ignore:.*expression-based index")
async def test_schema_matches_the_migrations(store: LogStore, url: str) -> None:
    diff = await raw_sql(url, lambda c: compare_metadata(MigrationContext.configure(c), metadata))
    assert diff == []


def plant_0002(conn: Connection, qid: str, at: float, recipients: tuple[str, ...], links: list[int]) -> None:
    """A message as Relay wrote it at revision 0002: ``messages.id`` and ``message_id`` columns
    holding the queue id, one ``links`` row per link, a delivered first recipient."""
    conn.execute(
        sa.text(
            "INSERT INTO messages (id, message_id, mail_from, subject, size, tags, username, client_ip, received_at,"
            " track) VALUES (:q, :mid, 'app@example.com', 'Hello', 20, :tags, 'app', '127.0.0.1', :at, 'clicks')"
        ).bindparams(sa.bindparam("tags", type_=metadata.tables["messages"].c.tags.type)),
        {"q": qid, "mid": f"{qid.lower()}@app.example", "tags": ["welcome"], "at": at},
    )
    conn.execute(
        sa.text("INSERT INTO bodies (message_id, data) VALUES (:q, :d)"), {"q": qid, "d": b"body of " + qid.encode()}
    )
    conn.execute(sa.text("INSERT INTO message_tags (message_id, tag) VALUES (:q, 'welcome')"), {"q": qid})
    for n, address in enumerate(recipients):
        status = "delivered" if n == 0 else "deferred"
        conn.execute(
            sa.text(
                "INSERT INTO recipients (message_id, address, domain, status, attempts, next_attempt_at, updated_at)"
                " VALUES (:q, :a, 'example.com', :s, 1, :next, :at)"
            ),
            {"q": qid, "a": address, "s": status, "next": None if n == 0 else at + 300, "at": at + 1},
        )
    event = sa.text("INSERT INTO events (message_id, recipient, at, type, details) VALUES (:q, :r, :at, :t, :d)")
    event = event.bindparams(sa.bindparam("d", type_=metadata.tables["events"].c.details.type))
    conn.execute(
        event,
        [{"q": qid, "r": None, "at": at, "t": "received", "d": {"client_ip": "127.0.0.1"}}]
        + [{"q": qid, "r": a, "at": at + 1, "t": "delivered" if n == 0 else "deferred", "d": {"code": 250}}
           for n, a in enumerate(recipients)],
    )  # fmt: skip
    if links:
        conn.execute(
            sa.text("INSERT INTO links (message_id, ordinal, url) VALUES (:m, :o, :u)"),
            [{"m": qid, "o": o, "u": f"https://example.com/{qid}/{o}"} for o in links],
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_0002_store_upgraded_to_head_finds_everything_and_downgrades(backend: str, tmp_path: Path) -> None:
    # 41,000 links cross 0003's pages (20,000 links, not a multiple of 256); 01M3 has a gap.
    ordinals = {"01M1": list(range(41_000)), "01M2": list(range(600)), "01M3": [0, 1, 3], "01M4": []}
    t0 = 1_800_000_000.0
    async with AsyncExitStack() as stack:
        url = await store_url(backend, tmp_path / "relay.db", stack)
        await raw_sql(url, lambda conn: command.upgrade(alembic_config(conn), "0002"), write=True)

        def plant(conn: Connection) -> None:
            for i, (qid, found) in enumerate(ordinals.items()):
                plant_0002(conn, qid, t0 + i, (f"{qid.lower()}@example.com", "x@example.com"), found)

        await raw_sql(url, plant, write=True)

        store = await LogStore.open(url)
        stack.push_async_callback(store.close)
        await store.upgrade()
        assert await store.schema_state() == "current"

        for i, qid in enumerate(ordinals):
            rcpt = f"{qid.lower()}@example.com"
            for query in (qid, rcpt, f"<{qid.lower()}@app.example>", f"{qid.lower()}@app.example"):
                (m,) = await store.lookup(query)
                assert m.queue_id == qid, query
            m = await store.get_message(qid)
            assert m is not None
            assert (m.message_id, m.tags, m.received_at) == (f"{qid.lower()}@app.example", ("welcome",), t0 + i)
            assert [(r.address, r.status) for r in m.recipients] == [(rcpt, "delivered"), ("x@example.com", "deferred")]
            assert [(e.type, e.recipient) for e in m.events] == [
                ("received", None), ("delivered", rcpt), ("deferred", "x@example.com")
            ]  # fmt: skip
            assert (await store.load_bodies([qid]))[qid] == b"body of " + qid.encode()
        assert {m.queue_id for m in await store.lookup("x@example.com")} == set(ordinals)
        page, _ = await store.search(tag="welcome", limit=10)
        assert {m.queue_id for m in page} == set(ordinals)
        summary = await store.queue_summary()
        assert (summary.counts["delivered"], summary.counts["deferred"]) == (4, 4)

        ids = await recipient_ids(url)  # the last recipient of each: x@example.com
        for qid, found in ordinals.items():
            for o in {*found[:2], *found[-2:], 255, 256, 20_000, 40_999}:
                target = await store.tracking_target(ids[qid], o)
                expected = f"https://example.com/{qid}/{o}" if o in found else None
                assert (target and target.url) == expected, (qid, o)
            assert await store.tracking_target(ids[qid], (found[-1] + 1) if found else 0) is None
        assert await store.tracking_target(ids["01M3"], 2) is None  # the gap stays a gap
        count = sa.text("SELECT count(*) FROM link_chunks")
        assert await raw_sql(url, lambda c: c.scalar(count)) == 161 + 3 + 1

        # New writes land in the renamed columns beside the old rows.
        assert await store.retry("01M1", by="test", now=t0 + 100) == 1
        (m,) = await store.lookup("01M1")
        assert [e.type for e in m.events][-1] == "retried"
        await store.enqueue(message("01NEW"))
        assert [x.queue_id for x in await store.lookup("01NEW")] == ["01NEW"]
        await store.close()

        await raw_sql(url, lambda conn: command.downgrade(alembic_config(conn), "0002"), write=True)
        back = await raw_sql(
            url,
            lambda c: c.execute(
                sa.text("SELECT message_id, ordinal, url FROM links ORDER BY message_id, ordinal")
            ).all(),
        )
        expected = [(qid, o, f"https://example.com/{qid}/{o}") for qid, found in ordinals.items() for o in found]
        assert [tuple(r) for r in back] == expected
        old = sa.text("SELECT e.message_id, e.type FROM events e JOIN messages m ON m.id = e.message_id")
        kinds = await raw_sql(url, lambda c: [tuple(r) for r in c.execute(old)])
        assert ("01M1", "retried") in kinds
        assert len(kinds) == 4 * 3 + 1 + 1  # received/delivered/deferred each, the retry, 01NEW's received


async def test_nodes_started_together_on_an_empty_database_migrate_once(tmp_path: Path) -> None:
    """Three stores upgrade a fresh PostgreSQL database at the same moment (nodes of a cluster
    started together): they take turns, and every one finds the schema current."""
    import asyncio

    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        stores = [await LogStore.open(url) for _ in range(3)]
        try:
            await asyncio.gather(*(s.upgrade() for s in stores))
            assert {await s.schema_state() for s in stores} == {"current"}
        finally:
            for s in stores:
                await s.close()
