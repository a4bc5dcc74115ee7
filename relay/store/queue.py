"""The queue: enqueue, claim, record, release, retry, cancel, bodies, and the queue as listed.

Functions of a connection (run by the engine's reader or writer) and the two batched write
kinds, ``Enqueue`` and ``Record``; every event they log goes through ``log.append_events``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from sqlalchemy.engine import Connection

from relay.errors import Conflict, NotFound
from relay.model import (
    ACTIVE_STATES,
    FINAL_STATES,
    HELD,
    QUEUED,
    RETRY_ALL_STATES,
    RETRY_STATES,
    Claimed,
    Imported,
    NewMessage,
    Outcome,
    QueueEntry,
    QueueSummary,
    Suppression,
)
from relay.store import nodes, suppressions
from relay.store import statements as q
from relay.store.engine import Op
from relay.store.log import NewEvent, append_events
from relay.store.schema import LINK_CHUNK, messages, recipients

# -- intake


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` a caller sent with a request (POST /api/v1/messages)."""

    caller: str  # the API token's fingerprint, "api:..."
    key: str
    request_hash: str  # SHA-256 (hex) of the request body


@dataclass(frozen=True, slots=True)
class Idempotent:
    """What an idempotency key was first used for: the request and the message it queued."""

    request_hash: str
    queue_id: str
    message_id: str
    created_at: float


@dataclass(slots=True)
class Enqueue(Op):
    """Store messages whole: message, body, tags, link chunks, a queued row per recipient, and
    (``announce``) the "received" event; bulk import brings its own events.

    With ``idempotency``, the key's row is written in the same transaction; when the caller
    has used the key already (a retry, or a concurrent twin), nothing of this message is
    written and its result is the key's first use (``Idempotent``); else None."""

    msg: NewMessage
    announce: bool = True
    idempotency: IdempotencyKey | None = None
    # Hold mode: the setting that keeps the message "held" (never due until released), or None.
    hold: str | None = None

    @classmethod
    def run_many(cls, conn: Connection, ops: Sequence[Op]) -> list[object]:
        results: list[object] = [None] * len(ops)
        if any(isinstance(op, Enqueue) and op.idempotency is not None for op in ops):
            results = [_take_key(conn, op) if isinstance(op, Enqueue) else None for op in ops]
            ops = [op for op, taken in zip(ops, results, strict=True) if taken is None]
            if not ops:
                return results
        msg_rows: list[dict[str, object]] = []
        body_rows: list[dict[str, object]] = []
        tag_rows: list[dict[str, object]] = []
        rcpt_rows: list[dict[str, object]] = []
        link_rows: list[dict[str, object]] = []
        received: list[NewEvent] = []
        held: list[NewEvent] = []
        for op in ops:
            assert isinstance(op, Enqueue)
            m = op.msg
            msg_rows.append(
                {
                    "queue_id": m.queue_id,
                    "message_id": m.message_id,
                    "mail_from": m.mail_from,
                    "subject": m.subject,
                    "size": m.size,
                    "tags": list(m.tags),
                    "username": m.user,
                    "client_ip": m.client_ip,
                    "received_at": m.received_at,
                    "track": m.track,
                }
            )
            body_rows.append({"queue_id": m.queue_id, "data": m.raw})
            link_rows.extend(
                {
                    "queue_id": m.queue_id,
                    "chunk": start // LINK_CHUNK,
                    "urls": list(m.links[start : start + LINK_CHUNK]),
                }
                for start in range(0, len(m.links), LINK_CHUNK)
            )
            tag_rows.extend({"queue_id": m.queue_id, "tag": t} for t in m.tags)
            rcpt_rows.extend(
                {
                    "queue_id": m.queue_id,
                    "address": a,
                    "domain": a.rpartition("@")[2].lower(),
                    "status": QUEUED if op.hold is None else HELD,
                    "attempts": 0,
                    "next_attempt_at": m.received_at if op.hold is None else None,  # held: never due
                    "updated_at": m.received_at,
                }
                for a in m.recipients
            )
            if op.announce:
                received.append(NewEvent(m.queue_id, None, m.received_at, "received", m.details))
            if op.hold is not None:
                held += [NewEvent(m.queue_id, a, m.received_at, "held", {"by": op.hold}) for a in m.recipients]
        conn.execute(q.INSERT_MESSAGE, msg_rows)
        conn.execute(q.INSERT_BODY, body_rows)
        if tag_rows:
            conn.execute(q.INSERT_TAG, tag_rows)
        if link_rows:
            conn.execute(q.INSERT_LINK_CHUNK, link_rows)
        conn.execute(q.INSERT_RECIPIENT, rcpt_rows)
        append_events(conn, received + held)
        if any(isinstance(op, Enqueue) and op.hold is None for op in ops):
            nodes.notify_due(conn)
        return results


