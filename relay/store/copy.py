"""Copying a whole store into another (``relay db copy --to URL``): the day a SQLite store moves
to PostgreSQL.

The source is read from one snapshot (one SQLite read transaction: Relay may even be running,
though what it writes after the snapshot is not copied). The target is written in one
transaction that first runs the migrations, then checks that the copied tables are empty, then
streams every table in foreign-key order, in batches, with the source's ids, and finally moves
PostgreSQL's sequences past the copied ids. Any failure rolls the whole target back.

Rows are copied as stored: the hash chains (``audit_log``, ``case_entries``, ``chain_heads``)
hash sorted, compact JSON of the details (relay.store.chain.canonical), so JSONB reordering
keys on PostgreSQL does not break them, and ``relay audit verify`` passes on the copy.

Functions of connections: ``snapshot`` opens the source; the rest run inside the caller's
target transaction (``LogStore.copy_from``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from relay.errors import Conflict, StoreError
from relay.store.engine import reason
from relay.store.schema import metadata

if TYPE_CHECKING:
    from relay.store.migrations import SchemaState

log = logging.getLogger(__name__)

# Not copied: runtime state of the store being left. ``nodes`` are the processes running on
# it; ``console_sessions`` are sign-ins to it (everyone signs in again on the new store).
SKIPPED: Final[Mapping[str, str]] = {
    "nodes": "runtime state: the nodes register again when they start",
    "console_sessions": "sign-ins: console users sign in again",
}
BATCH_ROWS: Final = 1000
BATCH_BYTES: Final = 16 * 1024 * 1024  # bodies can be 25 MB each: a batch stops at this many bytes


def tables() -> list[sa.Table]:
    """The copied tables, parents before children (foreign keys hold at every insert)."""
    return [t for t in metadata.sorted_tables if t.name not in SKIPPED]


@dataclass(frozen=True, slots=True)
class Preflight:
    """The target before a copy: its schema against this code, and its copied tables that
    hold rows (a copy only goes into an empty store)."""

    state: SchemaState
    rows: Mapping[str, int] = field(default_factory=dict)  # table -> rows, only those with rows
    tables: tuple[str, ...] = ()  # every table the target has (another application's, too)


@dataclass(frozen=True, slots=True)
class Copied:
    """What a copy read (``source``, rows per table in the snapshot) and wrote (``written``)."""

    source: Mapping[str, int]
    written: Mapping[str, int]


Progress = Callable[[str, int, int], None]  # table, rows written so far, rows in the source


# -- the source


@contextmanager
def snapshot(url: str) -> Iterator[Connection]:
    """A connection to the SQLite store at ``url`` inside one read transaction: every read
    through it sees the same snapshot, whatever Relay commits meanwhile (WAL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise StoreError("only a SQLite store can be copied from")
    engine = sa.create_engine(parsed.set(drivername="sqlite+pysqlite"), poolclass=NullPool)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: object) -> None:
        dbapi_conn.isolation_level = None  # BEGIN is ours: a deferred one, read only
        dbapi_conn.execute("PRAGMA busy_timeout=10000")

    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            try:
                conn.exec_driver_sql("SELECT count(*) FROM sqlite_master")  # the snapshot starts here
                yield conn
            finally:
                conn.exec_driver_sql("ROLLBACK")
    finally:
        engine.dispose()


def counts(conn: Connection) -> dict[str, int]:
    """Rows per copied table."""
    return {t.name: _count(conn, t) for t in tables()}


def preflight(conn: Connection) -> Preflight:
    """Read-only: the target's schema state and which copied tables of it hold rows (those that
    exist: an older schema has fewer)."""
    from relay.store.migrations import schema_state

    state = schema_state(conn)
    present = sorted(sa.inspect(conn).get_table_names())
    held = {t.name: n for t in tables() if t.name in present and (n := _count(conn, t))}
    return Preflight(state, held, tuple(present))


