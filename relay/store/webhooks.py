"""The webhook outbox in the store: the rows written in the transaction of the event they
report (``write_events`` from ``log.append_events``, ``write_suppression_changes`` from the
suppression list), and what the dispatcher, the CLI and the API do with them: claim with a
lease, record an attempt, disable and enable an endpoint, list, retry, replay a window.

Which endpoints want which events is the ``Outbox`` the engine carries as the execution option
``OUTBOX`` (set by ``LogStore.open``): with none, ``append_events`` does no extra work.

Functions of a connection, run by the engine's reader or writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row
from ulid import ULID

from relay.errors import NotFound
from relay.model import NO_WEBHOOK_EVENTS, Suppression, iso
from relay.store import paging
from relay.store import statements as q
from relay.store.schema import webhook_deliveries

OUTBOX: Final = "relay_outbox"  # the execution option that carries the Outbox

DeliveryStatus = Literal["pending", "delivered", "failed"]


@dataclass(frozen=True, slots=True)
class Route:
    """An endpoint as the outbox sees it: where, which types (empty: all), every deferral or
    only a recipient's first."""

    url: str
    events: frozenset[str] = frozenset()
    every_deferral: bool = False

    def wants(self, kind: str) -> bool:
        return not self.events or kind in self.events


@dataclass(slots=True)
class Written:
    """Rows went into the outbox: set in the writer's thread inside the transaction, looked at
    once it committed (``after_commit``), so that the dispatcher hears of new rows at once
    rather than at its next poll."""

    dirty: bool = False
    listeners: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self) -> None:
        if self.dirty:
            self.dirty = False
            for listener in self.listeners:
                listener()


@dataclass(frozen=True, slots=True)
class Outbox:
    """The configured endpoints, for the rows written beside each event."""

    routes: tuple[Route, ...]
    written: Written = field(default_factory=Written, compare=False, hash=False)


def _insert(conn: Connection, outbox: Outbox, rows: Sequence[dict[str, object]]) -> None:
    conn.execute(q.INSERT_WEBHOOK_DELIVERY, rows)
    outbox.written.dirty = True


def outbox_of(conn: Connection) -> Outbox | None:
    value = conn.get_execution_options().get(OUTBOX)
    return value if isinstance(value, Outbox) and value.routes else None


class LoggedEvent(Protocol):
    """What the outbox reads of an event (log.NewEvent)."""

    @property
    def queue_id(self) -> str: ...
    @property
    def recipient(self) -> str | None: ...
    @property
    def at(self) -> float: ...
    @property
    def type(self) -> str: ...
    @property
    def details(self) -> Mapping[str, object]: ...


# -- the payload


def webhook_id(kind: str, key: str, at: float) -> str:
    """The webhook-id of an event: "msg_" + a ULID made of the event's time and a digest of
    what it is, so that a retry, a second endpoint and a replay all carry the same id."""
    digest = hashlib.blake2b(f"{kind}\0{key}\0{at!r}".encode(), digest_size=10).digest()
    ms = min(max(0, int(at * 1000)), 2**48 - 1)
    return "msg_" + str(ULID.from_bytes(ms.to_bytes(6, "big") + digest))


def body(kind: str, at: float, data: Mapping[str, object]) -> bytes:
    """The request body, as Standard Webhooks has it; stored once, sent as stored."""
    doc = {"type": kind, "timestamp": iso(at), "data": data}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _message_data(msg: Any, queue_id: str, recipient: str | None, details: Mapping[str, object]) -> dict[str, object]:
    # The message's fields win over a detail of the same name (an async bounce's report "subject").
    return {
        **details,
        "queue_id": queue_id,
        "message_id": None if msg is None else msg.message_id,
        "mail_from": None if msg is None else msg.mail_from,
        "recipient": recipient,
        "tags": [] if msg is None else list(msg.tags or ()),
        "user": None if msg is None else msg.username,
        "subject": None if msg is None else msg.subject,
    }


def _rows(
    routes: Sequence[Route],
    kind: str,
    key: str,
    at: float,
    data: Mapping[str, object],
    *,
    now: float,
    queue_id: str | None = None,
) -> list[dict[str, object]]:
    """``queue_id``: the message a message.* event is about (its page lists the deliveries);
    None for suppression.* events."""
    wid, payload = webhook_id(kind, key, at), body(kind, at, data)
    return [
        {"webhook_id": wid, "url": r.url, "type": kind, "event_at": at, "body": payload, "status": "pending",
         "attempts": 0, "next_attempt_at": now, "created_at": now, "updated_at": now, "queue_id": queue_id}
        for r in routes
    ]  # fmt: skip


