"""Retention in the store, on SQLite and PostgreSQL: old finished mail purged in batches with
everything hanging on it; active, held and case-held mail kept however old; bodies purged with
the timeline kept; the webhook outbox and the audit; a dry run that deletes nothing and says
exactly what a real run then deletes; one purger at a time."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from helpers import raw_sql, stores
from helpers.retention_seed import DAY, NOW, counts, qid, seed, sql, webhook_row
from sqlalchemy.engine import Connection

from relay.config import RetentionConfig
from relay.logstore import LogStore
from relay.model import RetentionCount

store, url = stores.store, stores.url  # fixtures: a migrated store on SQLite and on PostgreSQL
KEEP = RetentionConfig()  # 7d, 90d, 14d, 400d
ONLY_MESSAGES = RetentionConfig(bodies=0, messages=90 * DAY, webhook_deliveries=0, audit=0)


def _by_kind(result: list[RetentionCount] | None) -> dict[str, tuple[int, int]]:
    assert result is not None
    return {c.kind: (c.rows, c.bytes) for c in result}


async def test_old_finished_mail_is_purged_in_batches(store: LogStore, url: str) -> None:
    old = [qid(i) for i in range(10)]
    new = [qid(i, "01NEW") for i in range(2)]
    size = 0
    for i, q in enumerate(old):
        size += len(await seed(store, q, ("delivered", "bounced", "expired", "cancelled", "suppressed")[i % 5],
                               age=(91 + i) * DAY, rcpts=("jane@example.com", "joe@example.net")))  # fmt: skip
    for q in new:
        await seed(store, q, "delivered", age=89 * DAY)
    before = await counts(url, old)
    assert before["link_chunks"] == 10
    assert before["message_tags"] == 10
    batches: list[RetentionCount] = []
    done = await store.purge("messages", NOW - 90 * DAY, 3, now=NOW, on_batch=batches.append)
    assert done == RetentionCount("messages", 10, size)
    assert [b.rows for b in batches] == [3, 3, 3, 1]  # four transactions
    assert set((await counts(url, old)).values()) == {0}  # message, body, tags, recipients, events, links
    kept = await counts(url, new)
    assert kept["messages"] == 2
    assert kept["bodies"] == 2
    assert await store.get_message(old[0]) is None
    assert await store.raw_message(old[0]) is None
    # A second pass has nothing left to do.
    assert await store.purge("messages", NOW - 90 * DAY, 3, now=NOW) == RetentionCount("messages", 0, 0)


async def test_active_and_held_mail_is_kept_however_old(store: LogStore, url: str) -> None:
    kept = {}
    for i, status in enumerate(("queued", "deferred", "sending", "held")):
        kept[status] = qid(i)
        await seed(store, kept[status], status, age=400 * DAY)
    # One recipient done long ago, the other still deferred: the message is not finished.
    await seed(store, qid(10), "delivered", age=400 * DAY, rcpts=("a@example.com", "b@example.com"))
    await sql(url, "UPDATE recipients SET status = 'deferred', next_attempt_at = 0 WHERE address = 'b@example.com'")
    # Received long ago, delivered yesterday (deferred for weeks): finished too recently.
    await seed(store, qid(11), "delivered", age=400 * DAY)
    await sql(url, "UPDATE recipients SET updated_at = :at WHERE queue_id = :q", at=NOW - DAY, q=qid(11))
    ids = [*kept.values(), qid(10), qid(11)]
    before = await counts(url, ids)
    result = await store.retention_run(KEEP, now=NOW)
    assert _by_kind(result)["messages"] == (0, 0)
    assert _by_kind(result)["bodies"] == (0, 0)
    assert await counts(url, ids) == before
    for q in ids:
        assert await store.raw_message(q) is not None


async def test_an_open_case_holds_its_messages_a_closed_one_does_not(store: LogStore, url: str) -> None:
    await seed(store, qid(1), "bounced", age=200 * DAY)
    await seed(store, qid(2), "bounced", age=200 * DAY)
    await seed(store, qid(3), "delivered", age=10 * DAY)  # only its body is old enough
    held = await store.open_case(title="Open", queue_ids=[qid(1), qid(3)], actor="ann", incident="bounced")
    closed = await store.open_case(title="Closed", queue_ids=[qid(2)], actor="ann", incident="bounced")
    await store.close_case(closed.id, "customer went away", actor="ann")
    result = await store.retention_run(KEEP, now=NOW)
    assert _by_kind(result)["messages"][0] == 1
    assert _by_kind(result)["bodies"][0] == 0  # qid(3)'s body is held by the open case too
    assert await store.get_message(qid(1)) is not None
    assert await store.raw_message(qid(3)) is not None
    assert await store.get_message(qid(2)) is None
    # The closed case keeps its trail and its link to the purged message.
    view = await store.case(closed.id, sla=1e9)
    assert view is not None
    assert view.queue_ids == (qid(2),)
    assert await store.case_messages(view) == []
    assert (await store.verify_chains()).ok
    # Once the case is closed, its messages go at the next pass.
    await store.close_case(held.id, "done", actor="ann")
    result = await store.retention_run(KEEP, now=NOW)
    assert _by_kind(result)["messages"][0] == 1
    assert _by_kind(result)["bodies"][0] == 1
    assert await store.get_message(qid(1)) is None


async def test_a_retried_message_is_not_purged(store: LogStore, url: str) -> None:
    """A finished message made active again (a retry) after a pass read it as a candidate is
    checked again under the deleting transaction's locks."""
    from relay.store import retention
    from relay.store.engine import Engine

    await seed(store, qid(1), "bounced", age=200 * DAY)
    await seed(store, qid(2), "queued", age=0)
    engine = Engine(url)  # the store's own functions, on connections of the test's own
    try:
        found = await engine.read(
            lambda conn: retention.candidates(
                conn, "messages", retention.START["messages"], cutoff=NOW - 90 * DAY, batch=10
            )
        )
        assert found.keys == [qid(1)]
        assert await store.retry(qid(1), by="ann") == 1
        done = await engine.transaction(lambda conn: retention.purge_messages(conn, found.keys, cutoff=NOW - 90 * DAY))
    finally:
        await engine.dispose()
    assert done.count.rows == 0
    assert await store.get_message(qid(1)) is not None


