"""The suppression list in the store: entries in force for some addresses, and additions with
their audit lines, run inside the caller's transaction (a hard bounce's entry commits with the
bounce's event, a complaint's with the complaint's); and what the list's CLI and API do: pages
of entries, removal with its reason, import, the audit trail, the count.

Functions of a connection, run by the engine's reader or writer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy.engine import Connection, Row

from relay.errors import NotFound, ReasonRequired, RelayError
from relay.model import Suppression, SuppressionChange, SuppressionOrigin, SuppressionReason, suppression_key
from relay.store import paging, webhooks
from relay.store import statements as q
from relay.store.schema import suppression_audit, suppressions

# Entries that only go with a reason why: a complaint is the recipient saying "stop".
REASON_REQUIRED: tuple[SuppressionReason, ...] = ("complaint",)


def keys_for(address: str) -> tuple[str, str]:
    """What an address matches on the list: itself and its domain's ``*@domain`` entry."""
    key = suppression_key(address)
    return key, "*@" + key.rpartition("@")[2]


def find(conn: Connection, addresses: Collection[str], now: float) -> dict[str, Suppression]:
    """The entry in force for each address that has one (its own before its domain's),
    keyed by the address as given."""
    if not addresses:
        return {}
    wanted = {a: keys_for(a) for a in addresses}
    keys = sorted({k for pair in wanted.values() for k in pair})
    found = {r.address: _entry(r) for r in conn.execute(q.SUPPRESSIONS_FOR, {"keys": keys, "now": now})}
    out: dict[str, Suppression] = {}
    for address, (own, domain) in wanted.items():
        entry = found.get(own) or found.get(domain)
        if entry is not None:
            out[address] = entry
    return out


# Entries per round of statements: the IN lists stay well below the bind parameter limits
# (32766 in SQLite, 32767 in PostgreSQL's protocol) however large an import is.
CHUNK = 1000


def add(
    conn: Connection,
    entries: Sequence[Suppression],
    *,
    actor: str,
    now: float,
    via: SuppressionOrigin | None = None,
) -> list[Suppression]:
    """Add the entries whose address has none in force (an expired one is replaced), with an
    audit line each; returns those added. An address already suppressed keeps its entry.
    The audit lines' origin is ``via`` when given (an import through the CLI keeps each
    entry's own origin), else the entry's."""
    # one per address, the last wins; keys compared as stored (a caller's "Jane@X" is "jane@x")
    unique = list({e.address: e for e in (replace(e, address=suppression_key(e.address)) for e in entries)}.values())
    added: list[Suppression] = []
    for start in range(0, len(unique), CHUNK):
        added += _add(conn, unique[start : start + CHUNK], actor=actor, now=now, via=via)
    return added


def _add(
    conn: Connection, entries: list[Suppression], *, actor: str, now: float, via: SuppressionOrigin | None
) -> list[Suppression]:
    keys = [e.address for e in entries]
    conn.execute(q.DELETE_EXPIRED_SUPPRESSIONS, {"keys": keys, "now": now})
    present = set(find_keys(conn, keys, now))
    candidates = [e for e in entries if e.address not in present]
    if not candidates:
        return []
    insert = q.INSERT_SUPPRESSION_RETURNING[conn.dialect.name]
    inserted = {r.address for r in conn.execute(insert, [_row(e) for e in candidates])}
    added = [e for e in candidates if e.address in inserted]
    if added:
        conn.execute(
            q.INSERT_SUPPRESSION_AUDIT,
            [{"at": now, "address": e.address, "action": "added", "reason": e.reason, "origin": via or e.origin,
              "actor": actor, "source_queue_id": e.source_queue_id, "note": e.note} for e in added],
        )  # fmt: skip
        webhooks.write_suppression_changes(
            conn, "suppression.created", [(e, via or e.origin) for e in added], actor=actor, at=now
        )
    return added


def find_keys(conn: Connection, keys: Collection[str], now: float) -> dict[str, Suppression]:
    """Entries in force by exact key (an address or ``*@domain``, lower case)."""
    if not keys:
        return {}
    return {r.address: _entry(r) for r in conn.execute(q.SUPPRESSIONS_FOR, {"keys": sorted(set(keys)), "now": now})}