def _take_key(conn: Connection, op: Enqueue) -> Idempotent | None:
    """Write the op's idempotency key; None when it was free (or the op has none), else what
    its first use queued. The (caller, key) primary key decides between concurrent twins: on
    PostgreSQL the second insert waits for the first's commit, then finds its row."""
    k = op.idempotency
    if k is None:
        return None
    m = op.msg
    row = {"caller": k.caller, "key": k.key, "request_hash": k.request_hash, "queue_id": m.queue_id,
           "message_id": m.message_id, "created_at": m.received_at}  # fmt: skip
    if conn.execute(q.INSERT_IDEMPOTENCY_KEY[conn.dialect.name], row).rowcount == 1:
        return None
    found = idempotency_key(conn, k.caller, k.key)
    if found is None:  # taken and gone in between: only a manual delete does that
        raise Conflict(f"idempotency key {k.key!r} is in use")
    return found


def idempotency_key(conn: Connection, caller: str, key: str) -> Idempotent | None:
    r = conn.execute(q.IDEMPOTENCY_KEY, {"caller": caller, "key": key}).first()
    return None if r is None else Idempotent(r.request_hash, r.queue_id, r.message_id, float(r.created_at))


# -- delivery


@dataclass(slots=True)
class Record(Op):
    """What attempts decided: the recipients' new states (while ``owner`` holds their lease),
    one event each, hard bounces' suppression entries, and DSNs to senders. Its result: the
    DSNs it queued."""

    owner: str
    outcomes: Sequence[Outcome]

    @classmethod
    def run_many(cls, conn: Connection, ops: Sequence[Op]) -> list[object]:
        updates: list[dict[str, object]] = []
        logged: list[NewEvent] = []
        entries: list[Suppression] = []
        notify: list[NewMessage] = []
        for op in ops:
            assert isinstance(op, Record)
            for o in op.outcomes:
                update = {
                    "rid": o.recipient_id,
                    "owner": op.owner,
                    "status": o.status,
                    "attempts": o.attempts,
                    "next_at": o.next_attempt_at,
                    "response": o.last_response,
                    "at": o.at,
                }
                if o.notify is None:
                    updates.append(update)
                # A DSN to the sender only from the worker that still holds the lease: a
                # recipient attempted twice (a lease that ran out) tells its sender once.
                elif conn.execute(q.RECORD, update).rowcount == 1:
                    notify.append(o.notify)
                logged.append(NewEvent(o.queue_id, o.address, o.at, o.event, o.details))
                if o.suppress is not None:
                    entries.append(o.suppress)
        if updates:
            conn.execute(q.RECORD, updates)
        append_events(conn, logged)
        if entries:
            suppressions.add(conn, entries, actor="delivery", now=max(e.created_at for e in entries))
        if notify:
            Enqueue.run_many(conn, [Enqueue(m) for m in notify])
        sent = {m.queue_id for m in notify}
        return [
            [o.notify for o in op.outcomes if o.notify is not None and o.notify.queue_id in sent]
            for op in ops
            if isinstance(op, Record)
        ]


