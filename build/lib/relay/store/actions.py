"""Support's actions on one message, each in one transaction: its events (through
``log.append_events``), its line in the access audit and, when done from a case, the case's
"action" entry with the recipients it made due (the case confirms itself when they are
delivered). A closed or unknown case refuses the whole action: nothing is written.

Retry and cancel (relay.store.queue) gain their audit line and case entry here; resend (a new
message to a corrected address), comment, release and discard (hold mode), lifting a
recipient's suppression; and what a message page reads besides its view: the stored body and
the webhook deliveries of its events. ``Hold`` is the hold-mode rule intake applies.

Functions of a connection, run by the engine's writer (or reader, for the reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from ulid import ULID

from relay.errors import Conflict, NotFound
from relay.model import CANCELLED, HELD, QUEUED, NewMessage, Suppression, SuppressionOrigin
from relay.store import audit, queue, suppressions
from relay.store import cases as case_store
from relay.store import statements as q
from relay.store.log import NewEvent, append_events
from relay.store.schema import events, link_chunks, messages, recipients

# -- hold mode


@dataclass(frozen=True, slots=True)
class Hold:
    """``[delivery] hold`` / ``hold_users``: which new messages are stored "held" (kept in the
    queue, never due, until released or discarded)."""

    everything: bool = False
    users: frozenset[str] = frozenset()

    def rule(self, msg: NewMessage) -> str | None:
        """The setting that holds ``msg`` (its "held" events name it), or None. The user is the
        SMTP AUTH name, or the API token's label ("api:...") for POST /api/v1/messages."""
        if self.everything:
            return "hold"
        if msg.user is not None and msg.user in self.users:
            return "hold_users"
        return None


NO_HOLD: Final = Hold()

# -- statements of these actions

