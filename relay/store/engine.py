"""Where SQL runs: the engines, the writer task with group commit, and the one error mapping.

SQLite (WAL, synchronous=FULL): writes run in a dedicated writer thread on SQLAlchemy's sync
engine, one thread hop per transaction, behind an flock that the processes sharing the file
queue on; reads run in reader threads, also one hop per read (a hop per statement through
aiosqlite made a lookup 3-4 times slower: bench/store_reads.py). PostgreSQL: the asyncpg engine, the
same functions of a connection run through ``AsyncConnection.run_sync``.

Writes go through one writer task per process. Operations that arrive while a commit is in
progress are applied together in the next transaction (group commit), each kind as one
executemany; every caller still waits for the commit that holds its own operation. When a
shared transaction fails, its operations are retried one by one so that only the bad one fails;
when it failed because the connection was lost, the batch is tried once more together instead.

SQLAlchemy and OS errors become ``StoreError`` in ``store_error`` and nowhere else; expected
``RelayError``s (NotFound, Conflict) pass through. A lost database (refused, cut, restarting)
is ``StoreUnavailable``: the engine logs one warning when it is lost and one line when it is
back, whatever the number of operations that failed between.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import ClassVar, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from relay.errors import RelayError, StoreError, StoreUnavailable, one_line

log = logging.getLogger(__name__)

T = TypeVar("T")


# -- the one error mapping


@dataclass(frozen=True, slots=True)
class Failure:
    """How a failed store operation reads: ``doing``, then the driver's own words (``reason``)
    or only the exception's type; ``unreachable`` replaces ``doing`` when the server cannot be
    reached at all (an OSError: PostgreSQL down)."""

    doing: str
    reason: bool = False
    unreachable: str | None = None


WRITE_FAILED = Failure("store operation failed")
READ_FAILED = Failure("store read failed")


def store_error(exc: BaseException, failure: Failure) -> BaseException:
    """What a caller of the store sees for ``exc``: expected RelayErrors as they are, SQLAlchemy
    and OS errors as StoreError (the original as its __cause__; StoreUnavailable when the
    database is out of reach), anything else untouched."""
    if isinstance(exc, RelayError) or not isinstance(exc, SQLAlchemyError | OSError):
        return exc
    doing = failure.unreachable if isinstance(exc, OSError) and failure.unreachable else failure.doing
    kind = StoreUnavailable if unavailable(exc) else StoreError
    err = kind(f"{doing}: {reason(exc) if failure.reason or kind is StoreUnavailable else type(exc).__name__}")
    err.__cause__ = exc
    return err


# SQLSTATE classes of a lost server: 08 connection exception (08003 when asyncpg finds its
# connection gone), 57P01-57P03 admin/crash shutdown and "the database system is starting up".
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database is out of reach rather than that the operation was
    wrong: refused or reset sockets, a connection SQLAlchemy found dead, a server shutting down
    or starting up. Another try later will do."""
    if isinstance(exc, OSError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        return isinstance(exc.orig, OSError)
    return False


class Availability:
    """Whether the database answered last time: one warning when it is lost, one line when it
    is back (not one per failed operation)."""

    def __init__(self) -> None:
        self.lost_at: float | None = None
        self.failed = 0  # operations that failed while it was lost
        self.reached = False  # never reached yet: a failed start says so itself, nothing was lost
        # Wall-clock time since when the database has answered without a loss (None: never yet).
        # The node registry judges others dead only for silences it could have seen them break.
        self.since: float | None = None

    def saw(self, err: BaseException) -> None:
        if not isinstance(err, StoreUnavailable) or not self.reached:
            return
        self.failed += 1
        if self.lost_at is None:
            self.lost_at = time.monotonic()
            log.warning(
                "the database cannot be reached (%s); intake answers 451 4.3.0 (the API 503) and delivery "
                "waits until it is back",
                err,
            )

    def ok(self) -> None:
        if not self.reached or self.lost_at is not None:
            self.since = time.time()
        self.reached = True
        if self.lost_at is not None:
            log.info(
                "the database is back after %.1fs (%d operations failed meanwhile); intake and delivery resume",
                time.monotonic() - self.lost_at,
                self.failed,
            )
            self.lost_at = None
            self.failed = 0


def reason(exc: BaseException) -> str:
    """The driver's own words on one line (SQLAlchemy adds the statement and a link below)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    return one_line(exc)


# -- write operations: each kind knows how to apply many of itself in one transaction


class Op:
    """A write operation for the writer. Kinds that batch well override ``run_many`` (one
    executemany per kind and group commit)."""

    def run(self, conn: Connection) -> object:
        raise NotImplementedError

    @classmethod
    def run_many(cls, conn: Connection, ops: Sequence[Op]) -> list[object]:
        return [op.run(conn) for op in ops]


@dataclass(slots=True)
class _Refused:
    """An operation that ended with an expected error (NotFound, Conflict): its own savepoint
    was rolled back, the shared transaction goes on for everyone else."""

    error: RelayError


@dataclass(slots=True)
class _Call(Op):
    """A one-off write: a function of the connection, in a savepoint of its own, so that an
    expected error undoes only this operation and never the group commit around it."""

    fn: Callable[[Connection], object]

    def run(self, conn: Connection) -> object:
        try:
            with conn.begin_nested():
                return self.fn(conn)
        except RelayError as exc:
            return _Refused(exc)


# -- the engines


class Engine:
    """The store's engines and its writer. ``read``, ``call``, ``submit`` and ``transaction``
    are the only ways in; every one maps errors through ``store_error``."""

    def __init__(self, url: str, *, options: Mapping[str, object] | None = None) -> None:
        """``options``: execution options every connection carries (the webhook outbox)."""
        parsed = make_url(url)
        opts = dict(options or {})
        self.dialect = parsed.get_backend_name()
        self._write_sync: sa.Engine | None = None
        self._write_thread: ThreadPoolExecutor | None = None
        self._write_lock: int | None = None
        self._sqlite_file: str | None = None  # the database file, for the locks of ``exclusive``
        self._read_sync: sa.Engine | None = None
        self._read_threads: ThreadPoolExecutor | None = None
        self._async: AsyncEngine | None = None
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                _private_sqlite_files(Path(database))
                # Writers in several processes (`serve --processes`, the CLI) queue on this lock:
                # the kernel hands it over at once, where SQLite's busy handler sleeps 1, 2, 5 ms...
                self._write_lock = os.open(f"{database}-writelock", os.O_CREAT | os.O_RDWR, 0o600)
                self._sqlite_file = database
            sync_url = parsed.set(drivername="sqlite+pysqlite")
            args = {"check_same_thread": False}
            self._write_sync = sa.create_engine(
                sync_url, pool_size=1, max_overflow=0, connect_args=args, execution_options=opts
            )
            _sqlite_setup(self._write_sync, begin="BEGIN IMMEDIATE")
            self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="relay-store-write")
            # Readers in threads too, one hop per read: through aiosqlite (a hop per statement)
            # lookups took 3-4 times as long (bench/store_reads.py).
            self._read_sync = sa.create_engine(
                sync_url, pool_size=2, max_overflow=2, connect_args=args, execution_options=opts
            )
            _sqlite_setup(self._read_sync, begin="BEGIN")
            self._read_threads = ThreadPoolExecutor(2, thread_name_prefix="relay-store-read")
        else:
            self._async = create_async_engine(
                url, pool_size=4, max_overflow=8, pool_pre_ping=True, execution_options=opts
            )
        self.availability = Availability()
        self._writer = _Writer(self)
        # Called in the event loop after every committed write transaction (the outbox's signal).
        self.committed: list[Callable[[], None]] = []

    async def transaction(self, fn: Callable[[Connection], T], failure: Failure = WRITE_FAILED) -> T:
        """Run fn in one write transaction of its own, outside the writer's batches (bulk
        import, migrations); commit when it returns."""
        try:
            result = await self._transaction(fn)
        except Exception as exc:
            err = store_error(exc, failure)
            self.availability.saw(err)
            if err is exc:
                raise
            raise err from exc
        self.availability.ok()
        return result

    async def read(self, fn: Callable[[Connection], T], failure: Failure = READ_FAILED) -> T:
        """Run fn in a read-only snapshot."""
        try:
            result = await self._read(fn)
        except Exception as exc:
            err = store_error(exc, failure)
            self.availability.saw(err)
            if err is exc:
                raise
            raise err from exc
        self.availability.ok()
        return result

    async def call(self, fn: Callable[[Connection], T]) -> T:
        """Run fn as a one-off write in its own savepoint of the writer's next shared transaction."""
        return cast("T", await self._writer.submit(_Call(fn)))

    async def submit(self, op: Op) -> object:
        """Apply a batched write operation in the writer's next shared transaction."""
        return await self._writer.submit(op)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """A lock named ``name`` held by one process of every node on the store while the block
        runs: True, or False at once when another holds it (retention's purge). PostgreSQL: a
        session advisory lock on a connection of its own, no transaction left open (freed with
        the connection if the process dies); SQLite: an flock on ``<database>-<name>lock``."""
        if self._async is not None:
            key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
            async with self._async.connect() as conn:
                got = bool(await conn.scalar(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}))
                await conn.commit()
                try:
                    yield got
                finally:
                    if got:
                        try:
                            await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                            await conn.commit()
                        except Exception:  # the connection is gone, and the lock with it
                            await conn.invalidate()
            return
        if self._sqlite_file is None:  # in memory: this process is the only one
            yield True
            return
        fd = os.open(f"{self._sqlite_file}-{name}lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing frees the flock

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        if self._async is not None:
            async with self._async.connect() as conn:
                return await conn.run_sync(fn)
        engine = self._read_sync
        if engine is None:
            raise StoreError("the store is closed")

        def snapshot() -> T:
            with engine.connect() as conn:
                return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self._read_threads, snapshot)

    async def _transaction(self, fn: Callable[[Connection], T]) -> T:
        if self._async is not None:
            async with self._async.begin() as conn:
                result = await conn.run_sync(fn)
            self._after_commit()
            return result
        if self._write_sync is None:
            raise StoreError("the store is closed")
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

        result = await asyncio.get_running_loop().run_in_executor(self._write_thread, transaction)
        self._after_commit()
        return result

    def _after_commit(self) -> None:
        for hook in self.committed:
            hook()

    async def dispose(self) -> None:
        await self._writer.close()
        if self._async is not None:
            await self._async.dispose()
        loop = asyncio.get_running_loop()
        for engine, pool in ((self._write_sync, self._write_thread), (self._read_sync, self._read_threads)):
            if engine is not None and pool is not None:
                await loop.run_in_executor(pool, engine.dispose)
                pool.shutdown(wait=True)
        self._write_sync = self._read_sync = None  # closed: a second close has nothing to do
        if self._write_lock is not None:
            os.close(self._write_lock)
            self._write_lock = None