def claim(
    conn: Connection,
    *,
    owner: str,
    lease: float,
    limit: int,
    pick: Callable[[Sequence[Claimed]], Sequence[Claimed]] | None,
    skip_domains: Collection[str],
    max_size: int | None,
    now: float,
    cluster: Callable[[Mapping[str, int]], Collection[str]] | None = None,
    alone: bool = False,
) -> list[Claimed]:
    """Lease due recipients (see LogStore.claim_due), in the claiming transaction."""
    due = q.DUE.limit(limit)
    if cluster is not None:  # per_domain across the cluster: count every node's, claims in turn
        nodes.lock_claims(conn)
        skip_domains = {*skip_domains, *cluster(nodes.in_flight_by_domain(conn, now, alone=alone))}
    if skip_domains:
        due = due.where(recipients.c.domain.not_in(sorted(skip_domains)))
    if max_size is not None:
        due = due.where(messages.c.size <= max_size)
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True, of=recipients)
    candidates = [Claimed(*row) for row in conn.execute(due, {"now": now})]
    ended = _end_suppressed(conn, candidates, now) if candidates else []
    if ended:
        gone = {c.recipient_id for c in ended}
        candidates = [c for c in candidates if c.recipient_id not in gone]
    chosen = list(candidates if pick is None else pick(candidates))
    if chosen:
        conn.execute(
            q.LEASE, {"ids": [c.recipient_id for c in chosen], "owner": owner, "until": now + lease, "at": now}
        )
    chosen.sort(key=lambda c: (c.queue_id, c.recipient_id))
    return chosen + ended


def _end_suppressed(conn: Connection, candidates: Sequence[Claimed], now: float) -> list[Claimed]:
    """Due recipients whose address is on the suppression list end ``suppressed``, never
    attempted, each with a "suppressed" event naming the entry; returned marked."""
    found = suppressions.find(conn, {c.address for c in candidates}, now)
    hits = [(c, entry) for c in candidates if (entry := found.get(c.address)) is not None]
    if hits:
        conn.execute(
            q.SUPPRESS_RECIPIENT,
            [{"rid": c.recipient_id, "at": now,
              "response": f"suppressed: {e.address} is on the suppression list ({e.reason})"} for c, e in hits],
        )  # fmt: skip
        details = {"reason": "suppressed", "hard": False}
        append_events(
            conn,
            [NewEvent(c.queue_id, c.address, now, "suppressed", {**details, "entry": e.to_json()}) for c, e in hits],
        )
    return [replace(c, suppressed=e) for c, e in hits]


def release(conn: Connection, owner: str, recipient_ids: list[int], now: float) -> int:
    """Give leased recipients back untouched, due at once; how many were."""
    released = conn.execute(q.RELEASE, {"ids": recipient_ids, "owner": owner, "now": now}).rowcount
    if released:
        nodes.notify_due(conn)
    return released


def load_bodies(conn: Connection, queue_ids: Collection[str]) -> dict[str, bytes]:
    return {r.queue_id: bytes(r.data) for r in conn.execute(q.BODIES, {"qids": list(queue_ids)})}


def anything_due(conn: Connection, now: float) -> bool:
    return conn.scalar(q.ANY_DUE, {"now": now}) is not None


# -- queue control


def must_exist(conn: Connection, queue_id: str) -> None:
    if conn.scalar(q.MESSAGE_EXISTS, {"qid": queue_id}) is None:
        raise NotFound(f"no message {queue_id}")


def retry(
    conn: Connection,
    queue_id: str | None,
    *,
    by: str,
    reason: str,
    now: float,
    extra: Mapping[str, object] | None = None,
) -> list[tuple[int, str]]:
    """Make recipients due now (RETRY_STATES of one message, or RETRY_ALL_STATES of every
    message; never held ones: release does that) and log "retried" for each, its details
    with ``extra`` (a case's id); NotFound for an unknown queue id. Returns the (recipient id,
    queue id) of each (relay.store.actions adds the audit line and the case's entry)."""
    if queue_id is None:
        rows = conn.execute(q.RETRY_ALL, {"states": list(RETRY_ALL_STATES), "now": now}).all()
    else:
        must_exist(conn, queue_id)
        rows = conn.execute(q.RETRY_ONE, {"states": list(RETRY_STATES), "now": now, "qid": queue_id}).all()
    details = {"by": by, "reason": reason, **(extra or {})}
    append_events(conn, [NewEvent(r.queue_id, r.address, now, "retried", details) for r in rows])
    if rows:
        nodes.notify_due(conn)
    return [(int(r.id), r.queue_id) for r in rows]


