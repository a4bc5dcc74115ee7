"""The log store: the queue and the append-only event log, behind named operations.

Only this module speaks SQL (SQLAlchemy 2 Core, no ORM). The same operations, plain
functions of a connection, run on SQLite (WAL, synchronous=FULL; in dedicated threads) and
PostgreSQL (asyncpg); see ``_Engines``.

Writes go through one writer task per process. Operations that arrive while a commit is
in progress are applied together in the next transaction (group commit), each kind as one
executemany; every caller still waits for the commit that holds its own operation. When a
shared transaction fails, its operations are retried one by one so that only the bad one
fails. SQLAlchemy errors become ``StoreError`` here and nowhere else.

Times are seconds since the epoch (UTC) in float columns named ``*_at``.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from relay.errors import Conflict, NotFound, RelayError, StoreError, one_line
from relay.model import (
    ACTIVE_STATES,
    CANCELLED,
    DEFERRED,
    FINAL_STATES,
    QUEUED,
    RETRY_ALL_STATES,
    RETRY_STATES,
    SENDING,
    Claimed,
    EventType,
    EventView,
    Imported,
    MessageView,
    NewMessage,
    Outcome,
    QueueEntry,
    QueueSummary,
    RecipientView,
    StatsRow,
    TrackTarget,
)

if TYPE_CHECKING:
    from relay.migrations import SchemaState

log = logging.getLogger(__name__)

T = TypeVar("T")

# -- schema (the migrations in relay/migrations create exactly this)

metadata = sa.MetaData()
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite wants INTEGER for rowid aliases
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # the queue id (ULID)
    sa.Column("message_id", sa.Text, nullable=False),  # the Message-ID header, without <>
    sa.Column("mail_from", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("tags", _Json, nullable=False),
    sa.Column("username", sa.Text),
    sa.Column("client_ip", sa.Text, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("track", sa.String(16), nullable=False, server_default=""),
    sa.Index("ix_messages_message_id", "message_id"),
    sa.Index("ix_messages_received_at", "received_at"),
)

bodies = sa.Table(
    "bodies",
    metadata,
    sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

message_tags = sa.Table(
    "message_tags",
    metadata,
    sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Index("ix_message_tags_tag", "tag"),
)

recipients = sa.Table(
    "recipients",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("domain", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float),  # due time; the lease expiry while sending; NULL when final
    sa.Column("lease_owner", sa.Text),
    sa.Column("last_response", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_recipients_message_id", "message_id"),
    sa.Index("ix_recipients_next_attempt_at", "next_attempt_at"),
    sa.Index("ix_recipients_status", "status"),
    sa.Index("ix_recipients_address_lower", sa.func.lower(sa.text("address"))),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    sa.Column("recipient", sa.Text),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("details", _Json, nullable=False),
    sa.Index("ix_events_message_id", "message_id"),
    sa.Index("ix_events_type_at", "type", "at"),
)

LINK_CHUNK = 256  # links per link_chunks row: link ordinal n is urls[n % 256] of chunk n // 256

link_chunks = sa.Table(
    "link_chunks",
    metadata,
    sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("urls", sa.JSON, nullable=False),  # a JSON array of up to LINK_CHUNK URLs, in ordinal order
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


# -- write operations: each kind knows how to apply many of itself in one transaction


class _Op:
    def run(self, conn: Connection) -> Any:
        raise NotImplementedError

    @classmethod
    def run_many(cls, conn: Connection, ops: Sequence[_Op]) -> list[Any]:
        return [op.run(conn) for op in ops]


@dataclass(slots=True)
class _Refused:
    """An operation that ended with an expected error (NotFound, Conflict): its own savepoint
    was rolled back, the shared transaction goes on for everyone else."""

    error: RelayError


@dataclass(slots=True)
class _Call(_Op):
    """A one-off write: a function of the connection, in a savepoint of its own, so that an
    expected error undoes only this operation and never the group commit around it."""

    fn: Callable[[Connection], Any]

    def run(self, conn: Connection) -> Any:
        try:
            with conn.begin_nested():
                return self.fn(conn)
        except RelayError as exc:
            return _Refused(exc)


@dataclass(slots=True)
class _Enqueue(_Op):
    msg: NewMessage
    announce: bool = True  # the "received" event; bulk import brings its own events

    @classmethod
    def run_many(cls, conn: Connection, ops: Sequence[_Op]) -> list[Any]:
        msg_rows: list[dict[str, Any]] = []
        body_rows: list[dict[str, Any]] = []
        tag_rows: list[dict[str, Any]] = []
        rcpt_rows: list[dict[str, Any]] = []
        event_rows: list[dict[str, Any]] = []
        link_rows: list[dict[str, Any]] = []
        for op in ops:
            assert isinstance(op, _Enqueue)
            m = op.msg
            msg_rows.append(
                {
                    "id": m.queue_id,
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
            body_rows.append({"message_id": m.queue_id, "data": m.raw})
            link_rows.extend(
                {
                    "message_id": m.queue_id,
                    "chunk": start // LINK_CHUNK,
                    "urls": list(m.links[start : start + LINK_CHUNK]),
                }
                for start in range(0, len(m.links), LINK_CHUNK)
            )
            tag_rows.extend({"message_id": m.queue_id, "tag": t} for t in m.tags)
            rcpt_rows.extend(
                {
                    "message_id": m.queue_id,
                    "address": a,
                    "domain": a.rpartition("@")[2].lower(),
                    "status": QUEUED,
                    "attempts": 0,
                    "next_attempt_at": m.received_at,
                    "updated_at": m.received_at,
                }
                for a in m.recipients
            )
            if op.announce:
                received = {"message_id": m.queue_id, "recipient": None, "at": m.received_at, "type": "received"}
                event_rows.append({**received, "details": dict(m.details)})
        conn.execute(messages.insert(), msg_rows)
        conn.execute(bodies.insert(), body_rows)
        if tag_rows:
            conn.execute(message_tags.insert(), tag_rows)
        if link_rows:
            conn.execute(link_chunks.insert(), link_rows)
        conn.execute(recipients.insert(), rcpt_rows)
        if event_rows:
            conn.execute(events.insert(), event_rows)
        return [None] * len(ops)


_record_stmt = (
    recipients.update()
    .where(recipients.c.id == sa.bindparam("rid"), recipients.c.lease_owner == sa.bindparam("owner"))
    .values(
        status=sa.bindparam("status"),
        attempts=sa.bindparam("attempts"),
        next_attempt_at=sa.bindparam("next_at"),
        last_response=sa.bindparam("response"),
        lease_owner=None,
        updated_at=sa.bindparam("at"),
    )
)


# What a claim reads of a due recipient (the fields of model.Claimed, in order), and how it leases one.
_claim_columns = (
    recipients.c.id,
    recipients.c.message_id,
    recipients.c.address,
    recipients.c.domain,
    recipients.c.attempts,
    messages.c.mail_from,
    messages.c.received_at,
    messages.c.track,
    messages.c.size,
)
_lease_stmt = (
    recipients.update()
    .where(recipients.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(
        status=SENDING,
        lease_owner=sa.bindparam("owner"),
        next_attempt_at=sa.bindparam("until"),
        updated_at=sa.bindparam("at"),
    )
)


_import_stmt = (
    recipients.update()
    .where(recipients.c.id == sa.bindparam("rid"))
    .values(
        status=sa.bindparam("status"),
        attempts=sa.bindparam("attempts"),
        next_attempt_at=sa.bindparam("next_at"),
        last_response=sa.bindparam("response"),
        updated_at=sa.bindparam("at"),
    )
)


@dataclass(slots=True)
class _Record(_Op):
    owner: str
    outcomes: Sequence[Outcome]

    @classmethod
    def run_many(cls, conn: Connection, ops: Sequence[_Op]) -> list[Any]:
        updates, event_rows = [], []
        for op in ops:
            assert isinstance(op, _Record)
            for o in op.outcomes:
                updates.append(
                    {
                        "rid": o.recipient_id,
                        "owner": op.owner,
                        "status": o.status,
                        "attempts": o.attempts,
                        "next_at": o.next_attempt_at,
                        "response": o.last_response,
                        "at": o.at,
                    }
                )
                event_rows.append(
                    {
                        "message_id": o.queue_id,
                        "recipient": o.address,
                        "at": o.at,
                        "type": o.event,
                        "details": dict(o.details),
                    }
                )
        if updates:
            conn.execute(_record_stmt, updates)
            conn.execute(events.insert(), event_rows)
        return [None] * len(ops)


class _Engines:
    """Where SQL runs. SQLite: SQLAlchemy's sync engine in dedicated threads, one thread hop
    per transaction (a writer thread, and reader threads); this costs a quarter of the CPU of
    a hop per statement through aiosqlite. PostgreSQL: the asyncpg engine, with the same sync
    operations run through ``AsyncConnection.run_sync``."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._async: AsyncEngine | None = None
        self._write_sync: sa.Engine | None = None
        self._read_sync: sa.Engine | None = None
        self._write_thread: ThreadPoolExecutor | None = None
        self._read_threads: ThreadPoolExecutor | None = None
        self._write_lock: int | None = None
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                _private_sqlite_files(Path(database))
                # Writers in several processes (`serve --processes`, the CLI) queue on this lock:
                # the kernel hands it over at once, where SQLite's busy handler sleeps 1, 2, 5 ms...
                self._write_lock = os.open(f"{database}-writelock", os.O_CREAT | os.O_RDWR, 0o600)
            sync_url = parsed.set(drivername="sqlite+pysqlite")
            args = {"check_same_thread": False}
            self._write_sync = sa.create_engine(sync_url, pool_size=1, max_overflow=0, connect_args=args)
            self._read_sync = sa.create_engine(sync_url, pool_size=2, max_overflow=2, connect_args=args)
            _sqlite_setup(self._write_sync, begin="BEGIN IMMEDIATE")
            _sqlite_setup(self._read_sync, begin="BEGIN")
            self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="relay-store-write")
            self._read_threads = ThreadPoolExecutor(2, thread_name_prefix="relay-store-read")
        else:
            self._async = create_async_engine(url, pool_size=4, max_overflow=8, pool_pre_ping=True)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run fn in one write transaction; commit when it returns."""
        if self._async is not None:
            async with self._async.begin() as conn:
                return await conn.run_sync(fn)
        assert self._write_sync is not None
        engine, lock = self._write_sync, self._write_lock

        def transaction() -> T:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with engine.begin() as conn:
                    return fn(conn)
            finally:
                if lock is not None:
                    fcntl.flock(lock, fcntl.LOCK_UN)

        return await asyncio.get_running_loop().run_in_executor(self._write_thread, transaction)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run fn in a read-only snapshot."""
        if self._async is not None:
            async with self._async.connect() as conn:
                return await conn.run_sync(fn)
        assert self._read_sync is not None
        engine = self._read_sync

        def snapshot() -> T:
            with engine.connect() as conn:
                return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self._read_threads, snapshot)

    async def dispose(self) -> None:
        if self._async is not None:
            await self._async.dispose()
            return
        loop = asyncio.get_running_loop()
        for engine, pool in ((self._write_sync, self._write_thread), (self._read_sync, self._read_threads)):
            if engine is not None and pool is not None:
                await loop.run_in_executor(pool, engine.dispose)
                pool.shutdown(wait=True)
        if self._write_lock is not None:
            os.close(self._write_lock)
            self._write_lock = None