async def test_bodies_are_purged_and_the_timeline_stays(store: LogStore, url: str) -> None:
    body = await seed(store, qid(1), "delivered", age=8 * DAY)
    await seed(store, qid(2), "delivered", age=6 * DAY)
    await seed(store, qid(3), "deferred", age=30 * DAY)
    result = await store.retention_run(KEEP, now=NOW)
    assert _by_kind(result)["bodies"] == (1, len(body))
    assert await store.raw_message(qid(1)) is None
    assert await store.raw_message(qid(2)) is not None
    assert await store.raw_message(qid(3)) is not None
    view = await store.get_message(qid(1))
    assert view is not None
    assert [e.type for e in view.events] == ["received", "delivered", "body_purged"]
    purged = view.events[-1]
    assert purged.at == NOW
    assert purged.recipient is None
    assert dict(purged.details) == {"kept": "7d", "bytes": len(body)}
    assert (await counts(url, [qid(1)]))["link_chunks"] == 1  # links stay until the message goes
    # Nothing twice: no body left, no second event.
    assert _by_kind(await store.retention_run(KEEP, now=NOW))["bodies"] == (0, 0)
    view = await store.get_message(qid(1))
    assert view is not None
    assert [e.type for e in view.events].count("body_purged") == 1
    with pytest.raises(Exception, match="no longer kept"):
        await store.resend(qid(1), "jane@example.com", "jane@example.org", by="ann")


async def test_webhook_deliveries_finished_and_old_are_purged(store: LogStore, url: str) -> None:
    await webhook_row(url, "pending", age=30 * DAY)  # an endpoint that has been failing: kept
    await webhook_row(url, "delivered", age=15 * DAY, body=b"x" * 100)
    await webhook_row(url, "failed", age=15 * DAY, body=b"y" * 50)
    await webhook_row(url, "delivered", age=13 * DAY)
    result = await store.retention_run(KEEP, now=NOW)
    assert _by_kind(result)["webhook_deliveries"] == (2, 150)

    def left(conn: Connection) -> list[tuple[str, float]]:
        rows = conn.execute(sa.text("SELECT status, updated_at FROM webhook_deliveries ORDER BY updated_at"))
        return [(r.status, round((NOW - r.updated_at) / DAY)) for r in rows]

    assert await raw_sql(url, left) == [("pending", 30), ("delivered", 13)]


