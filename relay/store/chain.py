"""The hash chains that make the access audit and the case trails tamper-evident.

Two chains: "audit" (table audit_log) and "cases" (table case_entries, every case's entries in
one chain). Each entry's ``hash`` is sha256(previous entry's hash + the entry's canonical JSON);
the first entry's previous hash is 64 zeros. ``chain_heads`` holds each chain's newest link:
appending locks that row first, so appends from several processes serialize and ids grow in
chain order, and an entry deleted from the end shows as a head that points past the chain.

``verify`` walks each chain in id order, a batch at a time, and reports the first broken link.
An entry changed in the database fails its own hash; one deleted makes the next entry fail.

Retention deletes the audit's oldest entries (a prefix of the chain, relay.store.retention). In
the same transaction it moves the chain's anchor, the ``chain_heads`` row BASE ("audit_base":
the id and hash of the last entry deleted), and appends a PURGE_ACTION line naming that id and
hash. ``verify`` starts from the anchor instead of the genesis hash, and checks that the newest
PURGE_ACTION line names the anchor: deleting entries any other way (the oldest one included) or
moving the anchor by hand still breaks the chain.
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
BASE: Final = "audit_base"  # chain_heads row: the last audit entry retention deleted (id, hash)
PURGE_ACTION: Final = "retention.purge"  # the audit line recording each move of the anchor
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
BASE_ROW = sa.select(chain_heads.c.last_id, chain_heads.c.hash).where(chain_heads.c.name == BASE)
# An audit entry at or before the anchor: retention deleted those, so one there was put back.
AUDIT_BEFORE_BASE = sa.select(sa.func.min(audit_log.c.id)).where(audit_log.c.id <= sa.bindparam("base_id"))
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


def base(conn: Connection) -> tuple[int, str]:
    """The audit chain's anchor: (id, hash) of the last entry retention deleted; (0, GENESIS)
    while nothing has been."""
    row = conn.execute(BASE_ROW).first()
    return (0, GENESIS) if row is None else (int(row.last_id), str(row.hash))


def set_base(conn: Connection, last_id: int, digest: str) -> None:
    """Move the anchor (retention, under the audit head's lock, in the purge's transaction)."""
    conn.execute(INSERT_HEAD[conn.dialect.name], {"name": BASE, "last_id": 0, "hash": GENESIS})
    conn.execute(UPDATE_HEAD, {"chain": BASE, "last_id": last_id, "new_hash": digest})


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
    base: tuple[int, str] | None = None  # the audit's retention anchor: entries up to this id were purged

    @property
    def ok(self) -> bool:
        return self.broken is None

    def text(self) -> str:
        if self.broken is not None:
            return f"broken: {self.broken}"
        text = (
            f"ok: {self.counts.get('audit', 0)} audit entries, {self.counts.get('cases', 0)} case entries; "
            f"heads audit={self.heads.get('audit', GENESIS)} cases={self.heads.get('cases', GENESIS)}"
        )
        if self.base is not None:
            text += f"; audit entries up to {self.base[0]} purged by retention (anchor {self.base[1]})"
        return text

    def to_json(self) -> dict[str, Any]:
        broken = self.broken
        return {
            "ok": self.ok,
            "counts": dict(self.counts),
            "heads": dict(self.heads),
            "broken": None
            if broken is None
            else {"chain": broken.chain, "entry_id": broken.entry_id, "why": broken.why},
            "audit_base": None if self.base is None else {"last_id": self.base[0], "hash": self.base[1]},
        }


def verify(conn: Connection) -> ChainReport:
    """Walk both chains and report the first broken link of each's (the audit's first). The
    audit is walked from its retention anchor, when retention has purged some of it."""
    if conn.dialect.name == "postgresql":
        # One snapshot for the heads and every batch: appends committed meanwhile are not half seen.
        conn.execute(REPEATABLE_READ)
    heads = {r.name: (int(r.last_id), str(r.hash)) for r in conn.execute(HEAD)}
    anchor = heads.get(BASE)
    counts: dict[str, int] = {}
    last: dict[str, str] = {}
    for chain in CHAINS:
        count, digest, broken = _walk(conn, chain, heads.get(chain), anchor if chain == "audit" else None)
        counts[chain], last[chain] = count, digest
        if broken is not None:
            return ChainReport(counts, last, broken, anchor)
    return ChainReport(counts, last, None, anchor)


def _walk(
    conn: Connection, chain: ChainName, head: tuple[int, str] | None, anchor: tuple[int, str] | None
) -> tuple[int, str, Broken | None]:
    prev_id, prev = anchor if anchor is not None else (0, GENESIS)
    count = 0
    if anchor is not None:
        stray = conn.scalar(AUDIT_BEFORE_BASE, {"base_id": prev_id})
        if stray is not None:
            why = f"the entry is at or before the retention anchor (entry {prev_id}), which retention deleted"
            return count, prev, Broken(chain, int(stray), why)
    recorded: tuple[int, Any] | None = None  # the newest retention.purge line: (its id, its details)
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
            if chain == "audit" and fields["action"] == PURGE_ACTION:
                recorded = (entry_id, fields["details"])
            prev, prev_id = str(r.hash), entry_id
            count += 1
        if len(rows) < BATCH:
            break
    broken = None if anchor is None else _anchor_recorded(chain, anchor, recorded)
    return count, prev, broken or _head_matches(chain, head, count, prev_id, prev)


def _head_matches(chain: ChainName, head: tuple[int, str] | None, count: int, last_id: int, last: str) -> Broken | None:
    """The head must name the chain's last entry: one past it means entries deleted at the end."""
    if head is None:
        return Broken(chain, last_id, "the chain has no head") if count else None
    head_id, head_hash = head
    if head_id == last_id and head_hash == last:
        return None
    if head_id > last_id:
        return Broken(
            chain, head_id, f"the head points at entry {head_id}, past the chain's end: entries deleted at the end"
        )
    return Broken(chain, head_id, f"the head (entry {head_id}) does not match the chain's last entry")


def _anchor_recorded(chain: ChainName, anchor: tuple[int, str], recorded: tuple[int, Any] | None) -> Broken | None:
    """The anchor must be the one the newest retention.purge line names: moved by hand, it is not."""
    if recorded is None:
        return Broken(chain, anchor[0], f"no {PURGE_ACTION} line records the retention anchor")
    line_id, details = recorded
    named = (details.get("through_id"), details.get("hash")) if isinstance(details, Mapping) else None
    if named != anchor:
        why = f"the retention anchor (entry {anchor[0]}) is not the one the newest {PURGE_ACTION} line names"
        return Broken(chain, line_id, why)
    return None


def _fields(chain: ChainName, r: Any) -> dict[str, Any]:
    out = {f: getattr(r, f) for f in _FIELDS[chain]}
    details = out["details"]
    if isinstance(details, str):  # a driver that hands JSON back as text
        details = json.loads(details)
    out["details"] = details
    return out