class _Writer:
    """One task that applies queued write operations in shared transactions."""

    max_batch: ClassVar[int] = 512

    def __init__(self, engines: _Engines) -> None:
        self._engines = engines
        self._pending: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def submit(self, op: _Op) -> Any:
        if self._closing:
            raise StoreError("the store is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="logstore-writer")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        self._wake.set()
        return await fut

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                await self._commit(batch)
            except BaseException as exc:  # cancelled mid-commit: nobody may wait forever
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(StoreError("the store is shutting down"))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.exception("writer failed")

    async def _commit(self, batch: list[tuple[_Op, asyncio.Future[Any]]]) -> None:
        ops = [op for op, _ in batch]

        def apply(conn: Connection) -> list[Any]:
            results: list[Any] = []
            for _, group in groupby(ops, key=type):
                same = list(group)
                results.extend(type(same[0]).run_many(conn, same))
            return results

        try:
            results = await self._engines.write(apply)
        except Exception as exc:
            if len(batch) > 1:
                log.warning("shared transaction of %d operations failed (%s); retrying each alone", len(batch), exc)
                for item in batch:
                    await self._commit([item])
                return
            fut = batch[0][1]
            if not fut.done():
                fut.set_exception(_map_error(exc))
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, _Refused):
                fut.set_exception(result.error)
            else:
                fut.set_result(result)