# -- written with the events


def write_events(conn: Connection, outbox: Outbox, new: Sequence[LoggedEvent], now: float | None = None) -> int:
    """The outbox rows of message events, before the events themselves are inserted (a
    recipient's first deferral is one with none logged yet). Returns how many rows."""
    wanted: list[tuple[LoggedEvent, str, list[Route]]] = []
    for e in new:
        if e.type in NO_WEBHOOK_EVENTS:
            continue
        kind = "message." + e.type
        routes = [r for r in outbox.routes if r.wants(kind)]
        if routes:
            wanted.append((e, kind, routes))
    if not wanted:
        return 0
    msgs = {
        r.queue_id: r for r in conn.execute(q.WEBHOOK_MESSAGES, {"qids": sorted({e.queue_id for e, _, _ in wanted})})
    }
    seen_deferred: set[tuple[str, str | None]] = set()
    rows: list[dict[str, object]] = []
    for e, kind, wants in wanted:
        routes = wants
        if e.type == "deferred" and not all(r.every_deferral for r in routes):
            key = (e.queue_id, e.recipient)
            first = key not in seen_deferred and (
                conn.scalar(q.EARLIER_DEFERRAL, {"qid": e.queue_id, "rcpt": e.recipient}) is None
            )
            seen_deferred.add(key)
            if not first:
                routes = [r for r in routes if r.every_deferral]
        data = _message_data(msgs.get(e.queue_id), e.queue_id, e.recipient, e.details)
        rows += _rows(
            routes, kind, f"{e.queue_id}\0{e.recipient or ''}", e.at, data, now=e.at if now is None else now,
            queue_id=e.queue_id,
        )  # fmt: skip
    if rows:
        _insert(conn, outbox, rows)
    return len(rows)


def suppression_data(entry: Suppression, actor: str, via: str, removal_reason: str | None) -> dict[str, object]:
    """A suppression.* webhook's data: the entry as the API shows it, who changed it and how,
    and (deleted) why."""
    data: dict[str, object] = {**entry.to_json(), "actor": actor, "via": via}
    if removal_reason is not None:
        data["removal_reason"] = removal_reason
    return data


def write_suppression_changes(
    conn: Connection,
    kind: Literal["suppression.created", "suppression.deleted"],
    changes: Sequence[tuple[Suppression, str]],
    *,
    actor: str,
    at: float,
    removal_reason: str | None = None,
) -> None:
    """The outbox rows of suppression list changes: (entry, origin of the change) each."""
    outbox = outbox_of(conn)
    if outbox is None:
        return
    routes = [r for r in outbox.routes if r.wants(kind)]
    if not routes:
        return
    rows: list[dict[str, object]] = []
    for entry, via in changes:
        rows += _rows(routes, kind, entry.address, at, suppression_data(entry, actor, via, removal_reason), now=at)
    if rows:
        _insert(conn, outbox, rows)


# -- the dispatcher's side


@dataclass(frozen=True, slots=True)
class Pending:
    """A delivery leased to a dispatcher."""

    id: int
    webhook_id: str
    url: str
    type: str
    body: bytes
    attempts: int  # attempts made before this one


@dataclass(frozen=True, slots=True)
class Attempted:
    """What an attempt decided: delivered, due again at ``next_attempt_at``, failed for good,
    or (``disable``) the endpoint answered 410 Gone: the delivery waits for it to come back."""

    id: int
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float | None
    code: int | None
    error: str | None
    disable: bool = False


def claim(
    conn: Connection,
    *,
    owner: str,
    urls: Collection[str],
    slots: Mapping[str, int],
    lease: float,
    limit: int,
    now: float,
) -> list[Pending]:
    """Lease due deliveries to ``owner`` until now + lease: at most ``slots[url]`` for each of
    ``urls`` (disabled endpoints left out), oldest due first."""
    chosen: list[Pending] = []
    for url in sorted(u for u in urls if slots.get(u, 0) > 0):
        # One endpoint at a time, no more rows than it has slots: each row carries its body,
        # and a claim runs whenever slots free up.
        due = q.WEBHOOKS_DUE.limit(min(limit, slots[url]))
        if conn.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True, of=webhook_deliveries)
        for r in conn.execute(due, {"now": now, "urls": [url]}):
            chosen.append(Pending(int(r.id), r.webhook_id, r.url, r.type, bytes(r.body), int(r.attempts)))
    if chosen:
        conn.execute(q.LEASE_WEBHOOKS, {"ids": [p.id for p in chosen], "owner": owner, "until": now + lease, "at": now})
    return chosen


