"""The access audit in the store: lines appended inside the caller's transaction (an action's
audit line commits with the action), hash-chained (relay.store.chain, chain "audit"), and read a
page at a time. Nothing here, nor anywhere, edits or deletes a line.

Functions of a connection, run by the engine's reader or writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from relay.model import AuditEntry
from relay.store import chain, paging
from relay.store.schema import audit_log

MAX_ACTION: Final = 32  # the column's width
MAX_TEXT: Final = 1000  # actor, ip, target

# A page of lines, newest first, one more than :limit (filters and cursor added at the call).
AUDIT_PAGE = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(sa.bindparam("limit"))


def append(
    conn: Connection,
    *,
    actor: str,
    ip: str,
    action: str,
    target: str = "",
    details: Mapping[str, Any] | None = None,
    at: float,
) -> AuditEntry:
    """Append one line to the audit. ValueError for an action longer than 32 characters, text
    with a NUL, or details that are not plain JSON."""
    if not action or len(action) > MAX_ACTION:
        raise ValueError(f"an audit action is 1 to {MAX_ACTION} characters")
    for name, text in (("actor", actor), ("ip", ip), ("target", target)):
        if len(text) > MAX_TEXT:
            raise ValueError(f"the audit {name} is longer than {MAX_TEXT} characters")
        chain.plain({name: text})
    body = chain.plain(details)
    values = {"at": float(at), "actor": actor, "ip": ip, "action": action, "target": target, "details": body}
    entry_id, digest = chain.append(conn, "audit", values)
    return AuditEntry(
        id=entry_id, at=float(at), actor=actor, ip=ip, action=action, target=target, details=body, hash=digest
    )


def page(
    conn: Connection, *, limit: int, before: int | None, actor: str | None, action: str | None
) -> tuple[list[AuditEntry], int | None]:
    """Lines newest first (only ``actor``'s, only ``action``), a page at a time: pass the
    returned id as ``before`` for the next page (None: no more)."""
    limit = max(1, min(limit, 1000))
    a = audit_log
    stmt = AUDIT_PAGE
    if actor is not None:
        stmt = stmt.where(a.c.actor == actor)
    if action is not None:
        stmt = stmt.where(a.c.action == action)
    rows, more = paging.by_id(conn, stmt, a.c.id, limit=limit, before=before)
    return [entry(r) for r in rows], more


def entry(r: Row[Any]) -> AuditEntry:
    return AuditEntry(
        id=int(r.id), at=float(r.at), actor=r.actor, ip=r.ip, action=r.action, target=r.target or "",
        details=r.details or {}, hash=r.hash,
    )  # fmt: skip