def _map_error(exc: Exception) -> Exception:
    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, SQLAlchemyError | OSError):
        err = StoreError(f"store operation failed: {type(exc).__name__}")
        err.__cause__ = exc
        return err
    return exc


# -- the store


@dataclass(slots=True)
class _BodyCache:
    """Bodies of recently accepted messages, so delivery rarely reads them back."""

    max_bytes: int = 16 * 1024 * 1024
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


def sqlite_file(url: str) -> Path | None:
    """The database file a SQLite URL names; None for PostgreSQL and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def display_url(url: str) -> str:
    """The URL to show in messages: any password masked."""
    return make_url(url).render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    """The driver's own words on one line (SQLAlchemy adds the statement and a link below)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    return one_line(exc)


class LogStore:
    """Named operations on the queue and the log. Create with ``await LogStore.open(url)``."""

    def __init__(self, url: str, engines: _Engines) -> None:
        self.url = url
        self._engines = engines
        self._writer = _Writer(engines)
        self._bodies = _BodyCache()
        self.is_postgres = engines.dialect == "postgresql"
        self.on_enqueued: list[Callable[[NewMessage], None]] = []

    @classmethod
    async def open(cls, url: str) -> LogStore:
        try:
            engines = _Engines(url)
        except (SQLAlchemyError, OSError, ValueError, ImportError) as exc:
            raise StoreError(f"cannot open the store: {exc}") from exc
        return cls(url, engines)

    async def close(self) -> None:
        await self._writer.close()
        await self._engines.dispose()

    async def _write(self, op: _Op) -> Any:
        return await self._writer.submit(op)

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        try:
            return await self._engines.read(fn)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"store read failed: {type(exc).__name__}") from exc

    # -- schema

    async def upgrade(self) -> None:
        """Bring the schema to the newest migration (``relay db upgrade``)."""
        from relay.migrations import upgrade_sync

        try:
            await self._engines.write(upgrade_sync)
        except OSError as exc:  # PostgreSQL unreachable
            raise StoreError(f"cannot open the store: {_reason(exc)}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"migration failed: {_reason(exc)}") from exc

    async def schema_state(self) -> SchemaState:
        """The schema against this code's migrations (see ``relay.migrations.schema_state``);
        a PostgreSQL database that does not exist is "missing". StoreError, with the reason on
        one line, when the store cannot be read at all."""
        from relay.migrations import schema_state

        try:
            return await self._engines.read(schema_state)
        except (SQLAlchemyError, OSError) as exc:
            if isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == "3D000":
                return "missing"  # invalid_catalog_name: no such database
            raise StoreError(f"cannot read the store at {display_url(self.url)}: {_reason(exc)}") from exc

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute(sa.text("SELECT 1")))

    # -- intake

    async def enqueue(self, msg: NewMessage) -> None:
        """Store the message, its body, tags, a queued row per recipient and a "received"
        event in one transaction. Returns once that transaction has committed."""
        await self._write(_Enqueue(msg))
        self._bodies.put(msg.queue_id, msg.raw)
        for callback in self.on_enqueued:
            callback(msg)

    # -- delivery

    async def claim_due(
        self,
        owner: str,
        *,
        lease: float,
        limit: int = 100,
        pick: Callable[[Sequence[Claimed]], Sequence[Claimed]] | None = None,
        skip_domains: Collection[str] = (),
        max_size: int | None = None,
        now: float | None = None,
    ) -> list[Claimed]:
        """Lease due recipients to ``owner`` until now + lease, oldest due first. A recipient
        whose lease has run out is due again.

        Up to ``limit`` due recipients (outside ``skip_domains``, of messages up to ``max_size``
        bytes) are candidates; ``pick``
        chooses which of them to lease (default: all), inside the claiming transaction, so that
        a worker leases only what it can start at once and nothing waits while its lease runs."""
        now = time.time() if now is None else now
        due = (
            sa.select(*_claim_columns)
            .join(messages, messages.c.id == recipients.c.message_id)
            .where(recipients.c.next_attempt_at <= now)
            .order_by(recipients.c.next_attempt_at)
            .limit(limit)
        )
        if skip_domains:
            due = due.where(recipients.c.domain.not_in(list(skip_domains)))
        if max_size is not None:
            due = due.where(messages.c.size <= max_size)
        if self.is_postgres:
            due = due.with_for_update(skip_locked=True, of=recipients)

        def claim(conn: Connection) -> list[Claimed]:
            candidates = [Claimed(*row) for row in conn.execute(due)]
            chosen = list(candidates if pick is None else pick(candidates))
            if chosen:
                conn.execute(
                    _lease_stmt,
                    {"ids": [c.recipient_id for c in chosen], "owner": owner, "until": now + lease, "at": now},
                )
            chosen.sort(key=lambda c: (c.queue_id, c.recipient_id))
            return chosen

        result: list[Claimed] = await self._write(_Call(claim))
        return result

    async def record(self, owner: str, outcomes: Sequence[Outcome]) -> None:
        """Write what attempts decided: the recipients' new states and one event each.
        Recipients no longer leased to ``owner`` keep their state; the events are kept."""
        await self._write(_Record(owner, outcomes))
        for o in outcomes:
            if o.next_attempt_at is None:  # a later attempt (a retry) reads the body back from the store
                self._bodies.drop(o.queue_id)

    async def release(self, owner: str, recipient_ids: Iterable[int], now: float | None = None) -> int:
        """Give leased recipients back untouched, due at once (graceful shutdown)."""
        ids = list(recipient_ids)
        if not ids:
            return 0
        now = time.time() if now is None else now

        def release(conn: Connection) -> int:
            stmt = (
                recipients.update()
                .where(recipients.c.id.in_(ids), recipients.c.lease_owner == owner, recipients.c.status == SENDING)
                .values(
                    status=sa.case((recipients.c.attempts == 0, QUEUED), else_=DEFERRED),
                    next_attempt_at=now,
                    lease_owner=None,
                    updated_at=now,
                )
            )
            return (conn.execute(stmt)).rowcount

        count: int = await self._write(_Call(release))
        return count

    async def load_bodies(self, message_ids: Iterable[str]) -> dict[str, bytes]:
        wanted = set(message_ids)
        found = {k: v for k in wanted if (v := self._bodies.get(k)) is not None}
        missing = wanted - found.keys()
        if missing:

            def load(conn: Connection) -> dict[str, bytes]:
                rows = conn.execute(
                    sa.select(bodies.c.message_id, bodies.c.data).where(bodies.c.message_id.in_(missing))
                )
                return {r.message_id: bytes(r.data) for r in rows}

            found.update(await self._read(load))
        return found

    async def anything_due(self, now: float | None = None) -> bool:
        """A cheap read: is any recipient due (or its lease run out)?"""
        now = time.time() if now is None else now

        def due(conn: Connection) -> bool:
            stmt = sa.select(recipients.c.id).where(recipients.c.next_attempt_at <= now).limit(1)
            return (conn.scalar(stmt)) is not None

        return await self._read(due)

    # -- queue control

    async def retry(
        self, message_id: str | None, *, by: str = "cli", reason: str = "", now: float | None = None
    ) -> int:
        """Make the message's recipients in RETRY_STATES due now (with no id: every message's
        recipients in RETRY_ALL_STATES, never old bounces); log a "retried" event for each.
        Raises NotFound for an unknown message id."""
        now = time.time() if now is None else now
        states = RETRY_ALL_STATES if message_id is None else RETRY_STATES

        def retry(conn: Connection) -> int:
            cond: list[sa.ColumnElement[bool]] = [recipients.c.status.in_(states)]
            if message_id is not None:
                _must_exist(conn, message_id)
                cond.append(recipients.c.message_id == message_id)
            rows = (
                conn.execute(
                    recipients.update()
                    .where(*cond)
                    .values(
                        status=sa.case((recipients.c.attempts == 0, QUEUED), else_=DEFERRED),
                        next_attempt_at=now,
                        updated_at=now,
                    )
                    .returning(recipients.c.message_id, recipients.c.address, recipients.c.status)
                )
            ).all()
            if rows:
                conn.execute(
                    events.insert(),
                    [
                        {"message_id": r.message_id, "recipient": r.address, "at": now, "type": "retried",
                         "details": {"by": by, "reason": reason}}
                        for r in rows
                    ],
                )  # fmt: skip
            return len(rows)

        count: int = await self._write(_Call(retry))
        return count

    async def cancel(self, message_id: str, *, by: str = "cli", reason: str = "", now: float | None = None) -> int:
        """Cancel the message's recipients that are not final yet; log "cancelled" for each.
        Their last_response stays the remote server's last reply: the cancellation is an event."""
        now = time.time() if now is None else now

        def cancel(conn: Connection) -> int:
            _must_exist(conn, message_id)
            rows = (
                conn.execute(
                    recipients.update()
                    .where(recipients.c.message_id == message_id, recipients.c.status.in_(ACTIVE_STATES))
                    .values(status=CANCELLED, next_attempt_at=None, lease_owner=None, updated_at=now)
                    .returning(recipients.c.address)
                )
            ).all()
            if rows:
                conn.execute(
                    events.insert(),
                    [{"message_id": message_id, "recipient": r.address, "at": now, "type": "cancelled",
                      "details": {"by": by, "reason": reason}} for r in rows],
                )  # fmt: skip
            return len(rows)

        count: int = await self._write(_Call(cancel))
        self._bodies.drop(message_id)
        return count

    async def queue_summary(self, *, active_only: bool = False) -> QueueSummary:
        """Recipients per state (only the queue's states when active_only: cheap at any size)
        and when the oldest message still in the queue arrived."""

        def summary(conn: Connection) -> QueueSummary:
            counts = dict.fromkeys(ACTIVE_STATES if active_only else (*ACTIVE_STATES, *FINAL_STATES), 0)
            by_status = sa.select(recipients.c.status, sa.func.count()).group_by(recipients.c.status)
            if active_only:
                by_status = by_status.where(recipients.c.status.in_(ACTIVE_STATES))
            for status, n in conn.execute(by_status):
                counts[status] = n
            oldest = conn.scalar(
                sa.select(sa.func.min(messages.c.received_at)).where(
                    messages.c.id.in_(
                        sa.select(recipients.c.message_id).where(recipients.c.next_attempt_at.is_not(None))
                    )
                )
            )
            return QueueSummary(counts, None if oldest is None else float(oldest))

        return await self._read(summary)

    async def queue_list(
        self, *, state: str | None = None, domain: str | None = None, limit: int = 1000
    ) -> list[QueueEntry]:
        """Active recipients (queued, deferred, sending), oldest message first, optionally only
        one state or one recipient domain: what ``relay queue list`` prints."""
        if state is not None and state not in ACTIVE_STATES:
            raise ValueError(f"{state!r} is not a queue state")
        stmt = _queue_list if domain is None else _queue_list_domain
        params = {"states": [state] if state else list(ACTIVE_STATES), "domain": (domain or "").lower(), "limit": limit}

        def find(conn: Connection) -> list[QueueEntry]:
            return [
                QueueEntry(r.message_id, float(r.received_at), r.address, r.status, r.attempts,
                           None if r.next_attempt_at is None else float(r.next_attempt_at), r.last_response)
                for r in conn.execute(stmt, params)
            ]  # fmt: skip

        return await self._read(find)

    # -- tracking

    async def tracking_target(self, recipient_id: int, ordinal: int | None) -> TrackTarget | None:
        """The recipient a token names (and the link, for clicks); None when either is unknown."""

        def find(conn: Connection) -> TrackTarget | None:
            r = conn.execute(
                sa.select(recipients.c.message_id, recipients.c.address, recipients.c.status, recipients.c.updated_at)
                .where(recipients.c.id == recipient_id)
            ).first()  # fmt: skip
            if r is None:
                return None
            url = None
            if ordinal is not None:
                if ordinal < 0:
                    return None
                chunk, index = divmod(ordinal, LINK_CHUNK)
                urls = conn.scalar(_link_chunk, {"message_id": r.message_id, "chunk": chunk})
                url = urls[index] if urls is not None and index < len(urls) else None
                if url is None:
                    return None
            delivered_at = float(r.updated_at) if r.status == "delivered" else None
            return TrackTarget(r.message_id, r.address, delivered_at, url)

        return await self._read(find)

    async def record_engagement(
        self, message_id: str, address: str, kind: EventType, details: dict[str, Any], *, window: float = 0.0
    ) -> bool | None:
        """Append an opened/clicked event, unless one with the same ``ip``, ``user_agent`` and
        ``url`` details was logged for this recipient less than ``window`` seconds ago: then
        None (coalesced). Else True when it is the recipient's first human (``machine`` false)
        event of its kind, which the event records as ``first``; machine hits are never first."""
        at = time.time()
        same = tuple(details.get(key) for key in ("ip", "user_agent", "url"))
        human = not details.get("machine")
        lock_key = int.from_bytes(
            hashlib.blake2b(f"{message_id}\0{address}".encode(), digest_size=8).digest(), "big", signed=True
        )

        def record(conn: Connection) -> bool | None:
            if conn.dialect.name == "postgresql":
                # Hits of one recipient serialize across processes and nodes until commit, so two
                # at once cannot both be first, nor both miss the other as a repeat. (SQLite
                # write transactions are serial already.)
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_key)))
            params = {"message_id": message_id, "recipient": address, "type": kind}
            # Only the last `window` seconds, and one row for `first`: a flood of distinct
            # clients must not make each hit read every hit before it.
            for (recent,) in conn.execute(_recent_engagements, {**params, "since": at - window}):
                if tuple(recent.get(key) for key in ("ip", "user_agent", "url")) == same:
                    return None
            first = human and conn.scalar(_first_engagement, params) is None
            conn.execute(
                events.insert().values(
                    message_id=message_id, recipient=address, at=at, type=kind, details={**details, "first": first}
                )
            )
            return first

        first: bool | None = await self._write(_Call(record))
        return first

    # -- bulk import

    async def bulk_import(self, items: Sequence[Imported]) -> None:
        """Write messages with their recipients' states and events as given, in one
        transaction and a handful of statements: for migrations and benchmark seeding."""

        def load(conn: Connection) -> None:
            _Enqueue.run_many(conn, [_Enqueue(i.message, announce=False) for i in items])
            by_id = {i.message.queue_id: i for i in items}
            ids = list(by_id)
            rows = conn.execute(
                sa.select(recipients.c.id, recipients.c.message_id).where(recipients.c.message_id.in_(ids))
            ).all()
            updates = [
                {"rid": r.id, "status": i.status, "attempts": i.attempts, "next_at": i.next_attempt_at,
                 "response": i.last_response, "at": i.message.received_at}
                for r in rows
                if (i := by_id[r.message_id])
            ]  # fmt: skip
            if updates:
                conn.execute(_import_stmt, updates)
            event_rows = [
                {"message_id": i.message.queue_id, "recipient": ev.recipient, "at": ev.at, "type": ev.type,
                 "details": dict(ev.details)}
                for i in items
                for ev in i.events
            ]  # fmt: skip
            if event_rows:
                conn.execute(events.insert(), event_rows)

        await self._engines.write(load)

    # -- reporting

    async def stats(self, since: float, until: float, group_by: str) -> list[StatsRow]:
        """Per tag, recipient domain or user: what happened between since and until."""
        if group_by not in ("tag", "domain", "user"):
            raise ValueError(f"cannot group by {group_by!r}")

        def report(conn: Connection) -> list[StatsRow]:
            return _stats(conn, since, until, group_by)

        return await self._read(report)

    # -- lookups

    async def lookup(self, query: str, limit: int = 20) -> list[MessageView]:
        """Messages matching a queue id, a Message-ID (with or without <>) or a recipient
        address, newest first."""
        query = query.strip()
        bare = query.removeprefix("<").removesuffix(">").strip()
        params = {"id": query.upper(), "mid": bare, "rcpt": bare.lower(), "limit": limit}
        by_id = _QUEUE_ID.fullmatch(query) is not None
        search = _by_message_id if query.startswith("<") else _by_message_id_or_recipient

        def find(conn: Connection) -> list[MessageView]:
            ids = [r[0] for r in conn.execute(_by_queue_id, params)] if by_id else []
            if not ids:
                ids = [r[0] for r in conn.execute(search, params)]
            return _views(conn, ids)

        return await self._read(find)

    async def search(
        self,
        *,
        queue_id: str | None = None,
        message_id: str | None = None,
        recipient: str | None = None,
        tag: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 20,
        after: tuple[float, str] | None = None,
    ) -> tuple[list[MessageView], tuple[float, str] | None]:
        """Messages matching every filter given, newest first, a page at a time: pass the
        returned (received_at, id) as ``after`` for the next page (None: no more)."""
        m = messages
        conds: list[sa.ColumnElement[bool]] = []
        if queue_id is not None:
            conds.append(m.c.id == queue_id.upper())
        if message_id is not None:
            conds.append(m.c.message_id == message_id.strip().removeprefix("<").removesuffix(">").strip())
        if recipient is not None:
            rcpt = sa.select(recipients.c.message_id).where(sa.func.lower(recipients.c.address) == recipient.lower())
            conds.append(m.c.id.in_(rcpt))
        if status is not None:
            conds.append(m.c.id.in_(sa.select(recipients.c.message_id).where(recipients.c.status == status)))
        if tag is not None:
            conds.append(m.c.id.in_(sa.select(message_tags.c.message_id).where(message_tags.c.tag == tag)))
        if since is not None:
            conds.append(m.c.received_at >= since)
        if until is not None:
            conds.append(m.c.received_at < until)
        if after is not None:
            at, last = after
            conds.append(sa.or_(m.c.received_at < at, sa.and_(m.c.received_at == at, m.c.id < last)))
        query = (
            sa.select(m.c.id, m.c.received_at)
            .where(*conds)
            .order_by(m.c.received_at.desc(), m.c.id.desc())
            .limit(limit + 1)
        )

        def find(conn: Connection) -> tuple[list[MessageView], tuple[float, str] | None]:
            rows = conn.execute(query).all()
            page = rows[:limit]
            more = (float(page[-1].received_at), str(page[-1].id)) if len(rows) > limit else None
            return _views(conn, [r.id for r in page]), more

        return await self._read(find)

    async def get_message(self, queue_id: str) -> MessageView | None:
        views = await self._read(lambda conn: _views(conn, [queue_id]))
        return views[0] if views else None

    # -- users

    async def add_user(self, name: str, password_hash: str) -> None:
        def add(conn: Connection) -> None:
            if conn.scalar(sa.select(users.c.name).where(users.c.name == name)) is not None:
                raise Conflict(f"user {name!r} exists already")
            conn.execute(users.insert().values(name=name, password_hash=password_hash, created_at=time.time()))

        await self._write(_Call(add))

    async def remove_user(self, name: str) -> None:
        def remove(conn: Connection) -> None:
            if (conn.execute(users.delete().where(users.c.name == name))).rowcount == 0:
                raise NotFound(f"no user {name!r}")

        await self._write(_Call(remove))

    async def list_users(self) -> list[tuple[str, float]]:
        def names(conn: Connection) -> list[tuple[str, float]]:
            rows = conn.execute(sa.select(users.c.name, users.c.created_at).order_by(users.c.name))
            return [(r.name, float(r.created_at)) for r in rows]

        return await self._read(names)

    async def password_hash(self, name: str) -> str | None:
        def get(conn: Connection) -> str | None:
            value = conn.scalar(sa.select(users.c.password_hash).where(users.c.name == name))
            return None if value is None else str(value)

        return await self._read(get)


