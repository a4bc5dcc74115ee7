"""The suppression list in the store: entries in force for some addresses, and additions with
their audit lines, run inside the caller's transaction (a hard bounce's entry commits with the
bounce's event, a complaint's with the complaint's).

Functions of a connection, run by the engine's reader or writer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Row

from relay.model import Suppression, suppression_key
from relay.store import statements as q


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


def add(conn: Connection, entries: Sequence[Suppression], *, actor: str, now: float) -> list[Suppression]:
    """Add the entries whose address has none in force (an expired one is replaced), with an
    audit line each; returns those added. An address already suppressed keeps its entry."""
    if not entries:
        return []
    entries = list({e.address: e for e in entries}.values())  # one per address, the last wins
    keys = [e.address for e in entries]
    conn.execute(q.DELETE_EXPIRED_SUPPRESSIONS, {"keys": keys, "now": now})
    present = set(find_keys(conn, keys, now))
    added = [e for e in entries if e.address not in present]
    if added:
        insert = q.INSERT_SUPPRESSION[conn.dialect.name]
        conn.execute(insert, [_row(e) for e in added])
        conn.execute(
            q.INSERT_SUPPRESSION_AUDIT,
            [{"at": now, "address": e.address, "action": "added", "reason": e.reason, "origin": e.origin,
              "actor": actor, "source_queue_id": e.source_queue_id, "note": e.note} for e in added],
        )  # fmt: skip
    return added


def find_keys(conn: Connection, keys: Collection[str], now: float) -> dict[str, Suppression]:
    """Entries in force by exact key (an address or ``*@domain``, lower case)."""
    if not keys:
        return {}
    return {r.address: _entry(r) for r in conn.execute(q.SUPPRESSIONS_FOR, {"keys": sorted(set(keys)), "now": now})}


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