class _Writer:
    """One task that applies queued write operations in shared transactions."""

    max_batch: ClassVar[int] = 512

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pending: list[tuple[Op, asyncio.Future[object]]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def submit(self, op: Op) -> object:
        if self._closing:
            raise StoreError("the store is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="logstore-writer")
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
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

    async def _commit(self, batch: list[tuple[Op, asyncio.Future[object]]], *, retry: bool = True) -> None:
        ops = [op for op, _ in batch]

        def apply(conn: Connection) -> list[object]:
            results: list[object] = []
            for _, group in groupby(ops, key=type):
                same = list(group)
                results.extend(type(same[0]).run_many(conn, same))
            return results

        availability = self._engine.availability
        try:
            results = await self._engine._transaction(apply)
        except Exception as exc:
            err = store_error(exc, WRITE_FAILED)
            if isinstance(err, StoreUnavailable):
                # No operation is at fault: retrying each alone would only wait on the lost
                # server once per operation. Once more together (the pool replaces a cut
                # connection), then every caller hears it.
                if retry:
                    await self._commit(batch, retry=False)
                    return
                availability.saw(err)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(store_error(exc, WRITE_FAILED))  # one each: raised in every caller
                return
            if len(batch) > 1:
                log.warning("shared transaction of %d operations failed (%s); retrying each alone", len(batch), exc)
                for item in batch:
                    await self._commit([item])
                return
            fut = batch[0][1]
            if not fut.done():
                fut.set_exception(err)
            return
        availability.ok()
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, _Refused):
                fut.set_exception(result.error)
            else:
                fut.set_result(result)


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
    def _on_connect(dbapi_conn: object, _record: object) -> None:
        dbapi_conn.isolation_level = None  # type: ignore[attr-defined]  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=10000", "foreign_keys=ON"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)
