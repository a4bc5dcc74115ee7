"""Retention: what ``[retention]`` deletes, a small batch at a time.

Four kinds, each purged in its own short transactions so that intake keeps being served:

- ``messages``: messages whose every recipient is final and was last changed before the cutoff,
  with everything hanging on them (body, tags, recipients, events, tracked links, matched bounce
  reports, idempotency keys). Unmatched bounce reports older than the cutoff go too.
- ``bodies``: the raw message of such messages (a shorter cutoff); the timeline stays, with a
  "body_purged" event.
- ``webhook_deliveries``: delivered and failed outbox rows last changed before the cutoff.
- ``audit``: the oldest lines of the access audit, as a prefix of its hash chain; the chain's
  new start is anchored (chain.BASE) and recorded in a "retention.purge" line (chain.verify).

A message that still has a recipient in the queue (held too), or that an open case covers or
targets, is never touched: that is a hold, checked again under row locks in the deleting
transaction (a retry may have made an old message active since it was read).

Each batch is a read that finds candidates (``candidates``: a bounded window of keys, the rest
filtered by the conditions above) and a write that locks, checks again and deletes (``purge``);
a dry run reads and measures (``measure``) instead. Functions of a connection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.model import CLOSED_CASE_STATES, FINAL_STATES, RetentionCount
from relay.store import audit as audit_store
from relay.store import chain
from relay.store.log import NewEvent, append_events
from relay.store.schema import (
    audit_log,
    bodies,
    bounce_reports,
    case_messages,
    case_targets,
    cases,
    console_sessions,
    events,
    idempotency_keys,
    link_chunks,
    message_tags,
    messages,
    recipients,
    webhook_deliveries,
)

log = logging.getLogger(__name__)

Kind = Literal["bodies", "messages", "webhook_deliveries", "audit"]
# The order a pass runs them in: messages first, so that the bodies of messages deleted whole
# are counted once (under messages), in a dry run as in a real one.
KINDS: Final[tuple[Kind, ...]] = ("messages", "bodies", "webhook_deliveries", "audit")
BATCH: Final = 500  # rows deleted per transaction
WINDOWS: Final = 20  # windows of keys one candidates() read may look through before it returns

m, r, b = messages, recipients, bodies
Cursor = tuple[Any, ...]


# -- what may go


def _finished(cutoff: str) -> sa.ColumnElement[bool]:
    """The message arrived before :cutoff and every recipient is final and was last changed
    before it (a message with no recipient: arrived before it)."""
    unfinished = sa.exists().where(
        r.c.queue_id == m.c.queue_id,
        sa.or_(r.c.status.not_in(FINAL_STATES), r.c.updated_at >= sa.bindparam(cutoff)),
    )
    return sa.and_(m.c.received_at < sa.bindparam(cutoff), ~unfinished)


_open_cases = sa.select(cases.c.id).where(cases.c.state.not_in(CLOSED_CASE_STATES))
# Held by a case that is not closed: a message it covers, or one its actions made (a resend).
_NOT_HELD = sa.and_(
    m.c.queue_id.not_in(sa.select(case_messages.c.queue_id).where(case_messages.c.case_id.in_(_open_cases))),
    m.c.queue_id.not_in(sa.select(case_targets.c.queue_id).where(case_targets.c.case_id.in_(_open_cases))),
)
_QIDS: sa.BindParameter[Any] = sa.bindparam("qids", expanding=True)

# SQLite gives a new row the largest id + 1 (no AUTOINCREMENT): deleting the newest row of a
# table would hand its id out again. A tracking token names a recipient by id, so an old link
# would then count for, and redirect to a link of, a new message. The newest row always stays.
_newest_recipient = sa.select(sa.func.max(r.c.id)).scalar_subquery()
_NOT_NEWEST = m.c.queue_id.not_in(sa.select(r.c.queue_id).where(r.c.id == _newest_recipient))

# Of these messages, those that may go whole (:cutoff is [retention] messages).
MESSAGES_DUE = sa.select(m.c.queue_id).where(m.c.queue_id.in_(_QIDS), _finished("cutoff"), _NOT_HELD, _NOT_NEWEST)
# Of these messages, those whose body may go (:cutoff is [retention] bodies)...
BODIES_DUE = sa.select(m.c.queue_id).where(m.c.queue_id.in_(_QIDS), _finished("cutoff"), _NOT_HELD)
# ... leaving out, in a dry run, those the messages kind deletes whole first (:message_cutoff).
BODIES_DUE_ALONE = BODIES_DUE.where(~sa.and_(_finished("message_cutoff"), _NOT_NEWEST))


def _after(
    stmt: sa.Select[Any], when: sa.ColumnElement[Any], key: sa.ColumnElement[Any], key_param: str
) -> sa.Select[Any]:
    """``stmt`` as a window of keys older than :cutoff, oldest first, after the cursor
    (:at, :<key_param>): a keyset page, so every batch reads a bounded index range."""
    return (
        stmt.where(
            when < sa.bindparam("cutoff"),
            sa.or_(when > sa.bindparam("at"), sa.and_(when == sa.bindparam("at"), key > sa.bindparam(key_param))),
        )
        .order_by(when, key)
        .limit(sa.bindparam("limit"))
    )


# Windows of keys, oldest first, after a cursor.
MESSAGE_WINDOW = _after(sa.select(m.c.received_at, m.c.queue_id), m.c.received_at, m.c.queue_id, "qid")
BODY_WINDOW = (
    sa.select(b.c.queue_id)
    .where(b.c.queue_id > sa.bindparam("qid"))
    .order_by(b.c.queue_id)
    .limit(sa.bindparam("limit"))
)
_w = webhook_deliveries
WEBHOOK_WINDOW = _after(sa.select(_w.c.updated_at, _w.c.id, _w.c.status), _w.c.updated_at, _w.c.id, "wid")

# The deleting side: recipients of the candidates locked first (PostgreSQL; SQLite writes are
# serial already), so nothing makes one active between the check and the delete.
LOCK_RECIPIENTS = sa.select(r.c.id).where(r.c.queue_id.in_(_QIDS)).order_by(r.c.id).with_for_update()
BODY_SIZES = sa.select(b.c.queue_id, sa.func.length(b.c.data).label("size")).where(b.c.queue_id.in_(_QIDS))
REPORT_BYTES = sa.select(sa.func.coalesce(sa.func.sum(bounce_reports.c.size), 0)).where(
    bounce_reports.c.queue_id.in_(_QIDS)
)
DELETE_BODIES = b.delete().where(b.c.queue_id.in_(_QIDS))
# A message and everything hanging on it, children first (the keys cascade on both stores, but
# deleting them here does not depend on a schema's keys having survived every migration).
DELETE_MESSAGE_ROWS: Final = tuple(
    t.delete().where(t.c.queue_id.in_(_QIDS))
    for t in (events, link_chunks, message_tags, bodies, bounce_reports, recipients)
)
# The send API's idempotency keys of those messages (old ones only: the created_at index).
DELETE_IDEMPOTENCY = idempotency_keys.delete().where(
    idempotency_keys.c.created_at < sa.bindparam("cutoff"), idempotency_keys.c.queue_id.in_(_QIDS)
)
DELETE_MESSAGES = m.delete().where(m.c.queue_id.in_(_QIDS))

# Bounce reports that named no message of ours, older than the cutoff.
_orphan = sa.and_(
    bounce_reports.c.queue_id.is_(None),
    bounce_reports.c.received_at < sa.bindparam("cutoff"),
    bounce_reports.c.id < sa.select(sa.func.max(bounce_reports.c.id)).scalar_subquery(),  # ids not reused
)
ORPHAN_REPORTS = (
    sa.select(bounce_reports.c.id, bounce_reports.c.size)
    .where(_orphan, bounce_reports.c.id > sa.bindparam("after"))
    .order_by(bounce_reports.c.id)
    .limit(sa.bindparam("limit"))
)
DELETE_REPORTS = bounce_reports.delete().where(bounce_reports.c.id.in_(sa.bindparam("ids", expanding=True)), _orphan)

_webhook_due = sa.and_(
    _w.c.id.in_(sa.bindparam("ids", expanding=True)),
    _w.c.status != "pending",
    _w.c.updated_at < sa.bindparam("cutoff"),
    _w.c.id < sa.select(sa.func.max(_w.c.id)).scalar_subquery(),  # ids not reused (`relay webhooks retry ID`)
)
WEBHOOK_SIZES = sa.select(_w.c.id, sa.func.length(_w.c.body).label("size")).where(_webhook_due)
DELETE_WEBHOOKS = _w.delete().where(_webhook_due)

# The audit: its oldest lines after the anchor, in chain order.
AUDIT_OLDEST = (
    sa.select(audit_log.c.id, audit_log.c.at, audit_log.c.hash)
    .where(audit_log.c.id > sa.bindparam("after"))
    .order_by(audit_log.c.id)
    .limit(sa.bindparam("limit"))
)
DELETE_AUDIT = audit_log.delete().where(audit_log.c.id > sa.bindparam("after"), audit_log.c.id <= sa.bindparam("last"))

DELETE_IDLE_SESSIONS = console_sessions.delete().where(console_sessions.c.seen_at < sa.bindparam("before"))


def span(seconds: float) -> str:
    """A retention setting as written in the config: "7d", "36h", "90m", "45s"."""
    s = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


# -- reading: candidates and what they weigh


@dataclass(frozen=True, slots=True)
class Found:
    """Keys a batch may delete, and where the next read starts (None: the kind is done)."""

    keys: list[Any]
    cursor: Cursor | None


START: Final[dict[Kind, Cursor]] = {
    "messages": (-1e300, ""),
    "bodies": ("",),
    "webhook_deliveries": (-1e300, 0),
    "audit": (),
}


def candidates(
    conn: Connection, kind: Kind, cursor: Cursor, *, cutoff: float, batch: int, message_cutoff: float | None = None
) -> Found:
    """Up to ``batch`` keys of ``kind`` that may go, read after ``cursor`` through at most
    WINDOWS windows of ``batch`` keys. ``message_cutoff`` (bodies, dry run): leave out the
    bodies of messages the messages kind deletes whole."""
    found: list[Any] = []
    rows: Sequence[Any] = []
    for _ in range(WINDOWS):
        if kind == "messages":
            rows = conn.execute(
                MESSAGE_WINDOW, {"cutoff": cutoff, "at": cursor[0], "qid": cursor[1], "limit": batch}
            ).all()
            if rows:
                cursor = (float(rows[-1].received_at), str(rows[-1].queue_id))
                qids = [row.queue_id for row in rows]
                found += conn.scalars(MESSAGES_DUE, {"qids": qids, "cutoff": cutoff}).all()
        elif kind == "bodies":
            rows = conn.execute(BODY_WINDOW, {"qid": cursor[0], "limit": batch}).all()
            if rows:
                cursor = (str(rows[-1].queue_id),)
                params = {"qids": [row.queue_id for row in rows], "cutoff": cutoff}
                if message_cutoff is None:
                    found += conn.scalars(BODIES_DUE, params).all()
                else:
                    found += conn.scalars(BODIES_DUE_ALONE, {**params, "message_cutoff": message_cutoff}).all()
        elif kind == "webhook_deliveries":
            rows = conn.execute(
                WEBHOOK_WINDOW, {"cutoff": cutoff, "at": cursor[0], "wid": cursor[1], "limit": batch}
            ).all()
            if rows:
                cursor = (float(rows[-1].updated_at), int(rows[-1].id))
                found += [int(row.id) for row in rows if row.status != "pending"]
        else:
            raise ValueError(f"no candidates for {kind!r}")
        if len(rows) < batch:
            return Found(found, None)
        if len(found) >= batch:
            break
    return Found(found, cursor)


def measure(conn: Connection, kind: Kind, keys: Sequence[Any]) -> RetentionCount:
    """What deleting ``keys`` (from ``candidates``) would delete: rows and bytes (a dry run)."""
    if not keys:
        return RetentionCount(kind, 0, 0)
    if kind == "webhook_deliveries":
        sizes = conn.execute(WEBHOOK_SIZES, {"ids": list(keys), "cutoff": float("inf")}).all()
        return RetentionCount(kind, len(sizes), sum(int(s.size or 0) for s in sizes))
    body_bytes = sum(int(s.size or 0) for s in conn.execute(BODY_SIZES, {"qids": list(keys)}))
    if kind == "bodies":
        return RetentionCount(kind, len(keys), body_bytes)
    return RetentionCount(kind, len(keys), body_bytes + int(conn.scalar(REPORT_BYTES, {"qids": list(keys)}) or 0))


# -- deleting: one batch, one transaction


@dataclass(frozen=True, slots=True)
class Purged:
    count: RetentionCount
    queue_ids: tuple[str, ...] = ()  # messages whose body went (the in-process body cache forgets them)


def purge_bodies(conn: Connection, qids: Sequence[str], *, cutoff: float, now: float, kept: str) -> Purged:
    """Delete the bodies of those of ``qids`` that may still go, with a "body_purged" event each."""
    if not qids:
        return Purged(RetentionCount("bodies", 0, 0))
    conn.execute(LOCK_RECIPIENTS, {"qids": list(qids)}).all()
    due = conn.scalars(BODIES_DUE, {"qids": list(qids), "cutoff": cutoff}).all()
    if not due:
        return Purged(RetentionCount("bodies", 0, 0))
    sizes = {s.queue_id: int(s.size or 0) for s in conn.execute(BODY_SIZES, {"qids": due})}
    conn.execute(DELETE_BODIES, {"qids": list(sizes)})
    append_events(
        conn,
        [NewEvent(qid, None, now, "body_purged", {"kept": kept, "bytes": size}) for qid, size in sizes.items()],
    )
    return Purged(RetentionCount("bodies", len(sizes), sum(sizes.values())), tuple(sizes))


def purge_messages(conn: Connection, qids: Sequence[str], *, cutoff: float) -> Purged:
    """Delete those of ``qids`` that may still go, with everything hanging on them."""
    if not qids:
        return Purged(RetentionCount("messages", 0, 0))
    conn.execute(LOCK_RECIPIENTS, {"qids": list(qids)}).all()
    due = list(conn.scalars(MESSAGES_DUE, {"qids": list(qids), "cutoff": cutoff}).all())
    if not due:
        return Purged(RetentionCount("messages", 0, 0))
    weight = measure(conn, "messages", due)
    params = {"qids": due}
    for stmt in DELETE_MESSAGE_ROWS:
        conn.execute(stmt, params)
    conn.execute(DELETE_IDEMPOTENCY, {**params, "cutoff": cutoff})
    deleted = conn.execute(DELETE_MESSAGES, params).rowcount
    return Purged(RetentionCount("messages", deleted, weight.bytes), tuple(due))


def purge_webhooks(conn: Connection, ids: Sequence[int], *, cutoff: float) -> Purged:
    """Delete those of the outbox rows ``ids`` that are still finished and old."""
    if not ids:
        return Purged(RetentionCount("webhook_deliveries", 0, 0))
    params = {"ids": list(ids), "cutoff": cutoff}
    size = sum(int(s.size or 0) for s in conn.execute(WEBHOOK_SIZES, params))
    deleted = conn.execute(DELETE_WEBHOOKS, params).rowcount
    return Purged(RetentionCount("webhook_deliveries", deleted, size))


def orphan_reports(conn: Connection, *, cutoff: float, batch: int, dry_run: bool) -> tuple[int, int]:
    """Bounce reports that matched no message, older than ``cutoff``: up to ``batch`` of them
    deleted (or, dry, counted), as (rows, bytes)."""
    rows = conn.execute(ORPHAN_REPORTS, {"cutoff": cutoff, "after": 0, "limit": batch}).all()
    if rows and not dry_run:
        conn.execute(DELETE_REPORTS, {"ids": [row.id for row in rows], "cutoff": cutoff})
    return len(rows), sum(int(row.size) for row in rows)


def count_orphan_reports(conn: Connection, *, cutoff: float) -> tuple[int, int]:
    """Dry run: every unmatched report older than ``cutoff``, as (rows, bytes)."""
    rows, size, after = 0, 0, 0
    while True:
        found = conn.execute(ORPHAN_REPORTS, {"cutoff": cutoff, "after": after, "limit": 5000}).all()
        rows += len(found)
        size += sum(int(row.size) for row in found)
        if len(found) < 5000:
            return rows, size
        after = int(found[-1].id)


def purge_audit(conn: Connection, *, cutoff: float, batch: int, now: float, kept: str) -> Purged:
    """Delete the audit's oldest lines older than ``cutoff`` (a prefix of the chain, up to
    ``batch``), move the chain's anchor to the last one deleted and record that in a
    "retention.purge" line, all in this transaction, under the chain's head lock."""
    chain.lock_head(conn, "audit")
    base_id, _ = chain.base(conn)
    rows = conn.execute(AUDIT_OLDEST, {"after": base_id, "limit": batch}).all()
    gone = []
    for row in rows:
        if float(row.at) >= cutoff:
            break
        gone.append(row)
    if not gone:
        return Purged(RetentionCount("audit", 0, 0))
    last = gone[-1]
    # The line first: SQLite gives a new row the largest id + 1, which must not be an id deleted.
    audit_store.append(
        conn, actor="retention", ip="", action=chain.PURGE_ACTION, target="audit",
        details={"through_id": int(last.id), "hash": str(last.hash), "entries": len(gone), "kept": kept},
        at=now,
    )  # fmt: skip
    conn.execute(DELETE_AUDIT, {"after": base_id, "last": int(last.id)})
    chain.set_base(conn, int(last.id), str(last.hash))
    return Purged(RetentionCount("audit", len(gone), 0))


def count_audit(conn: Connection, *, cutoff: float) -> int:
    """Dry run: the audit's lines a purge would delete (the chain's prefix older than ``cutoff``)."""
    base_id, _ = chain.base(conn)
    count, after = 0, base_id
    while True:
        rows = conn.execute(AUDIT_OLDEST, {"after": after, "limit": 5000}).all()
        for row in rows:
            if float(row.at) >= cutoff:
                return count
            count += 1
        if len(rows) < 5000:
            return count
        after = int(rows[-1].id)


def delete_idle_sessions(conn: Connection, *, before: float) -> int:
    """Console sessions idle since before ``before`` (they no longer sign anyone in)."""
    return int(conn.execute(DELETE_IDLE_SESSIONS, {"before": before}).rowcount)