def cancel(
    conn: Connection, queue_id: str, *, by: str, reason: str, now: float, extra: Mapping[str, object] | None = None
) -> int:
    """Cancel the message's recipients that are not final yet (held ones too) and log
    "cancelled" for each, its details with ``extra``."""
    must_exist(conn, queue_id)
    rows = conn.execute(q.CANCEL, {"qid": queue_id, "now": now}).all()
    details = {"by": by, "reason": reason, **(extra or {})}
    append_events(conn, [NewEvent(queue_id, r.address, now, "cancelled", details) for r in rows])
    return len(rows)


def summary(conn: Connection, *, active_only: bool) -> QueueSummary:
    counts = dict.fromkeys(ACTIVE_STATES if active_only else (*ACTIVE_STATES, *FINAL_STATES), 0)
    for status, n in conn.execute(q.COUNT_ACTIVE_BY_STATUS if active_only else q.COUNT_BY_STATUS):
        counts[status] = n
    oldest = conn.scalar(q.OLDEST_QUEUED)
    return QueueSummary(counts, None if oldest is None else float(oldest))


def queue_list(conn: Connection, *, state: str | None, domain: str | None, limit: int) -> list[QueueEntry]:
    stmt = q.QUEUE_LIST if domain is None else q.QUEUE_LIST_DOMAIN
    params = {"states": [state] if state else list(ACTIVE_STATES), "domain": (domain or "").lower(), "limit": limit}
    return [
        QueueEntry(r.queue_id, float(r.received_at), r.address, r.status, r.attempts,
                   None if r.next_attempt_at is None else float(r.next_attempt_at), r.last_response)
        for r in conn.execute(stmt, params)
    ]  # fmt: skip


# -- bulk import


def bulk_import(conn: Connection, items: Sequence[Imported]) -> None:
    """Write messages with their recipients' states and events as given, in a handful of statements."""
    Enqueue.run_many(conn, [Enqueue(i.message, announce=False) for i in items])
    by_id = {i.message.queue_id: i for i in items}
    rows = conn.execute(q.IMPORTED_RECIPIENTS, {"qids": list(by_id)}).all()
    updates = [
        {"rid": r.id, "status": i.status, "attempts": i.attempts, "next_at": i.next_attempt_at,
         "response": i.last_response, "at": i.message.received_at}
        for r in rows
        if (i := by_id[r.queue_id])
    ]  # fmt: skip
    if updates:
        conn.execute(q.IMPORT_STATE, updates)
    append_events(
        conn, [NewEvent(i.message.queue_id, ev.recipient, ev.at, ev.type, ev.details) for i in items for ev in i.events]
    )


@dataclass(slots=True)
class BodyCache:
    """Bodies of recently accepted messages, so delivery rarely reads them back. A body leaves
    when this process records its message final; one that another worker or node delivered
    only ages out, so the cache is kept small (4 MB: ~2,000 messages of 2 KB in flight)."""

    max_bytes: int = 4 * 1024 * 1024
    size: int = 0
    items: OrderedDict[str, bytes] = field(default_factory=OrderedDict)

    def put(self, key: str, data: bytes) -> None:
        self.items[key] = data
        self.size += len(data)
        while self.size > self.max_bytes and self.items:
            _, old = self.items.popitem(last=False)
            self.size -= len(old)

    def get(self, key: str) -> bytes | None:
        return self.items.get(key)

    def drop(self, key: str) -> None:
        data = self.items.pop(key, None)
        if data is not None:
            self.size -= len(data)
