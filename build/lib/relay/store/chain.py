"""The hash chains that make the access audit and the case trails tamper-evident.

Two chains: "audit" (table audit_log) and "cases" (table case_entries, every case's entries in
one chain). Each entry's ``hash`` is sha256(previous entry's hash + the entry's canonical JSON);
the first entry's previous hash is 64 zeros. ``chain_heads`` holds each chain's newest link:
appending locks that row first, so appends from several processes serialize and ids grow in
chain order, and an entry deleted from the end shows as a head that points past the chain.

``verify`` walks each chain in id order, a batch at a time, and reports the first broken link.
An entry changed in the database fails its own hash; one deleted makes the next entry fail.
The limit: someone who can rewrite the tables AND recompute every later hash and the head is
caught only by comparing the head hash with a copy kept elsewhere.

Functions of a connection, run inside the caller's transaction.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from relay.store.schema import audit_log, case_entries, chain_heads

ChainName = Literal["audit", "cases"]
CHAINS: Final[tuple[ChainName, ...]] = ("audit", "cases")
GENESIS: Final = "0" * 64
BATCH: Final = 1000  # entries read per round by verify
MAX_DEPTH: Final = 16  # nesting of details

# The fields each chain hashes, in the order they are read back (id first).
_TABLES: Final[Mapping[ChainName, sa.Table]] = {"audit": audit_log, "cases": case_entries}
_FIELDS: Final[Mapping[ChainName, tuple[str, ...]]] = {
    "audit": ("id", "at", "actor", "ip", "action", "target", "details"),
    "cases": ("id", "case_id", "at", "actor", "kind", "details"),
}

# The chain's head, locked until the transaction ends (SQLite: writes are serial already, and
# its compiler leaves FOR UPDATE out).
HEAD_FOR_UPDATE = (
    sa.select(chain_heads.c.last_id, chain_heads.c.hash)
    .where(chain_heads.c.name == sa.bindparam("name"))
    .with_for_update()
)
REPEATABLE_READ = sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
HEAD = sa.select(chain_heads.c.name, chain_heads.c.last_id, chain_heads.c.hash)
# A chain's first append creates its head; two first appends at once must not fail.
INSERT_HEAD = {
    "sqlite": sqlite.insert(chain_heads).on_conflict_do_nothing(index_elements=["name"]),
    "postgresql": postgresql.insert(chain_heads).on_conflict_do_nothing(index_elements=["name"]),
}
UPDATE_HEAD = (
    chain_heads.update()
    .where(chain_heads.c.name == sa.bindparam("chain"))
    .values(last_id=sa.bindparam("last_id"), hash=sa.bindparam("new_hash"))
)
# An entry is inserted with an empty hash, then given its hash, which covers its id.
INSERT_ENTRY = {name: table.insert().returning(table.c.id) for name, table in _TABLES.items()}
SET_HASH = {
    name: table.update().where(table.c.id == sa.bindparam("entry_id")).values(hash=sa.bindparam("new_hash"))
    for name, table in _TABLES.items()
}
# A batch of a chain in id order, after :after.
BATCH_AFTER = {
    name: sa.select(*(table.c[f] for f in _FIELDS[name]), table.c.hash)
    .where(table.c.id > sa.bindparam("after"))
    .order_by(table.c.id)
    .limit(sa.bindparam("limit"))
    for name, table in _TABLES.items()
}


def plain(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """``details`` as stored and hashed: JSON objects, arrays, strings, ints, finite floats,
    booleans and null only; a float with an integral value becomes an int (PostgreSQL's JSONB
    gives 1e300 back as an integer: both stores must read back what was hashed). ValueError,
    with a readable message, for anything else, a NUL or a string that is not valid Unicode."""
    if details is None:
        return {}
    if not isinstance(details, Mapping):
        raise ValueError("details must be a JSON object")
    out = _plain(details, 0)
    assert isinstance(out, dict)
    return out


def _plain(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError("details are nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("details cannot hold NaN or infinity")
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError("details' keys must be strings")
            out[_text(k)] = _plain(v, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    raise ValueError(f"details cannot hold a {type(value).__name__}")


def _text(s: str) -> str:
    if "\x00" in s:
        raise ValueError("text cannot contain NUL characters")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode") from exc
    return s


def canonical(chain: ChainName, fields: Mapping[str, Any]) -> str:
    """The text an entry's hash covers: its fields as sorted, compact JSON; ``at`` as the repr
    of the float (what both stores' double precision columns give back)."""
    doc = {f: fields[f] for f in _FIELDS[chain]}
    doc["id"] = int(doc["id"])
    doc["at"] = repr(float(doc["at"]))
    if "case_id" in doc:
        doc["case_id"] = int(doc["case_id"])
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def link(prev: str, chain: ChainName, fields: Mapping[str, Any]) -> str:
    return hashlib.sha256((prev + canonical(chain, fields)).encode("utf-8")).hexdigest()


def lock_head(conn: Connection, chain: ChainName) -> tuple[int, str]:
    """Lock the chain's head (creating it on first use): (last id, last hash). Every append
    locks the "audit" head first, so transactions that append to both chains (a case entry and
    its audit line, in either order) always lock in the same order and never deadlock."""
    if chain != "audit":
        _lock(conn, "audit")
    return _lock(conn, chain)


def _lock(conn: Connection, chain: ChainName) -> tuple[int, str]:
    row = conn.execute(HEAD_FOR_UPDATE, {"name": chain}).first()
    if row is None:
        conn.execute(INSERT_HEAD[conn.dialect.name], {"name": chain, "last_id": 0, "hash": GENESIS})
        row = conn.execute(HEAD_FOR_UPDATE, {"name": chain}).one()
    return int(row.last_id), str(row.hash)


def append(conn: Connection, chain: ChainName, values: Mapping[str, Any]) -> tuple[int, str]:
    """Insert one entry (``values``: its columns but id and hash; details already ``plain``)
    at the end of the chain: (its id, its hash)."""
    _, prev = lock_head(conn, chain)
    entry_id = int(conn.execute(INSERT_ENTRY[chain], {**values, "hash": ""}).scalar_one())
    digest = link(prev, chain, {**values, "id": entry_id})
    conn.execute(SET_HASH[chain], {"entry_id": entry_id, "new_hash": digest})
    conn.execute(UPDATE_HEAD, {"chain": chain, "last_id": entry_id, "new_hash": digest})
    return entry_id, digest


# -- verification


@dataclass(frozen=True, slots=True)
class Broken:
    """The first broken link of a chain."""

    chain: ChainName
    entry_id: int
    why: str

    def __str__(self) -> str:
        return f"{self.chain} entry {self.entry_id}: {self.why}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What ``verify`` found: entries per chain, their heads' hashes, the first broken link."""

    counts: Mapping[str, int] = field(default_factory=dict)
    heads: Mapping[str, str] = field(default_factory=dict)  # the last entry's hash (GENESIS: empty chain)
    broken: Broken | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def text(self) -> str:
        if self.broken is not None:
            return f"broken: {self.broken}"
        return (
            f"ok: {self.counts.get('audit', 0)} audit entries, {self.counts.get('cases', 0)} case entries; "
            f"heads audit={self.heads.get('audit', GENESIS)} cases={self.heads.get('cases', GENESIS)}"
        )

    def to_json(self) -> dict[str, Any]:
        broken = self.broken
        return {
            "ok": self.ok,
            "counts": dict(self.counts),
            "heads": dict(self.heads),
            "broken": None
            if broken is None
            else {"chain": broken.chain, "entry_id": broken.entry_id, "why": broken.why},
        }


def verify(conn: Connection) -> ChainReport:
    """Walk both chains and report the first broken link of each's (the audit's first)."""
    if conn.dialect.name == "postgresql":
        # One snapshot for the heads and every batch: appends committed meanwhile are not half seen.
        conn.execute(REPEATABLE_READ)
    heads = {r.name: (int(r.last_id), str(r.hash)) for r in conn.execute(HEAD)}
    counts: dict[str, int] = {}
    last: dict[str, str] = {}
    for chain in CHAINS:
        count, digest, broken = _walk(conn, chain, heads.get(chain))
        counts[chain], last[chain] = count, digest
        if broken is not None:
            return ChainReport(counts, last, broken)
    return ChainReport(counts, last)


def _walk(conn: Connection, chain: ChainName, head: tuple[int, str] | None) -> tuple[int, str, Broken | None]:
    prev, prev_id, count = GENESIS, 0, 0
    while True:
        rows = conn.execute(BATCH_AFTER[chain], {"after": prev_id, "limit": BATCH}).all()
        for r in rows:
            fields = _fields(chain, r)
            entry_id = int(r.id)
            if link(prev, chain, fields) != r.hash:
                # An entry changed fails alone; one deleted makes the next fail, after a gap in ids
                # (ids come from the head's lock, in order: a gap is a rollback, or a deletion).
                if entry_id != prev_id + 1:
                    after = f"entry {prev_id}" if prev_id else "the start"
                    why = f"hash mismatch after a gap in ids (after {after}): entries deleted, or this one altered"
                else:
                    why = "hash mismatch: the entry was altered"
                return count, prev, Broken(chain, entry_id, why)
            prev, prev_id = str(r.hash), entry_id
            count += 1
        if len(rows) < BATCH:
            break
    if head is None:
        if count:
            return count, prev, Broken(chain, prev_id, "the chain has no head")
        return count, prev, None
    head_id, head_hash = head
    if head_id != prev_id or head_hash != prev:
        if head_id > prev_id:
            why = f"the head points at entry {head_id}, past the chain's end: entries deleted at the end"
        else:
            why = f"the head (entry {head_id}) does not match the chain's last entry"
        return count, prev, Broken(chain, head_id, why)
    return count, prev, None


def _fields(chain: ChainName, r: Any) -> dict[str, Any]:
    out = {f: getattr(r, f) for f in _FIELDS[chain]}
    details = out["details"]
    if isinstance(details, str):  # a driver that hands JSON back as text
        details = json.loads(details)
    out["details"] = details
    return out