def _must_exist(conn: Connection, message_id: str) -> None:
    if conn.scalar(sa.select(messages.c.id).where(messages.c.id == message_id)) is None:
        raise NotFound(f"no message {message_id}")


# The queue as `relay queue list` shows it: one row per active recipient, oldest message first.
_queue_list = (
    sa.select(
        recipients.c.message_id,
        messages.c.received_at,
        recipients.c.address,
        recipients.c.status,
        recipients.c.attempts,
        recipients.c.next_attempt_at,
        recipients.c.last_response,
    )
    .join(messages, messages.c.id == recipients.c.message_id)
    .where(recipients.c.status.in_(sa.bindparam("states", expanding=True)))
    .order_by(messages.c.received_at, recipients.c.message_id, recipients.c.id)
    .limit(sa.bindparam("limit"))
)
_queue_list_domain = _queue_list.where(recipients.c.domain == sa.bindparam("domain"))

# Tracking hits of one recipient and kind: those of the last seconds (repeats), and its first.
_engagement_of = (
    events.c.message_id == sa.bindparam("message_id"),
    events.c.recipient == sa.bindparam("recipient"),
    events.c.type == sa.bindparam("type"),
)
_recent_engagements = sa.select(events.c.details).where(*_engagement_of, events.c.at > sa.bindparam("since"))
_first_engagement = (
    sa.select(events.c.id)
    .where(
        *_engagement_of,
        events.c.details["first"].as_boolean().is_(True),
        # an older Relay marked machine hits first too
        sa.not_(events.c.details["machine"].as_boolean().is_(True)),
    )
    .limit(1)
)