async def test_audit_purge_keeps_the_chain_verifiable(store: LogStore, url: str) -> None:
    for i in range(5):
        await store.audit(actor="ann", ip="192.0.2.1", action="signin", now=NOW - (500 - i) * DAY)
    for i in range(3):
        await store.audit(actor="bob", ip="192.0.2.2", action="view_body", now=NOW - (10 - i) * DAY)
    case = await store.open_case(title="Old", actor="ann", incident="x", now=NOW - 600 * DAY)
    batches: list[RetentionCount] = []
    result = await store.retention_run(KEEP, now=NOW, batch=2, on_batch=batches.append)
    assert _by_kind(result)["audit"] == (5, 0)
    assert [b.rows for b in batches if b.kind == "audit"] == [2, 2, 1]
    report = await store.verify_chains()
    assert report.ok, report.text()
    # 3 lines kept, the case's audit line (opened at NOW-600d? no: its line is dated now), 3 purge lines.
    entries, _ = await store.audit_entries(limit=100)
    purges = [e for e in entries if e.action == "retention.purge"]
    assert len(purges) == 3
    assert report.base is not None
    assert purges[0].details["through_id"] == report.base[0] == 5
    assert purges[0].details["hash"] == report.base[1]
    assert "purged by retention" in report.text()
    assert min(e.id for e in entries) == 6
    # Case trails are not the audit's: the case keeps its whole trail.
    view = await store.case(case.id, sla=1e9)
    assert view is not None
    assert len(view.entries) == 1
    # Running again: nothing more, no new purge line.
    assert _by_kind(await store.retention_run(KEEP, now=NOW))["audit"] == (0, 0)
    assert len([e for e in (await store.audit_entries(limit=100))[0] if e.action == "retention.purge"]) == 3


async def test_a_dry_run_deletes_nothing_and_says_what_a_run_deletes(store: LogStore, url: str) -> None:
    for i in range(7):
        await seed(store, qid(i), "delivered", age=(91 + i) * DAY)  # whole messages
    for i in range(4):
        await seed(store, qid(i, "01BOD"), "bounced", age=(8 + i) * DAY)  # bodies only
    await seed(store, qid(1, "01ACT"), "deferred", age=120 * DAY)
    await webhook_row(url, "delivered", age=20 * DAY)
    await webhook_row(url, "pending", age=20 * DAY)
    for i in range(4):
        await store.audit(actor="ann", ip="", action="signin", now=NOW - 401 * DAY + i)
    for age in (100 * DAY, 0):  # the newest report stays (its id is not handed out again)
        await sql(
            url,
            "INSERT INTO bounce_reports (received_at, queue_id, recipient, kind, result, mail_from, client_ip, size,"
            " data) VALUES (:at, NULL, NULL, 'unknown', 'unmatched', 'x@example.net', '127.0.0.1', 3, :data)",
            at=NOW - age, data=b"abc",
        )  # fmt: skip
    before = await counts(url)
    dry = await store.retention_run(KEEP, now=NOW, dry_run=True, batch=3)
    assert await counts(url) == before
    real = await store.retention_run(KEEP, now=NOW, batch=3)
    assert dry == real
    got = _by_kind(real)
    assert got["messages"][0] == 7
    assert got["bodies"][0] == 4
    assert got["webhook_deliveries"][0] == 1
    assert got["audit"] == (4, 0)
    assert (await counts(url))["bounce_reports"] == 1
    assert (await counts(url))["messages"] == 4 + 1
    assert (await store.verify_chains()).ok


async def test_zero_keeps_a_kind_forever(store: LogStore, url: str) -> None:
    await seed(store, qid(1), "delivered", age=5000 * DAY)
    await webhook_row(url, "delivered", age=5000 * DAY)
    await store.audit(actor="ann", ip="", action="signin", now=NOW - 5000 * DAY)
    before = await counts(url)
    forever = RetentionConfig(bodies=0, messages=0, webhook_deliveries=0, audit=0)
    result = await store.retention_run(forever, now=NOW)
    assert result == [RetentionCount(k, 0, 0) for k in ("messages", "bodies", "webhook_deliveries", "audit")]
    assert await counts(url) == before


async def test_the_newest_row_stays_so_that_sqlite_never_reuses_its_id(store: LogStore, url: str) -> None:
    """SQLite hands out the largest id + 1: were the newest recipient purged, the next message's
    recipient would get its id, and an old tracking token (which names a recipient id) would
    count for the new message and redirect to its link."""
    for i in range(3):
        await seed(store, qid(i), "delivered", age=100 * DAY)

    def newest(conn: Connection) -> int:
        return int(conn.execute(sa.text("SELECT max(id) FROM recipients")).scalar_one())

    last = await raw_sql(url, newest)
    result = await store.retention_run(ONLY_MESSAGES, now=NOW)
    assert _by_kind(result)["messages"][0] == 2
    assert await store.get_message(qid(2)) is not None
    await seed(store, qid(9), "queued", age=0)
    assert await raw_sql(url, newest) == last + 1
    await seed(store, qid(10), "queued", age=0)
    assert _by_kind(await store.retention_run(ONLY_MESSAGES, now=NOW))["messages"][0] == 1  # qid(2) now
    assert await store.get_message(qid(2)) is None