def _count(conn: Connection, table: sa.Table) -> int:
    return int(conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


# -- the target


def copy_into(target: Connection, source: Connection, progress: Progress | None = None) -> Copied:
    """Migrate the target, check that it is empty, copy every table from ``source`` with its
    ids, and set the target's sequences; in the caller's transaction. Conflict when the target
    holds rows; StoreError naming the table and ids when a batch cannot be written."""
    from relay.store.migrations import schema_state, upgrade_sync

    if schema_state(source) != "current":  # checked before, but the snapshot is what is copied
        raise StoreError('the source store is not at the newest schema: run "relay db upgrade" on it first')
    upgrade_sync(target)
    _lock(target)
    held = {t.name: n for t in tables() if (n := _count(target, t))}
    if held:
        raise Conflict(f"the target already holds rows ({_listing(held)}): copy only into an empty store")
    source_counts = counts(source)
    written: dict[str, int] = {}
    for table in tables():
        written[table.name] = _copy_table(target, source, table, source_counts[table.name], progress)
    set_sequences(target)
    return Copied(source_counts, written)


def _lock(conn: Connection) -> None:
    """PostgreSQL: no other client writes the tables while they are filled (a node started on
    the target too early waits). SQLite's BEGIN IMMEDIATE holds the write lock already."""
    if conn.dialect.name == "postgresql":
        names = ", ".join(conn.dialect.identifier_preparer.quote(t.name) for t in tables())
        conn.exec_driver_sql(f"LOCK TABLE {names} IN EXCLUSIVE MODE")


def _copy_table(target: Connection, source: Connection, table: sa.Table, total: int, progress: Progress | None) -> int:
    order = list(table.primary_key.columns) or list(table.columns)
    result = source.execute(sa.select(table).order_by(*order))
    insert = table.insert()
    coerce = [_coercion(c) for c in table.columns]
    names = [c.name for c in table.columns]
    written = 0
    batch: list[dict[str, Any]] = []
    size = 0
    try:
        while rows := result.fetchmany(BATCH_ROWS):
            for row in rows:
                values = {n: f(v) for n, f, v in zip(names, coerce, row, strict=True)}
                batch.append(values)
                size += _size(row)
                if len(batch) >= BATCH_ROWS or size >= BATCH_BYTES:
                    written += _write(target, insert, table, batch)
                    batch, size = [], 0
                    if progress is not None:
                        progress(table.name, written, total)
        if batch:
            written += _write(target, insert, table, batch)
    finally:
        result.close()
    if progress is not None:
        progress(table.name, written, total)
    return written


def _write(target: Connection, insert: sa.Insert, table: sa.Table, batch: Sequence[dict[str, Any]]) -> int:
    """One executemany in a savepoint; when it fails, the rows one by one to name the bad one."""
    try:
        with target.begin_nested():
            target.execute(insert, list(batch))
    except DBAPIError as exc:
        for row in batch:
            try:
                with target.begin_nested():
                    target.execute(insert, row)
            except DBAPIError as one:
                raise StoreError(f"cannot copy {table.name} ({_key(table, row)}): {reason(one)}") from one
        raise StoreError(f"cannot copy {table.name}: {reason(exc)}") from exc
    return len(batch)


def _key(table: sa.Table, row: Mapping[str, Any]) -> str:
    return ", ".join(f"{c.name} {row[c.name]!r}" for c in table.primary_key.columns)


def _coercion(column: sa.Column[Any]) -> Callable[[Any], Any]:
    """SQLite keeps what it was given in any column (an integral float may come back as an int);
    PostgreSQL's driver wants each column's own type."""
    kind = column.type
    if isinstance(kind, sa.Float):
        return lambda v: None if v is None else float(v)
    if isinstance(kind, sa.Integer):
        return lambda v: None if v is None else _integer(v)
    return lambda v: v


def _integer(value: Any) -> int:
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"not an integer: {value!r}")
    return int(value)


def _size(row: Sequence[Any]) -> int:
    return sum(len(v) for v in row if isinstance(v, bytes | str))


def set_sequences(conn: Connection) -> None:
    """PostgreSQL: every serial column's sequence continues after the largest copied id (rows
    inserted with explicit ids leave it at 1). SQLite takes max(rowid) + 1 by itself."""
    if conn.dialect.name != "postgresql":
        return
    serials = conn.execute(
        sa.text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND column_default LIKE 'nextval(%'"
        )
    ).all()
    quote = conn.dialect.identifier_preparer.quote
    for table_name, column_name in serials:
        conn.execute(
            sa.text(
                f"SELECT setval(pg_get_serial_sequence(:table, :column), "  # noqa: S608 - quoted identifiers
                f"coalesce(max({quote(column_name)}), 0) + 1, false) FROM {quote(table_name)}"
            ),
            {"table": quote(table_name), "column": column_name},
        )


def _listing(rows: Mapping[str, int]) -> str:
    return ", ".join(f"{name}: {n:,}" for name, n in rows.items())