def next_due(conn: Connection, urls: Collection[str]) -> float | None:
    if not urls:
        return None
    value = conn.scalar(q.WEBHOOK_NEXT_DUE, {"urls": sorted(urls)})
    return None if value is None else float(value)


def record(conn: Connection, owner: str, url: str, outcomes: Sequence[Attempted], now: float) -> int:
    """Write attempts' outcomes (only while ``owner`` holds their lease); disable the endpoint
    when one says so. Returns how many were written."""
    written = 0
    for o in outcomes:
        written += conn.execute(
            q.RECORD_WEBHOOK,
            {"did": o.id, "owner": owner, "status": o.status, "attempts": o.attempts, "next_at": o.next_attempt_at,
             "code": o.code, "error": o.error, "at": now},
        ).rowcount  # fmt: skip
    gone = [o for o in outcomes if o.disable]
    if gone:
        disable(conn, url, f"{gone[0].code} {gone[0].error or ''}".strip(), now)
    return written


def release(conn: Connection, owner: str, ids: Sequence[int], now: float) -> int:
    return conn.execute(q.RELEASE_WEBHOOKS, {"ids": list(ids), "owner": owner, "now": now}).rowcount


def disable(conn: Connection, url: str, reason: str, now: float) -> None:
    stmt = q.DISABLE_WEBHOOK_ENDPOINT[conn.dialect.name]
    conn.execute(stmt, {"url": url, "disabled_at": now, "disabled_reason": reason[:500]})


def enable(conn: Connection, url: str, now: float) -> bool:
    """Enable an endpoint again, its pending deliveries due now; False when it was not disabled."""
    was = conn.execute(q.ENABLE_WEBHOOK_ENDPOINT, {"endpoint": url}).rowcount > 0
    conn.execute(q.WEBHOOKS_DUE_NOW, {"endpoint": url, "now": now})
    return was


# -- what the CLI and the API show


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint as `relay webhooks list` shows it."""

    url: str
    pending: int
    failed: int
    delivered: int
    disabled_at: float | None
    disabled_reason: str


@dataclass(frozen=True, slots=True)
class WebhookSummary:
    """The gauges: deliveries pending, when the oldest was written, endpoints disabled."""

    pending: int = 0
    oldest_pending_at: float | None = None
    disabled: int = 0


@dataclass(frozen=True, slots=True)
class Delivery:
    """A row of the outbox, as the API lists it."""

    id: int
    webhook_id: str
    url: str
    type: str
    event_at: float
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    created_at: float
    updated_at: float
    queue_id: str | None = None  # the message a message.* event is about

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "webhook_id": self.webhook_id,
            "url": self.url,
            "type": self.type,
            "event_at": iso(self.event_at),
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at) if self.status == "pending" else None,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "queue_id": self.queue_id,
        }


def endpoints(conn: Connection, urls: Sequence[str]) -> list[Endpoint]:
    """The configured endpoints (and any other the outbox holds rows for), with their counts."""
    counts: dict[str, dict[str, int]] = {u: {} for u in urls}
    for url, status, n in conn.execute(q.WEBHOOK_COUNTS):
        counts.setdefault(url, {})[status] = int(n)
    states = {r.url: r for r in conn.execute(q.WEBHOOK_ENDPOINTS)}
    out = []
    for url, c in counts.items():
        st = states.get(url)
        disabled_at = None if st is None or st.disabled_at is None else float(st.disabled_at)
        out.append(Endpoint(url, c.get("pending", 0), c.get("failed", 0), c.get("delivered", 0), disabled_at,
                            "" if st is None else st.disabled_reason or ""))  # fmt: skip
    return out


def summary(conn: Connection) -> WebhookSummary:
    row = conn.execute(q.WEBHOOK_PENDING).one()
    disabled = sum(1 for r in conn.execute(q.WEBHOOK_ENDPOINTS) if r.disabled_at is not None)
    return WebhookSummary(int(row[0] or 0), None if row[1] is None else float(row[1]), disabled)


def page(
    conn: Connection, *, status: DeliveryStatus | None, url: str | None, limit: int, before: int | None
) -> tuple[list[Delivery], int | None]:
    """Deliveries, newest first, a page at a time: pass the returned id as ``before``."""
    wd = webhook_deliveries
    stmt = q.WEBHOOK_PAGE
    if status is not None:
        stmt = stmt.where(wd.c.status == status)
    if url is not None:
        stmt = stmt.where(wd.c.url == url)
    rows, more = paging.by_id(conn, stmt, wd.c.id, limit=limit, before=before)
    return [delivery(r) for r in rows], more


def delivery(r: Row[Any]) -> Delivery:
    return Delivery(
        int(r.id), r.webhook_id, r.url, r.type, float(r.event_at), r.status, int(r.attempts),
        None if r.next_attempt_at is None else float(r.next_attempt_at), r.last_status, r.last_error,
        float(r.created_at), float(r.updated_at), r.queue_id,
    )  # fmt: skip


# The webhook deliveries of one message's events, newest first.
_OF_MESSAGE = (
    sa.select(webhook_deliveries)
    .where(webhook_deliveries.c.queue_id == sa.bindparam("qid"))
    .order_by(webhook_deliveries.c.id.desc())
    .limit(sa.bindparam("limit"))
)


def of_message(conn: Connection, queue_id: str, limit: int) -> list[Delivery]:
    """The deliveries of one message's events (written since webhook_deliveries.queue_id was), newest first."""
    return [delivery(r) for r in conn.execute(_OF_MESSAGE, {"qid": queue_id, "limit": limit})]