# A message's recipients (id, address, state), in order.
_RECIPIENTS = (
    sa.select(recipients.c.id, recipients.c.address, recipients.c.status)
    .where(recipients.c.queue_id == sa.bindparam("qid"))
    .order_by(recipients.c.id)
)
# A recipient's row, locked until commit: two resends of it at once take turns, so that the
# second sees the first's "resent" event (SQLite's writes are serial already; no FOR UPDATE there).
_LOCK_RECIPIENT = sa.select(recipients.c.id).where(recipients.c.id == sa.bindparam("rid")).with_for_update()
# What a recipient's resends so far said ("resent" events' details: to, new_queue_id, ...).
_RESENT = sa.select(events.c.details).where(
    events.c.queue_id == sa.bindparam("qid"), events.c.recipient == sa.bindparam("recipient"), events.c.type == "resent"
)
# The message a resend copies.
_MESSAGE = sa.select(messages).where(messages.c.queue_id == sa.bindparam("qid"))
# Its tracked links, chunk by chunk (a click on the resent message names the same ordinals).
_LINKS = (
    sa.select(link_chunks.c.urls).where(link_chunks.c.queue_id == sa.bindparam("qid")).order_by(link_chunks.c.chunk)
)
# Held recipients of a message, made due now (release), returning them.
_RELEASE = (
    recipients.update()
    .where(recipients.c.queue_id == sa.bindparam("qid"), recipients.c.status == HELD)
    .values(status=QUEUED, next_attempt_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
    .returning(recipients.c.id, recipients.c.address)
)
# Held recipients of a message, cancelled (discard), returning them.
_DISCARD = (
    recipients.update()
    .where(recipients.c.queue_id == sa.bindparam("qid"), recipients.c.status == HELD)
    .values(status=CANCELLED, next_attempt_at=None, lease_owner=None, updated_at=sa.bindparam("now"))
    .returning(recipients.c.id, recipients.c.address)
)

MAX_TEXT = 10_000  # characters of a note or a reason


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts, from where, and the case the action belongs to (None: none)."""

    by: str
    ip: str = ""
    case_id: int | None = None

    def details(self, **more: object) -> dict[str, object]:
        """An action event's details: ``by``, the case's id when there is one, and ``more``."""
        out: dict[str, object] = {"by": self.by, **more}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        return out


def _trail(
    conn: Connection,
    actor: Actor,
    action: str,
    queue_id: str | None,
    details: Mapping[str, Any],
    *,
    targets: Sequence[tuple[int, str]] = (),
    at: float,
) -> None:
    """The audit line of an action ("action." + ``action``) and, from a case, the case's entry
    (NotFound / Conflict for an unknown or closed case: the caller's savepoint undoes it all)."""
    if actor.case_id is not None:
        case_store.record_action(
            conn, actor.case_id, actor=actor.by, ip=actor.ip, targets=targets, at=at,
            details={"action": action, "queue_id": queue_id, **details},
        )  # fmt: skip
    audit_details = dict(details)
    if actor.case_id is not None:
        audit_details["case_id"] = actor.case_id
    audit.append(
        conn, actor=actor.by, ip=actor.ip, action=f"action.{action}", target=queue_id or "", details=audit_details,
        at=at,
    )  # fmt: skip


def _recipient(conn: Connection, queue_id: str, address: str) -> tuple[int, str, str]:
    """The message's recipient with this address (case-insensitive): (id, address, state).
    NotFound when the message does not exist or has no such recipient."""
    queue.must_exist(conn, queue_id)
    want = address.strip().lower()
    for r in conn.execute(_RECIPIENTS, {"qid": queue_id}):
        if r.address.lower() == want:
            return int(r.id), r.address, r.status
    raise NotFound(f"{address} is not a recipient of {queue_id}")


# -- retry and cancel, audited


def retry(conn: Connection, queue_id: str | None, actor: Actor, *, reason: str, now: float) -> list[tuple[int, str]]:
    """``queue.retry`` with its audit line and (from a case) the case's entry, whose targets
    are the recipients made due."""
    extra = {} if actor.case_id is None else {"case_id": actor.case_id}
    done = queue.retry(conn, queue_id, by=actor.by, reason=reason, now=now, extra=extra)
    _trail(conn, actor, "retry", queue_id, {"reason": reason, "count": len(done)}, targets=done, at=now)
    return done


def cancel(conn: Connection, queue_id: str, actor: Actor, *, reason: str, now: float) -> int:
    extra = {} if actor.case_id is None else {"case_id": actor.case_id}
    count = queue.cancel(conn, queue_id, by=actor.by, reason=reason, now=now, extra=extra)
    _trail(conn, actor, "cancel", queue_id, {"reason": reason, "count": count}, at=now)
    return count


# -- resend


def resend(
    conn: Connection,
    queue_id: str,
    address: str,
    new_address: str,
    actor: Actor,
    *,
    reason: str,
    hold: Hold,
    now: float,
) -> NewMessage:
    """Send the message again, as a new message (a new queue id, the same body, sender, tags,
    user and tracking) to ``new_address`` alone, logging "resent" on the old one's recipient
    ``address``. NotFound: no such message or recipient; Conflict: ``new_address`` is
    suppressed, the body is no longer kept, or this recipient was sent again to
    ``new_address`` already (a second click, a retried request: mail it once; retry the
    message made the first time instead). Returns the new message (stored, not yet announced
    to delivery: the caller does that after the commit)."""
    rid, old_address, _ = _recipient(conn, queue_id, address)
    conn.execute(_LOCK_RECIPIENT, {"rid": rid})
    for (done,) in conn.execute(_RESENT, {"qid": queue_id, "recipient": old_address}):
        if isinstance(done, dict) and str(done.get("to", "")).lower() == new_address.lower():
            raise Conflict(
                f"{old_address} was sent again to {new_address} already, as {done.get('new_queue_id')}: "
                "retry that message instead"
            )
    blocked = suppressions.find(conn, [new_address], now).get(new_address)
    if blocked is not None:
        raise Conflict(f"{new_address} is suppressed: {blocked.address} is on the suppression list ({blocked.reason})")
    m = conn.execute(_MESSAGE, {"qid": queue_id}).one()
    raw = queue.load_bodies(conn, [queue_id]).get(queue_id)
    if raw is None:
        raise Conflict(f"the body of {queue_id} is no longer kept: it cannot be sent again")
    links = tuple(url for (urls,) in conn.execute(_LINKS, {"qid": queue_id}) for url in urls)
    new_id = str(ULID())
    details: dict[str, object] = {
        "client_ip": actor.ip, "protocol": "resend", "user": m.username, "size": len(raw), "recipients": 1,
        "resend_of": queue_id, **actor.details(reason=reason),
    }  # fmt: skip
    msg = NewMessage(
        queue_id=new_id, message_id=m.message_id, mail_from=m.mail_from, recipients=(new_address,),
        subject=m.subject, tags=tuple(m.tags or ()), user=m.username, client_ip=m.client_ip, received_at=now,
        raw=raw, details=details, track=m.track or "", links=links,
    )  # fmt: skip
    queue.Enqueue.run_many(conn, [queue.Enqueue(msg, hold=hold.rule(msg))])
    (new_rid,) = [int(r.id) for r in conn.execute(q.IMPORTED_RECIPIENTS, {"qids": [new_id]})]
    resent = actor.details(to=new_address, new_queue_id=new_id, reason=reason)
    append_events(conn, [NewEvent(queue_id, old_address, now, "resent", resent)])
    _trail(
        conn, actor, "resend", queue_id,
        {"address": old_address, "new_address": new_address, "new_queue_id": new_id, "reason": reason},
        targets=[(new_rid, new_id)], at=now,
    )  # fmt: skip
    return msg


# -- notes, hold mode


def comment(conn: Connection, queue_id: str, text: str, actor: Actor, *, now: float) -> None:
    """A support note on the message's timeline ("commented"; no webhook)."""
    queue.must_exist(conn, queue_id)
    append_events(conn, [NewEvent(queue_id, None, now, "commented", actor.details(text=text))])
    _trail(conn, actor, "note", queue_id, {"text": text}, at=now)


def release(conn: Connection, queue_id: str, actor: Actor, *, now: float) -> list[tuple[int, str]]:
    """Held recipients of the message -> queued, due now ("released" each). Returns them as
    (recipient id, queue id); none when nothing was held."""
    queue.must_exist(conn, queue_id)
    rows = conn.execute(_RELEASE, {"qid": queue_id, "now": now}).all()
    append_events(conn, [NewEvent(queue_id, r.address, now, "released", actor.details()) for r in rows])
    done = [(int(r.id), queue_id) for r in rows]
    _trail(conn, actor, "release", queue_id, {"count": len(rows)}, targets=done, at=now)
    return done


def discard(conn: Connection, queue_id: str, actor: Actor, *, now: float) -> int:
    """Held recipients of the message -> cancelled ("cancelled" each, ``discarded``: true)."""
    queue.must_exist(conn, queue_id)
    rows = conn.execute(_DISCARD, {"qid": queue_id, "now": now}).all()
    details = actor.details(reason="discarded while held", discarded=True)
    append_events(conn, [NewEvent(queue_id, r.address, now, "cancelled", details) for r in rows])
    _trail(conn, actor, "discard", queue_id, {"count": len(rows)}, at=now)
    return len(rows)


# -- suppression


def unsuppress(
    conn: Connection,
    queue_id: str,
    address: str,
    reason: str,
    actor: Actor,
    *,
    origin: SuppressionOrigin,
    now: float,
) -> Suppression:
    """Remove the suppression entry of one of the message's recipients (its own entry, as
    ``suppressions.remove``: NotFound when it has none, ReasonRequired for a complaint's
    without a reason) and log "unsuppressed" on the message."""
    _, rcpt, _ = _recipient(conn, queue_id, address)
    entry = suppressions.remove(conn, rcpt, reason=reason, actor=actor.by, origin=origin, now=now)
    details = actor.details(reason=reason.strip(), entry=entry.to_json())
    append_events(conn, [NewEvent(queue_id, rcpt, now, "unsuppressed", details)])
    _trail(conn, actor, "unsuppress", queue_id, {"address": rcpt, "reason": reason.strip(),
                                                  "entry_reason": entry.reason}, at=now)  # fmt: skip
    return entry


# -- reads


def raw_message(conn: Connection, queue_id: str) -> bytes | None:
    """The stored body (None: no such message, or its body is no longer kept)."""
    return queue.load_bodies(conn, [queue_id]).get(queue_id)