async def test_foreign_keys_cascade_on_both_stores(store: LogStore, url: str) -> None:
    """Retention deletes a message's rows itself; the schema's keys would too (checked here)."""
    await seed(store, qid(1), "delivered", age=DAY)
    await sql(
        url,
        "INSERT INTO bounce_reports (received_at, queue_id, recipient, kind, result, mail_from, client_ip, size, data)"
        " VALUES (0, :q, NULL, 'dsn', 'matched', '', '127.0.0.1', 1, :data)",
        q=qid(1), data=b"x",
    )  # fmt: skip

    def delete(conn: Connection) -> None:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.execute(sa.text("DELETE FROM messages WHERE queue_id = :q"), {"q": qid(1)})

    await raw_sql(url, delete, write=True)
    assert set((await counts(url, [qid(1)])).values()) == {0}


async def test_one_store_purges_at_a_time(store: LogStore, url: str) -> None:
    """Another store (another process or node) finds the purge lock taken and skips its pass,
    without an error; what the first deletes is deleted once."""
    for i in range(8):
        await seed(store, qid(i), "delivered", age=100 * DAY)
    await seed(store, qid(0, "01NEW"), "delivered", age=DAY)  # the newest recipient's message stays anyway
    other = await LogStore.open(url)
    try:
        first_batch = asyncio.Event()

        def seen(_: RetentionCount) -> None:
            first_batch.set()

        running = asyncio.create_task(store.retention_run(ONLY_MESSAGES, now=NOW, batch=2, on_batch=seen, pause=0.3))
        await asyncio.wait_for(first_batch.wait(), 30)
        assert await other.retention_run(ONLY_MESSAGES, now=NOW) is None  # busy: skipped
        assert _by_kind(await running)["messages"][0] == 8
        # Both at once, many times: never an error, never more than was there.
        for round_ in range(3):
            for i in range(4):
                await seed(store, qid(i, f"01R{round_}"), "delivered", age=100 * DAY)
            await seed(store, qid(round_ + 1, "01NEW"), "delivered", age=DAY)
            results = await asyncio.gather(
                store.retention_run(ONLY_MESSAGES, now=NOW, batch=1),
                other.retention_run(ONLY_MESSAGES, now=NOW, batch=1),
            )
            assert sum(_by_kind(r)["messages"][0] for r in results if r is not None) == 4
            assert [r for r in results if r is not None]  # at least one ran
        assert (await counts(url))["messages"] == 4  # the recent ones
    finally:
        await other.close()


async def test_idle_console_sessions_go_with_a_pass(store: LogStore, url: str) -> None:
    await store.add_user("ann", "x", "support")
    await store.session_create("ann", "192.0.2.1", idle=9 * 3600, now=NOW - 2 * 3600)
    new_token, _ = await store.session_create("ann", "192.0.2.1", idle=9 * 3600, now=NOW - 60)

    def sessions(conn: Connection) -> int:
        return int(conn.execute(sa.text("SELECT count(*) FROM console_sessions")).scalar_one())

    assert await raw_sql(url, sessions) == 2
    await store.retention_run(KEEP, now=NOW, dry_run=True, session_idle=3600)
    assert await raw_sql(url, sessions) == 2
    await store.retention_run(KEEP, now=NOW, session_idle=3600)
    assert await raw_sql(url, sessions) == 1
    assert await store.session_get(new_token, idle=3600, now=NOW) is not None


async def test_a_dry_run_counts_the_body_of_the_newest_message_the_run_keeps(store: LogStore) -> None:
    """The newest recipient's message stays whole (see above), so a run deletes only its body:
    the dry run says so too."""
    await seed(store, qid(1), "delivered", age=100 * DAY)
    dry = await store.retention_run(KEEP, now=NOW, dry_run=True)
    real = await store.retention_run(KEEP, now=NOW)
    assert dry == real
    assert _by_kind(real)["messages"][0] == 0
    assert _by_kind(real)["bodies"][0] == 1
