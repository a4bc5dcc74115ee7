"""Cases in the store: opening one over some messages, its append-only trail (hash-chained,
relay.store.chain, chain "cases"), the action entries that support's actions write inside their
own transaction (``record_action``), closing, the lists, and the automatic confirmation of cases
whose retried or resent recipients have all been delivered.

Every entry also writes an audit line ("case.entry"; opening: "case.open"; closing:
"case.close"). Writers lock the chains' heads before the case's row, in that order everywhere,
so that concurrent writers on PostgreSQL serialize and never deadlock.

Functions of a connection, run by the engine's reader or writer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from relay import cases as rules
from relay.errors import NotFound
from relay.model import CASE_STATES, CLOSED_CASE_STATES, DELIVERED, CaseEntry, CaseState, CaseView, EntryKind
from relay.store import audit, chain, paging
from relay.store import log as event_log
from relay.store.schema import case_entries, case_messages, case_targets, cases, recipients

# States whose case an automatic confirmation may end (those an action can leave a case in).
CONFIRMABLE: Final[tuple[CaseState, ...]] = ("action_taken", "resolved", "escalated")

c, e, cm, ct, r = cases, case_entries, case_messages, case_targets, recipients

INSERT_CASE = cases.insert().returning(cases.c.id)
# The case's row, locked (PostgreSQL) while its state changes.
CASE_FOR_UPDATE = sa.select(c.c.state).where(c.c.id == sa.bindparam("case_id")).with_for_update()
SET_STATE = (
    c.update()
    .where(c.c.id == sa.bindparam("case_id"))
    .values(state=sa.bindparam("new_state"), updated_at=sa.bindparam("now"))
)
CLOSE = (
    c.update()
    .where(c.c.id == sa.bindparam("case_id"))
    .values(state="closed_unresolved", updated_at=sa.bindparam("now"), closed_reason=sa.bindparam("reason"))
)
# Links to messages and targets; a link made twice is one link.
INSERT_CASE_MESSAGE = {
    "sqlite": sqlite.insert(cm).on_conflict_do_nothing(index_elements=["case_id", "queue_id"]),
    "postgresql": postgresql.insert(cm).on_conflict_do_nothing(index_elements=["case_id", "queue_id"]),
}
INSERT_TARGET = {
    "sqlite": sqlite.insert(ct).on_conflict_do_nothing(index_elements=["case_id", "recipient_id"]),
    "postgresql": postgresql.insert(ct).on_conflict_do_nothing(index_elements=["case_id", "recipient_id"]),
}
CASE_ROWS = sa.select(c).where(c.c.id.in_(sa.bindparam("case_ids", expanding=True)))
CASE_QUEUE_IDS = (
    sa.select(cm.c.case_id, cm.c.queue_id)
    .where(cm.c.case_id.in_(sa.bindparam("case_ids", expanding=True)))
    .order_by(cm.c.case_id, cm.c.queue_id)
)
CASE_ENTRIES = sa.select(e).where(e.c.case_id == sa.bindparam("case_id")).order_by(e.c.id)
# A page of cases, newest first, one more than :limit (filters and cursor added at the call).
CASE_PAGE = sa.select(c).order_by(c.c.id.desc()).limit(sa.bindparam("limit"))
CASE_COUNTS = sa.select(c.c.state, sa.func.count()).group_by(c.c.state)

# Cases an automatic confirmation is due for: in a confirmable state, with targets, every one
# of which is delivered (a target whose recipient is gone counts as not delivered); with the
# latest delivery time among them (a delivered recipient's updated_at is its delivery's time).
_delivered = sa.case((r.c.status == DELIVERED, 1), else_=0)
CONFIRM_DUE = (
    sa.select(c.c.id, c.c.opened_at, sa.func.max(r.c.updated_at).label("delivered_at"))
    .join(ct, ct.c.case_id == c.c.id)
    .outerjoin(r, r.c.id == ct.c.recipient_id)
    .where(c.c.state.in_(CONFIRMABLE))
    .group_by(c.c.id, c.c.opened_at)
    .having(sa.func.count() == sa.func.sum(_delivered))
    .order_by(c.c.id)
)
# The confirmation itself, guarded: still confirmable, and no target undelivered (so that two
# processes never confirm one case twice, nor one that gained a target meanwhile).
_undelivered_target = (
    sa.select(ct.c.recipient_id)
    .where(ct.c.case_id == c.c.id)
    .where(~sa.exists(sa.select(r.c.id).where(r.c.id == ct.c.recipient_id, r.c.status == DELIVERED)))
)
CONFIRM = (
    c.update()
    .where(c.c.id == sa.bindparam("case_id"), c.c.state.in_(CONFIRMABLE), ~sa.exists(_undelivered_target))
    .values(state="confirmed", updated_at=sa.bindparam("now"))
)


def open_case(
    conn: Connection,
    *,
    title: str,
    customer_ref: str,
    owner: str,
    queue_ids: Sequence[str],
    actor: str,
    ip: str,
    incident: str,
    at: float,
) -> int:
    """A new case over ``queue_ids`` (ValueError: one is unknown) with its incident entry:
    ``incident`` when given, else what went wrong for those messages (none when nothing did)."""
    title, customer_ref, owner, ids = rules.case_fields(title, customer_ref, owner, queue_ids)
    incident = rules.text(incident, "incident", limit=rules.MAX_INCIDENT, required=False)
    views = event_log.views(conn, ids)
    unknown = sorted(set(ids) - {v.queue_id for v in views})
    if unknown:
        raise ValueError(f"no message {', '.join(unknown[:5])}")
    summary = incident or rules.incident_summary(views)
    chain.lock_head(conn, "cases")
    case_id = int(
        conn.execute(
            INSERT_CASE,
            {"title": title, "customer_ref": customer_ref, "owner": owner, "state": "open", "opened_by": actor,
             "opened_at": at, "updated_at": at, "closed_reason": ""},
        ).scalar_one()
    )  # fmt: skip
    _link(conn, case_id, ids)
    audit.append(
        conn, actor=actor, ip=ip, action="case.open", target=f"case:{case_id}",
        details={"title": title, "queue_ids": ids}, at=at,
    )  # fmt: skip
    if summary:
        _entry(conn, case_id, "incident", {"summary": summary}, actor=actor, ip=ip, at=at)
    return case_id


def add_entry(
    conn: Connection, case_id: int, kind: EntryKind, details: Mapping[str, Any], *, actor: str, ip: str, at: float
) -> CaseEntry:
    """Append an entry written by a person (not an action: those run through the message
    actions and ``record_action``) and move the case's state. ValueError: bad details;
    NotFound; Conflict: the case takes no such entry any more."""
    if kind == "action":
        raise ValueError("action entries are written by the actions themselves (retry, resend, ...), not by hand")
    body = rules.validate(kind, details)
    state = _lock_case(conn, case_id)
    new = rules.after(state, kind)
    entry = _entry(conn, case_id, kind, body, actor=actor, ip=ip, at=at)
    conn.execute(SET_STATE, {"case_id": case_id, "new_state": new, "now": at})
    return entry


def record_action(
    conn: Connection,
    case_id: int,
    *,
    actor: str,
    ip: str,
    details: Mapping[str, Any],
    targets: Sequence[tuple[int, str]] = (),
    at: float,
) -> CaseEntry:
    """Append an "action" entry (details: {"action": "retry"|"cancel"|..., "queue_id": ..., ...})
    inside the action's own transaction: the case moves to action_taken, the queue ids the
    details name are linked to it, and ``targets`` ((recipient id, queue id)) are registered
    for the automatic confirmation. NotFound: no such case; Conflict: the case is closed."""
    body = rules.validate("action", details)
    state = _lock_case(conn, case_id)
    new = rules.after(state, "action")
    entry = _entry(conn, case_id, "action", body, actor=actor, ip=ip, at=at)
    conn.execute(SET_STATE, {"case_id": case_id, "new_state": new, "now": at})
    linked = [str(body[k]) for k in ("queue_id", "new_queue_id") if isinstance(body.get(k), str) and body[k]]
    _link(conn, case_id, linked + [qid for _, qid in targets])
    if targets:
        conn.execute(
            INSERT_TARGET[conn.dialect.name],
            [{"case_id": case_id, "recipient_id": int(rid), "queue_id": qid} for rid, qid in dict(targets).items()],
        )
    return entry


def close_case(conn: Connection, case_id: int, reason: str, *, actor: str, ip: str, at: float) -> None:
    """Close without a resolution (closed_unresolved), saying why, with an audit line."""
    why = rules.text(reason, "reason")
    rules.close(_lock_case(conn, case_id))
    conn.execute(CLOSE, {"case_id": case_id, "reason": why, "now": at})
    audit.append(
        conn, actor=actor, ip=ip, action="case.close", target=f"case:{case_id}", details={"reason": why}, at=at
    )


def confirm(conn: Connection, *, now: float) -> list[tuple[int, float]]:
    """Confirm every case whose targets are all delivered: a "confirmation" entry
    {automatic, delivered_at, time_to_resolve_seconds} each. Returns (case id, time to resolve)
    of those confirmed by this call."""
    if not conn.execute(CONFIRM_DUE.limit(1)).first():
        return []  # the usual case, and no lock taken
    chain.lock_head(conn, "cases")
    done: list[tuple[int, float]] = []
    for row in conn.execute(CONFIRM_DUE).all():  # read again under the lock
        if conn.execute(CONFIRM, {"case_id": row.id, "now": now}).rowcount != 1:
            continue
        delivered_at = float(row.delivered_at)
        took = round(max(0.0, delivered_at - float(row.opened_at)), 3)
        details = {"automatic": True, "delivered_at": delivered_at, "time_to_resolve_seconds": took}
        _entry(conn, int(row.id), "confirmation", details, actor="relay", ip="", at=now)
        done.append((int(row.id), took))
    return done


def _lock_case(conn: Connection, case_id: int) -> CaseState:
    chain.lock_head(conn, "cases")  # heads first, then the case: one order for every writer
    state = conn.execute(CASE_FOR_UPDATE, {"case_id": case_id}).scalar()
    if state is None:
        raise NotFound(f"no case {case_id}")
    return state  # type: ignore[no-any-return]


def _link(conn: Connection, case_id: int, queue_ids: Sequence[str]) -> None:
    unique = list(dict.fromkeys(queue_ids))
    if unique:
        conn.execute(INSERT_CASE_MESSAGE[conn.dialect.name], [{"case_id": case_id, "queue_id": q} for q in unique])


def _entry(
    conn: Connection, case_id: int, kind: EntryKind, details: Mapping[str, Any], *, actor: str, ip: str, at: float
) -> CaseEntry:
    body = chain.plain(details)
    values = {"case_id": case_id, "at": float(at), "actor": actor, "kind": kind, "details": body}
    entry_id, digest = chain.append(conn, "cases", values)
    audit.append(
        conn, actor=actor, ip=ip, action="case.entry", target=f"case:{case_id}",
        details={"kind": kind, "entry_id": entry_id, "entry_hash": digest}, at=at,
    )  # fmt: skip
    return CaseEntry(id=entry_id, case_id=case_id, at=float(at), actor=actor, kind=kind, details=body, hash=digest)


# -- reading


def case(conn: Connection, case_id: int, *, sla: float, now: float) -> CaseView | None:
    views = _views(conn, conn.execute(CASE_ROWS, {"case_ids": [case_id]}).all(), sla=sla, now=now)
    if not views:
        return None
    entries = tuple(_case_entry(x) for x in conn.execute(CASE_ENTRIES, {"case_id": case_id}))
    v = views[0]
    return CaseView(
        id=v.id, title=v.title, customer_ref=v.customer_ref, owner=v.owner, state=v.state, opened_by=v.opened_by,
        opened_at=v.opened_at, updated_at=v.updated_at, closed_reason=v.closed_reason, queue_ids=v.queue_ids,
        entries=entries, overdue=v.overdue,
    )  # fmt: skip


def page(
    conn: Connection,
    *,
    state: CaseState | None,
    owner: str | None,
    overdue: bool | None,
    escalated: bool | None,
    queue_id: str | None,
    sla: float,
    now: float,
    limit: int,
    before: int | None,
) -> tuple[list[CaseView], int | None]:
    """Cases newest first, filtered, a page at a time: pass the returned id as ``before``."""
    if state is not None and state not in CASE_STATES:
        raise ValueError(f"unknown case state {state!r} (one of {', '.join(CASE_STATES)})")
    limit = max(1, min(limit, 500))
    stmt = CASE_PAGE
    if state is not None:
        stmt = stmt.where(c.c.state == state)
    if owner is not None:
        stmt = stmt.where(c.c.owner == owner)
    if overdue is not None:
        late = sa.and_(c.c.opened_at < now - sla, c.c.state.not_in(CLOSED_CASE_STATES))
        stmt = stmt.where(late if overdue else ~late)
    if escalated is not None:  # escalated at some time, whatever happened next
        ever = sa.exists(sa.select(e.c.id).where(e.c.case_id == c.c.id, e.c.kind == "escalation"))
        stmt = stmt.where(ever if escalated else ~ever)
    if queue_id is not None:
        stmt = stmt.where(sa.exists(sa.select(cm.c.case_id).where(cm.c.case_id == c.c.id, cm.c.queue_id == queue_id)))
    rows, more = paging.by_id(conn, stmt, c.c.id, limit=limit, before=before)
    return _views(conn, rows, sla=sla, now=now), more


def counts(conn: Connection) -> dict[str, int]:
    found: dict[str, int] = {s: 0 for s in CASE_STATES}
    for state, n in conn.execute(CASE_COUNTS):
        found[state] = int(n)
    return found


def _views(conn: Connection, rows: Sequence[Row[Any]], *, sla: float, now: float) -> list[CaseView]:
    if not rows:
        return []
    linked: dict[int, list[str]] = {}
    for x in conn.execute(CASE_QUEUE_IDS, {"case_ids": [int(row.id) for row in rows]}):
        linked.setdefault(int(x.case_id), []).append(x.queue_id)
    return [
        CaseView(
            id=int(row.id), title=row.title, customer_ref=row.customer_ref or "", owner=row.owner or "",
            state=row.state, opened_by=row.opened_by, opened_at=float(row.opened_at),
            updated_at=float(row.updated_at), closed_reason=row.closed_reason or "",
            queue_ids=tuple(linked.get(int(row.id), ())),
            overdue=row.state not in CLOSED_CASE_STATES and float(row.opened_at) + sla < now,
        )
        for row in rows
    ]  # fmt: skip


def _case_entry(x: Row[Any]) -> CaseEntry:
    return CaseEntry(
        id=int(x.id), case_id=int(x.case_id), at=float(x.at), actor=x.actor, kind=x.kind, details=x.details or {},
        hash=x.hash,
    )  # fmt: skip