def retry(conn: Connection, delivery_id: int, now: float) -> None:
    """Make one delivery due now (one being sent right now is left to that attempt);
    NotFound when there is none with this id."""
    made_due = conn.execute(q.RETRY_WEBHOOK, {"did": delivery_id, "now": now}).rowcount > 0
    if not made_due and conn.scalar(q.WEBHOOK_EXISTS, {"did": delivery_id}) is None:
        raise NotFound(f"no webhook delivery {delivery_id}")


def replay(conn: Connection, outbox: Outbox, *, since: float, until: float, kinds: Collection[str], now: float) -> int:
    """Queue the events of [since, until) again as new deliveries to the endpoints that want
    them (``kinds``: only these types; empty: all). They carry the webhook-ids of the first
    time. Returns how many deliveries."""

    def wanted(kind: str) -> list[Route]:
        return [r for r in outbox.routes if r.wants(kind) and (not kinds or kind in kinds)]

    rows: list[dict[str, object]] = []
    events = [
        e for e in conn.execute(q.REPLAY_EVENTS, {"since": since, "until": until}) if e.type not in NO_WEBHOOK_EVENTS
    ]
    events = [e for e in events if wanted("message." + e.type)]
    qids = sorted({e.queue_id for e in events})
    msgs: dict[str, Any] = {}
    firsts: set[int] = set()
    for start in range(0, len(qids), 1000):
        chunk = qids[start : start + 1000]
        msgs.update((r.queue_id, r) for r in conn.execute(q.WEBHOOK_MESSAGES, {"qids": chunk}))
        if any(e.type == "deferred" for e in events):
            firsts.update(int(i) for (i,) in conn.execute(q.FIRST_DEFERRALS, {"qids": chunk}))
    for e in events:
        kind = "message." + e.type
        routes = wanted(kind)
        if e.type == "deferred" and int(e.id) not in firsts:
            routes = [r for r in routes if r.every_deferral]
        details = e.details if isinstance(e.details, dict) else json.loads(e.details)
        data = _message_data(msgs.get(e.queue_id), e.queue_id, e.recipient, details)
        rows += _rows(
            routes, kind, f"{e.queue_id}\0{e.recipient or ''}", float(e.at), data, now=now, queue_id=e.queue_id
        )
    for c in conn.execute(q.REPLAY_SUPPRESSION_CHANGES, {"since": since, "until": until}):
        kind = "suppression.created" if c.action == "added" else "suppression.deleted"
        routes = wanted(kind)
        if not routes:
            continue
        # What the trail kept of the entry (an entry removed since is gone from the list).
        entry = Suppression(c.address, c.reason if c.action == "added" else "manual", c.origin, c.source_queue_id,
                            float(c.at), None, c.note or "")  # fmt: skip
        data = suppression_data(entry, c.actor, c.origin, None if c.action == "added" else c.reason)
        if c.action == "removed":
            data["reason"] = None  # the trail does not keep a removed entry's reason
        rows += _rows(routes, kind, c.address, float(c.at), data, now=now)
    for start in range(0, len(rows), 1000):
        _insert(conn, outbox, rows[start : start + 1000])
    return len(rows)
