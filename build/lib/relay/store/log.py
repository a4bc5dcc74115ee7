"""The event log: the one function that appends events, message views, lookup, search,
stats, and the tracking targets and engagement events.

Functions of a connection, run by the engine's reader or writer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.model import DELIVERED, EventType, EventView, MessageView, RecipientView, StatsRow, TrackTarget
from relay.store import statements as q
from relay.store import webhooks
from relay.store.schema import LINK_CHUNK, message_tags, messages, recipients


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append to the log."""

    queue_id: str
    recipient: str | None
    at: float
    type: EventType
    details: Mapping[str, object]


def append_events(conn: Connection, new: Sequence[NewEvent]) -> None:
    """Append events to the log, in the transaction of ``conn``: every event row Relay writes
    comes through here (received, attempt outcomes, retried, cancelled, opened/clicked, bulk
    import). It is the seam where the webhook outbox, bounces and suppression will add their
    rows in the same transaction as the event.

    With webhooks configured (the engine's ``webhooks.OUTBOX``), the outbox rows of these
    events are written here too; without, nothing more happens."""
    if not new:
        return
    outbox = webhooks.outbox_of(conn)
    if outbox is not None:
        webhooks.write_events(conn, outbox, new)
    conn.execute(
        q.INSERT_EVENT,
        [{"queue_id": e.queue_id, "recipient": e.recipient, "at": e.at, "type": e.type,
          "details": dict(e.details)} for e in new],
    )  # fmt: skip


# -- views and lookups


def views(conn: Connection, queue_ids: Sequence[str]) -> list[MessageView]:
    """The messages with these queue ids, whole, in the order given (unknown ids left out)."""
    if not queue_ids:
        return []
    params = {"qids": list(queue_ids)}
    msgs = {r.queue_id: r for r in conn.execute(q.VIEW_MESSAGES, params)}
    rcpts: dict[str, list[RecipientView]] = {}
    for r in conn.execute(q.VIEW_RECIPIENTS, params):
        rcpts.setdefault(r.queue_id, []).append(
            RecipientView(r.address, r.status, r.attempts, r.next_attempt_at, r.last_response)
        )
    evs: dict[str, list[EventView]] = {}
    for e in conn.execute(q.VIEW_EVENTS, params):
        details = e.details if isinstance(e.details, dict) else json.loads(e.details)
        evs.setdefault(e.queue_id, []).append(EventView(e.at, e.type, e.recipient, details))
    return [
        MessageView(
            queue_id=m.queue_id,
            message_id=m.message_id,
            mail_from=m.mail_from,
            subject=m.subject,
            size=m.size,
            tags=tuple(m.tags or ()),
            user=m.username,
            client_ip=m.client_ip,
            received_at=m.received_at,
            recipients=tuple(rcpts.get(m.queue_id, ())),
            events=tuple(evs.get(m.queue_id, ())),
        )
        for i in queue_ids
        if (m := msgs.get(i)) is not None
    ]


_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,32}")  # what a queue id can look like (ULIDs are 26)


def lookup(conn: Connection, query: str, limit: int) -> list[MessageView]:
    """Messages matching a queue id, a Message-ID (with or without <>) or a recipient address,
    newest first."""
    query = query.strip()
    bare = query.removeprefix("<").removesuffix(">").strip()
    params = {"qid": query.upper(), "mid": bare, "rcpt": bare.lower(), "limit": limit}
    ids = [r[0] for r in conn.execute(q.BY_QUEUE_ID, params)] if _QUEUE_ID.fullmatch(query) else []
    if not ids:
        search = q.BY_MESSAGE_ID if query.startswith("<") else q.BY_MESSAGE_ID_OR_RECIPIENT
        ids = [r[0] for r in conn.execute(search, params)]
    return views(conn, ids)


def search_statement(
    *,
    queue_id: str | None,
    message_id: str | None,
    recipient: str | None,
    tag: str | None,
    status: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    after: tuple[float, str] | None,
) -> sa.Select[tuple[str, float]]:
    """Messages matching every filter given, newest first, one more than a page."""
    m = messages
    conds: list[sa.ColumnElement[bool]] = []
    if queue_id is not None:
        conds.append(m.c.queue_id == queue_id.upper())
    if message_id is not None:
        conds.append(m.c.message_id == message_id.strip().removeprefix("<").removesuffix(">").strip())
    if recipient is not None:
        rcpt = sa.select(recipients.c.queue_id).where(sa.func.lower(recipients.c.address) == recipient.lower())
        conds.append(m.c.queue_id.in_(rcpt))
    if status is not None:
        conds.append(m.c.queue_id.in_(sa.select(recipients.c.queue_id).where(recipients.c.status == status)))
    if tag is not None:
        conds.append(m.c.queue_id.in_(sa.select(message_tags.c.queue_id).where(message_tags.c.tag == tag)))
    if since is not None:
        conds.append(m.c.received_at >= since)
    if until is not None:
        conds.append(m.c.received_at < until)
    if after is not None:
        at, last = after
        conds.append(sa.or_(m.c.received_at < at, sa.and_(m.c.received_at == at, m.c.queue_id < last)))
    return (
        sa.select(m.c.queue_id, m.c.received_at)
        .where(*conds)
        .order_by(m.c.received_at.desc(), m.c.queue_id.desc())
        .limit(limit + 1)
    )