def suppress(conn: Connection, entry: Suppression, *, actor: str, now: float) -> tuple[Suppression, bool]:
    """Add one entry unless its address has one in force: (the entry in force, whether it is new)."""
    key = suppression_key(entry.address)
    for _ in range(2):
        if add(conn, [entry], actor=actor, now=now):
            return replace(entry, address=key), True
        existing = find_keys(conn, [key], now).get(key)
        if existing is not None:
            return existing, False
        # removed by another node between the insert and this read: try once more
    raise RelayError(f"could not add {key}: it keeps changing")


def remove(
    conn: Connection, address: str, *, reason: str, actor: str, origin: SuppressionOrigin, now: float
) -> Suppression:
    """Remove the address's own entry (an address, or ``*@domain``) with an audit line saying
    why. NotFound when it has none in force; ReasonRequired when ``reason`` is blank and the
    entry is a complaint's."""
    key, domain = keys_for(address)
    found = find_keys(conn, [key, domain], now)
    entry = found.get(key)
    if entry is None:
        if domain in found:
            raise NotFound(f"{key} has no entry of its own; it is suppressed by the entry {domain}")
        raise NotFound(f"{key} is not suppressed")
    if entry.reason in REASON_REQUIRED and not reason.strip():
        raise ReasonRequired(f"{key} is suppressed for a {entry.reason}: removing it needs a reason")
    conn.execute(q.DELETE_SUPPRESSION, {"key": key})
    conn.execute(
        q.INSERT_SUPPRESSION_AUDIT,
        {"at": now, "address": key, "action": "removed", "reason": reason.strip(), "origin": origin,
         "actor": actor, "source_queue_id": entry.source_queue_id, "note": entry.note},
    )  # fmt: skip
    webhooks.write_suppression_changes(
        conn, "suppression.deleted", [(entry, origin)], actor=actor, at=now, removal_reason=reason.strip()
    )
    return entry


def page(
    conn: Connection,
    *,
    address: str | None,
    reason: SuppressionReason | None,
    limit: int,
    after: tuple[float, str] | None,
    now: float,
) -> tuple[list[Suppression], tuple[float, str] | None]:
    """Entries in force, newest first, a page at a time (see LogStore.suppressions)."""
    s = suppressions
    stmt = q.SUPPRESSION_PAGE
    if address is not None:
        stmt = stmt.where(s.c.address == suppression_key(address))
    if reason is not None:
        stmt = stmt.where(s.c.reason == reason)
    if after is not None:
        at, last = after
        stmt = stmt.where((s.c.created_at < at) | ((s.c.created_at == at) & (s.c.address < last)))
    rows = conn.execute(stmt, {"now": now, "limit": limit + 1}).all()
    entries = [_entry(r) for r in rows[:limit]]
    more = (entries[-1].created_at, entries[-1].address) if len(rows) > limit else None
    return entries, more


def audit(
    conn: Connection, *, address: str | None, limit: int, before: int | None
) -> tuple[list[SuppressionChange], int | None]:
    """Lines of the audit trail, newest first, a page at a time (see LogStore.suppression_audit)."""
    a = suppression_audit
    stmt = q.SUPPRESSION_AUDIT_PAGE
    if address is not None:
        stmt = stmt.where(a.c.address == suppression_key(address))
    rows, more = paging.by_id(conn, stmt, a.c.id, limit=limit, before=before)
    changes = [
        SuppressionChange(
            at=float(r.at), address=r.address, action=r.action, reason=r.reason, origin=r.origin,
            actor=r.actor, source_queue_id=r.source_queue_id, note=r.note or "",
        )
        for r in rows
    ]  # fmt: skip
    return changes, more


def count(conn: Connection, now: float) -> int:
    """Entries in force."""
    return int(conn.scalar(q.COUNT_SUPPRESSIONS, {"now": now}) or 0)


def _row(e: Suppression) -> dict[str, object]:
    return {
        "address": suppression_key(e.address),
        "reason": e.reason,
        "origin": e.origin,
        "source_queue_id": e.source_queue_id,
        "created_at": e.created_at,
        "expires_at": e.expires_at,
        "note": e.note,
    }


def _entry(r: Row[Any]) -> Suppression:
    return Suppression(
        address=r.address,
        reason=r.reason,
        origin=r.origin,
        source_queue_id=r.source_queue_id,
        created_at=float(r.created_at),
        expires_at=None if r.expires_at is None else float(r.expires_at),
        note=r.note or "",
    )
