"""Several nodes on one store: the node registry (heartbeats), freeing a dead node's leases,
the NOTIFY that wakes every node's delivery, and per_domain counted across the cluster.

A node is a process that delivers; its name is the lease owner its claims write. A node silent
for more than 3 of its own heartbeat intervals, and not stopped, is dead: the first live node
to see it frees its leases (recipients and webhook deliveries) in one transaction and marks the
row (``released_at``), so that it is done once. A node that was only cut off from the store
clears that mark with its next heartbeat and is alive again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from relay.model import Node
from relay.store import statements as q

log = logging.getLogger(__name__)

DEAD_AFTER = 3  # heartbeat intervals of silence
FORGET_AFTER = 86400.0  # seconds: rows of nodes stopped or dead this long are deleted
_NOTIFIED = "relay_due_notified"  # conn.info: the transaction that has sent NOTIFY already


@dataclass(frozen=True, slots=True)
class Freed:
    """What freeing one dead node's leases made due again."""

    name: str
    recipients: int
    webhook_deliveries: int
    silent_for: float  # seconds since its last heartbeat


@dataclass(frozen=True, slots=True)
class Watch:
    """One look at the registry: the dead nodes this look freed, whether this node had been
    taken for dead (its leases freed) before this heartbeat, and when the next node could be
    dead (None: no other node runs)."""

    freed: tuple[Freed, ...]
    revived: bool
    next_death: float | None


def notify_due(conn: Connection) -> None:
    """Wake every node's delivery when this transaction commits (PostgreSQL NOTIFY; one per
    transaction, however many of its operations make recipients due). SQLite: nothing (its
    processes poll)."""
    if conn.dialect.name != "postgresql":
        return
    txn = conn.get_transaction()
    if txn is not None and conn.info.get(_NOTIFIED) is txn:
        return
    conn.execute(q.NOTIFY_DUE)
    conn.info[_NOTIFIED] = txn


def register(conn: Connection, node: Node) -> None:
    row = {
        "name": node.name, "host": node.host, "pid": node.pid, "version": node.version,
        "started_at": node.started_at, "heartbeat_at": node.heartbeat_at, "heartbeat": node.heartbeat,
        "in_flight": node.in_flight,
    }  # fmt: skip
    conn.execute(q.INSERT_NODE[conn.dialect.name], row)


def beat(conn: Connection, node: Node) -> bool:
    """Write a heartbeat (registering again when the row is gone); True when the node had been
    taken for dead, its leases freed."""
    params = {"node": node.name, "now": node.heartbeat_at, "interval": node.heartbeat, "in_flight": node.in_flight}
    if conn.execute(q.REVIVE_NODE, params).rowcount == 1:
        return True
    if conn.execute(q.BEAT_NODE, params).rowcount == 0:
        register(conn, node)
    return False


def stop(conn: Connection, name: str, now: float) -> None:
    conn.execute(q.STOP_NODE, {"node": name, "now": now})


def all_nodes(conn: Connection) -> list[Node]:
    return [
        Node(r.name, r.host, int(r.pid), r.version, float(r.started_at), float(r.heartbeat_at), float(r.heartbeat),
             int(r.in_flight), None if r.stopped_at is None else float(r.stopped_at))
        for r in conn.execute(q.NODES)
    ]  # fmt: skip


def watch(conn: Connection, me: Node | None, name: str, now: float) -> Watch:
    """Beat (with ``me``), then free the leases of every node found dead at ``now``, each in
    this one transaction, and delete rows of nodes gone for a day."""
    revived = beat(conn, me) if me is not None else False
    stmt = q.WATCHED_NODES
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)  # a node another one is freeing right now
    freed: list[Freed] = []
    next_death: float | None = None
    for r in conn.execute(stmt, {"node": name}).all():
        dies_at = float(r.heartbeat_at) + DEAD_AFTER * float(r.heartbeat)
        if dies_at < now:
            freed.append(_free(conn, r.name, now, now - float(r.heartbeat_at)))
        else:
            next_death = dies_at if next_death is None else min(next_death, dies_at)
    conn.execute(q.FORGET_NODES, {"before": now - FORGET_AFTER})
    if any(f.recipients or f.webhook_deliveries for f in freed):
        notify_due(conn)
    return Watch(tuple(freed), revived, next_death)


def _free(conn: Connection, name: str, now: float, silent_for: float) -> Freed:
    """A dead node's leases, due at once. No event: a lease is not an attempt, and neither a
    lease that runs out nor one given back at shutdown writes one; the next attempt's event
    says which node made it."""
    rids = conn.execute(q.RELEASE_DEAD, {"owner": name, "now": now}).all()
    hooks = conn.execute(q.RELEASE_DEAD_WEBHOOKS, {"owner": name, "now": now}).rowcount
    conn.execute(q.NODE_RELEASED, {"node": name, "now": now})
    return Freed(name, len(rids), hooks, silent_for)


def lock_claims(conn: Connection) -> None:
    """Serialize claims across nodes until commit (PostgreSQL; SQLite writes are serial)."""
    if conn.dialect.name == "postgresql":
        conn.execute(q.CLAIM_LOCK)


def in_flight_by_domain(conn: Connection, now: float, *, alone: bool) -> Mapping[str, int]:
    """Every node's SMTP transactions in flight, per domain (leases that have not run out)."""
    return {domain: int(n) for domain, n in conn.execute(q.IN_FLIGHT_BY_DOMAIN[alone], {"now": now})}