def search_page(
    conn: Connection, stmt: sa.Select[tuple[str, float]], limit: int
) -> tuple[list[MessageView], tuple[float, str] | None]:
    rows = conn.execute(stmt).all()
    page = rows[:limit]
    more = (float(page[-1].received_at), str(page[-1].queue_id)) if len(rows) > limit else None
    return views(conn, [r.queue_id for r in page]), more


# -- tracking


def tracking_target(conn: Connection, recipient_id: int, ordinal: int | None) -> TrackTarget | None:
    """The recipient a token names (and the link, for clicks); None when either is unknown."""
    r = conn.execute(q.TRACK_RECIPIENT, {"rid": recipient_id}).first()
    if r is None:
        return None
    url = None
    if ordinal is not None:
        if ordinal < 0:
            return None
        chunk, index = divmod(ordinal, LINK_CHUNK)
        urls = conn.scalar(q.LINK_CHUNK_URLS, {"qid": r.queue_id, "chunk": chunk})
        url = urls[index] if urls is not None and index < len(urls) else None
        if url is None:
            return None
    delivered_at = float(r.updated_at) if r.status == DELIVERED else None
    return TrackTarget(r.queue_id, r.address, delivered_at, url)


def record_engagement(
    conn: Connection,
    queue_id: str,
    address: str,
    kind: EventType,
    details: Mapping[str, object],
    *,
    at: float,
    window: float,
) -> bool | None:
    """Append an opened/clicked event unless it repeats a recent one (see LogStore.record_engagement)."""
    if conn.dialect.name == "postgresql":
        # Hits of one recipient serialize across processes and nodes until commit, so two at
        # once cannot both be first, nor both miss the other as a repeat. (SQLite write
        # transactions are serial already.)
        digest = hashlib.blake2b(f"{queue_id}\0{address}".encode(), digest_size=8).digest()
        conn.execute(q.ENGAGEMENT_LOCK, {"key": int.from_bytes(digest, "big", signed=True)})
    same = tuple(details.get(key) for key in ("ip", "user_agent", "url"))
    params = {"qid": queue_id, "recipient": address, "type": kind}
    # Only the last `window` seconds, and one row for `first`: a flood of distinct clients must
    # not make each hit read every hit before it.
    for (recent,) in conn.execute(q.RECENT_ENGAGEMENTS, {**params, "since": at - window}):
        if tuple(recent.get(key) for key in ("ip", "user_agent", "url")) == same:
            return None
    first = not details.get("machine") and conn.scalar(q.FIRST_ENGAGEMENT, params) is None
    append_events(conn, [NewEvent(queue_id, address, at, kind, {**details, "first": first})])
    return first


# -- stats


def stats(conn: Connection, since: float, until: float, group_by: str, *, latencies: bool = True) -> list[StatsRow]:
    """Per tag, recipient domain or user: what happened between since and until; without
    ``latencies`` (the dashboard shows none) the delivery latencies are not read."""
    queries, window = q.STATS[group_by], {"since": since, "until": until}
    rows: dict[str | None, dict[str, Any]] = {}

    def row(key: str | None) -> dict[str, Any]:
        return rows.setdefault(key, {"received": 0, "latencies": [], "opened": [0, 0], "clicked": [0, 0],
                                     "complained": [0, 0], "deferred": 0, "deferrals": 0,
                                     **dict.fromkeys(q.OUTCOME_EVENTS, 0)})  # fmt: skip

    for key, n in conn.execute(queries.received, window):
        row(key)["received"] = n
    for key, kind, n in conn.execute(queries.outcomes, window):
        row(key)[kind] = n
    for key, recipients_deferred, attempts in conn.execute(queries.deferred, window):
        row(key).update(deferred=recipients_deferred, deferrals=attempts)
    for key, kind, is_machine, n in conn.execute(queries.engaged, window):
        row(key)[kind][1 if is_machine else 0] += n
    for key, seconds in conn.execute(queries.waits, window) if latencies else ():
        row(key)["latencies"].append(float(seconds))
    out = []
    for key, v in sorted(rows.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        lat = sorted(v["latencies"])
        out.append(
            StatsRow(
                group=key, received=v["received"], delivered=v["delivered"], deferred=v["deferred"],
                bounced=v["bounced"], expired=v["expired"], deferrals=v["deferrals"],
                complained=sum(v["complained"]), suppressed=v["suppressed"], unique_opens=v["opened"][0],
                unique_opens_machine=v["opened"][1], unique_clicks=v["clicked"][0],
                unique_clicks_machine=v["clicked"][1], latency_p50=_percentile(lat, 0.50),
                latency_p95=_percentile(lat, 0.95),
            )
        )  # fmt: skip
    return out


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 3)