# A click's link: the one chunk of the message's URLs that holds it (see LINK_CHUNK).
_link_chunk = sa.select(link_chunks.c.urls).where(
    link_chunks.c.message_id == sa.bindparam("message_id"), link_chunks.c.chunk == sa.bindparam("chunk")
)


# Lookups, built once (support's hot path; the statement cache then only binds values).
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,32}")  # what a queue id can look like (ULIDs are 26)
_by_queue_id = sa.select(messages.c.id).where(messages.c.id == sa.bindparam("id"))
_mid_match = sa.select(messages.c.id, messages.c.received_at).where(messages.c.message_id == sa.bindparam("mid"))
_rcpt_match = (
    sa.select(messages.c.id, messages.c.received_at)
    .join(recipients, recipients.c.message_id == messages.c.id)
    .where(sa.func.lower(recipients.c.address) == sa.bindparam("rcpt"))
)
_by_message_id = _mid_match.order_by(messages.c.received_at.desc()).limit(sa.bindparam("limit"))
_either = sa.union(_mid_match, _rcpt_match).subquery()
_by_message_id_or_recipient = (
    sa.select(_either.c.id).order_by(_either.c.received_at.desc()).limit(sa.bindparam("limit"))
)
_view_messages = sa.select(messages).where(messages.c.id.in_(sa.bindparam("ids", expanding=True)))
_view_recipients = (
    sa.select(recipients)
    .where(recipients.c.message_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(recipients.c.id)
)
_view_events = (
    sa.select(events)
    .where(events.c.message_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(events.c.at, events.c.id)
)


def _views(conn: Connection, ids: Sequence[str]) -> list[MessageView]:
    if not ids:
        return []
    params = {"ids": list(ids)}
    msgs = {r.id: r for r in conn.execute(_view_messages, params)}
    rcpts: dict[str, list[RecipientView]] = {}
    for r in conn.execute(_view_recipients, params):
        rcpts.setdefault(r.message_id, []).append(
            RecipientView(r.address, r.status, r.attempts, r.next_attempt_at, r.last_response)
        )
    evs: dict[str, list[EventView]] = {}
    for e in conn.execute(_view_events, params):
        details = e.details if isinstance(e.details, dict) else json.loads(e.details)
        evs.setdefault(e.message_id, []).append(EventView(e.at, e.type, e.recipient, details))
    return [
        MessageView(
            queue_id=m.id,
            message_id=m.message_id,
            mail_from=m.mail_from,
            subject=m.subject,
            size=m.size,
            tags=tuple(m.tags or ()),
            user=m.username,
            client_ip=m.client_ip,
            received_at=m.received_at,
            recipients=tuple(rcpts.get(m.id, ())),
            events=tuple(evs.get(m.id, ())),
        )
        for i in ids
        if (m := msgs.get(i)) is not None
    ]


_OUTCOME_EVENTS = ("delivered", "bounced", "expired")


def _stats(conn: Connection, since: float, until: float, group_by: str) -> list[StatsRow]:
    m, r, e, t = messages, recipients, events, message_tags
    window_events = e.c.at.between(since, until)
    if group_by == "domain":
        group = r.c.domain
        received = sa.select(group, sa.func.count()).select_from(r.join(m, m.c.id == r.c.message_id))
        received = received.where(m.c.received_at.between(since, until))
        by_event = e.join(r, (r.c.message_id == e.c.message_id) & (r.c.address == e.c.recipient))
        with_message = by_event.join(m, m.c.id == e.c.message_id)
    else:
        group = t.c.tag if group_by == "tag" else m.c.username
        base = m.outerjoin(t, t.c.message_id == m.c.id) if group_by == "tag" else m
        received = sa.select(group, sa.func.count()).select_from(base).where(m.c.received_at.between(since, until))
        with_message = e.join(base, m.c.id == e.c.message_id)
        by_event = with_message

    rows: dict[str | None, dict[str, Any]] = {}

    def row(key: str | None) -> dict[str, Any]:
        return rows.setdefault(key, {"received": 0, "latencies": [], "opened": [0, 0], "clicked": [0, 0],
                                     "deferred": 0, "deferrals": 0, **dict.fromkeys(_OUTCOME_EVENTS, 0)})  # fmt: skip

    for key, n in conn.execute(received.group_by(group)):
        row(key)["received"] = n
    who = e.c.message_id + "/" + sa.func.coalesce(e.c.recipient, "")
    # Recipients, not attempts: each recipient counts once, by its latest outcome in the window
    # (bounced, retried, bounced again: one bounce; bounced, retried, delivered: one delivery).
    latest = sa.select(sa.func.max(e.c.id)).where(window_events, e.c.type.in_(_OUTCOME_EVENTS))
    latest = latest.group_by(e.c.message_id, e.c.recipient)
    counted = sa.select(group, e.c.type, sa.func.count()).select_from(by_event)
    for key, kind, n in conn.execute(counted.where(e.c.id.in_(latest)).group_by(group, e.c.type)):
        row(key)[kind] = n
    deferred = sa.select(group, sa.func.count(sa.distinct(who)), sa.func.count()).select_from(by_event)
    for key, recipients_deferred, attempts in conn.execute(
        deferred.where(window_events, e.c.type == "deferred").group_by(group)
    ):
        row(key).update(deferred=recipients_deferred, deferrals=attempts)
    machine = e.c.details["machine"].as_boolean()
    engaged = sa.select(group, e.c.type, sa.func.coalesce(machine, sa.false()), sa.func.count(sa.distinct(who)))
    engaged = engaged.select_from(by_event).where(window_events, e.c.type.in_(("opened", "clicked")))
    engaged = engaged.group_by(group, e.c.type, sa.func.coalesce(machine, sa.false()))
    for key, kind, is_machine, n in conn.execute(engaged):
        row(key)[kind][1 if is_machine else 0] += n
    waits = sa.select(group, e.c.at - m.c.received_at).select_from(with_message)
    for key, seconds in conn.execute(waits.where(window_events, e.c.type == "delivered")):
        row(key)["latencies"].append(float(seconds))
    out = []
    for key, v in sorted(rows.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        lat = sorted(v["latencies"])
        out.append(
            StatsRow(
                group=key, received=v["received"], delivered=v["delivered"], deferred=v["deferred"],
                bounced=v["bounced"], expired=v["expired"], deferrals=v["deferrals"], unique_opens=v["opened"][0],
                unique_opens_machine=v["opened"][1], unique_clicks=v["clicked"][0],
                unique_clicks_machine=v["clicked"][1], latency_p50=_percentile(lat, 0.50),
                latency_p95=_percentile(lat, 0.95),
            )
        )  # fmt: skip
    return out


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 3)


def _private_sqlite_files(path: Path) -> None:
    """The database holds message bodies and password hashes: its directory 0700 when made
    here, the file and its -wal and -shm 0600. SQLite gives -wal and -shm the database file's
    mode, so creating that one 0600 (before SQLite does) is enough for new stores."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a store made by an older Relay
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            extra.chmod(0o600)


def _sqlite_setup(engine: sa.Engine, *, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=10000", "foreign_keys=ON"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)
