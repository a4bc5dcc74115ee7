"""The log store's face: the queue and the append-only event log, behind typed, named operations.

Every caller uses ``LogStore``; how it is done (schema, engines and the writer with group
commit, statements, migrations) lives in ``relay.store``. Only relay.store and this module
import sqlalchemy/alembic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from relay.config import DeliveryConfig, RetentionConfig, WebhookConfig
from relay.errors import StoreError
from relay.model import (
    ACTIVE_STATES,
    AuditEntry,
    CaseEntry,
    CaseState,
    CaseView,
    Claimed,
    Dashboard,
    EntryKind,
    EventType,
    Imported,
    MessageView,
    NewMessage,
    NewReport,
    Node,
    Outcome,
    QueueEntry,
    QueueSummary,
    ReportDecision,
    ReportTarget,
    RetentionCount,
    Role,
    SearchPage,
    StatsRow,
    Suppression,
    SuppressionChange,
    SuppressionOrigin,
    SuppressionReason,
    TrackTarget,
    User,
    suppression_key,
)
from relay.store import actions, chain, queue, reports, retention, suppressions, users
from relay.store import audit as audit_store
from relay.store import cases as case_store
from relay.store import copy as store_copy
from relay.store import log as event_log
from relay.store import nodes as node_store
from relay.store import sessions as console_sessions
from relay.store import statements as q
from relay.store import webhooks as webhook_store
from relay.store.chain import ChainReport
from relay.store.engine import Engine, Failure
from relay.store.queue import IdempotencyKey, Idempotent
from relay.store.wakeups import Wakeups

if TYPE_CHECKING:
    from relay.store.migrations import SchemaState

# IdempotencyKey and Idempotent are relay.store's, re-exported for the send API.
__all__ = ["IdempotencyKey", "Idempotent", "LogStore", "display_url", "sqlite_file"]

log = logging.getLogger(__name__)
SMTP_ROLES: tuple[Role, ...] = ("smtp",)


def sqlite_file(url: str) -> Path | None:
    """The database file a SQLite URL names; None for PostgreSQL and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def display_url(url: str) -> str:
    """The URL to show in messages: any password masked."""
    return make_url(url).render_as_string(hide_password=True)


class LogStore:
    """Named operations on the queue and the log. Create with ``await LogStore.open(url)``."""

    def __init__(self, url: str, engine: Engine, hold: actions.Hold = actions.NO_HOLD) -> None:
        self._display_url = display_url(url)
        self._url = url
        self._engine = engine
        self._bodies = queue.BodyCache()
        self._hold = hold  # hold mode: which new messages are stored "held"
        self._outbox: webhook_store.Outbox | None = None  # set by ``open`` when webhooks are configured
        # Called after each enqueue has committed (delivery's wake-up); one that raises is logged.
        self.on_enqueued: list[Callable[[NewMessage], None]] = []
        # Called after a retry or a release made recipients due (delivery's wake-up, as above).
        self.on_due: list[Callable[[], None]] = []

    @classmethod
    async def open(
        cls, url: str, *, webhooks: Sequence[WebhookConfig] = (), delivery: DeliveryConfig | None = None
    ) -> LogStore:
        """``webhooks``: the [[webhooks]] endpoints, whose outbox rows every event then writes
        in its own transaction (none: no outbox rows at all). ``delivery``: its ``hold`` and
        ``hold_users`` (hold mode) decide which new messages are stored "held"."""
        outbox = _outbox(webhooks)
        try:
            engine = Engine(url, options=None if outbox is None else {webhook_store.OUTBOX: outbox})
        except (SQLAlchemyError, OSError, ValueError, ImportError) as exc:
            raise StoreError(f"cannot open the store: {exc}") from exc
        hold = actions.NO_HOLD if delivery is None else actions.Hold(delivery.hold, frozenset(delivery.hold_users))
        store = cls(url, engine, hold)
        if outbox is not None:
            engine.committed.append(outbox.written.after_commit)
            store._outbox = outbox
        return store

    async def close(self) -> None:
        await self._engine.dispose()

    # -- schema

    async def upgrade(self) -> None:
        """Bring the schema to the newest migration (``relay db upgrade``)."""
        from relay.store.migrations import upgrade_sync

        failure = Failure("migration failed", reason=True, unreachable="cannot open the store")
        await self._engine.transaction(upgrade_sync, failure)

    async def schema_state(self) -> SchemaState:
        """The schema against this code's migrations (see ``relay.store.migrations.schema_state``);
        a PostgreSQL database that does not exist is "missing". StoreError, with the reason on
        one line, when the store cannot be read at all."""
        from relay.store.migrations import schema_state

        doing = f"cannot read the store at {self._display_url}"
        try:
            return await self._engine.read(schema_state, Failure(doing, reason=True, unreachable=doing))
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, DBAPIError) and getattr(cause.orig, "sqlstate", None) == "3D000":
                return "missing"  # invalid_catalog_name: no such database
            raise

    async def ping(self) -> None:
        await self._engine.read(lambda conn: conn.execute(q.PING))

    # -- intake

    async def enqueue(self, msg: NewMessage, idempotency: IdempotencyKey | None = None) -> Idempotent | None:
        """Store the message, its body, tags, a queued row per recipient and a "received"
        event in one transaction. Returns once that transaction has committed; the
        ``on_enqueued`` callbacks then run, and one that raises cannot undo the commit.

        With ``idempotency``, the key is written in that same transaction; if its caller has
        used it already, nothing is stored and the key's first use is returned instead.

        In hold mode (``[delivery] hold``, or the message's user in ``hold_users``) the
        recipients are stored "held", never due, with a "held" event each."""
        taken = await self._engine.submit(queue.Enqueue(msg, idempotency=idempotency, hold=self._hold.rule(msg)))
        if isinstance(taken, Idempotent):
            return taken
        self._enqueued(msg)
        return None

    async def idempotency_key(self, caller: str, key: str) -> Idempotent | None:
        """What ``caller`` first used ``key`` for, if it has."""
        return await self._engine.read(lambda conn: queue.idempotency_key(conn, caller, key))

    def _enqueued(self, msg: NewMessage) -> None:
        self._bodies.put(msg.queue_id, msg.raw)
        for callback in self.on_enqueued:
            try:
                callback(msg)
            except Exception:
                log.exception("on_enqueued callback failed for %s (the message is stored)", msg.queue_id)

    def _due(self) -> None:
        for callback in self.on_due:
            try:
                callback()
            except Exception:
                log.exception("on_due callback failed (the change is stored)")

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
        cluster: Callable[[Mapping[str, int]], Collection[str]] | None = None,
        alone: bool = False,
    ) -> list[Claimed]:
        """Lease due recipients to ``owner`` until now + lease, oldest due first. A recipient
        whose lease has run out is due again.

        Up to ``limit`` due recipients (outside ``skip_domains``, of messages up to ``max_size``
        bytes) are candidates; ``pick`` chooses which of them to lease (default: all), inside
        the claiming transaction, so that a worker leases only what it can start at once and
        nothing waits while its lease runs.

        With ``cluster`` (per_domain across the cluster), claims of every node take turns: the
        SMTP transactions every node has in flight per domain are counted inside the claim and
        given to ``cluster``, which returns the domains that are full (skipped; ``alone``: a
        transaction per recipient, as with VERP)."""
        at = time.time() if now is None else now
        return await self._engine.call(
            lambda conn: queue.claim(
                conn, owner=owner, lease=lease, limit=limit, pick=pick, skip_domains=skip_domains,
                max_size=max_size, now=at, cluster=cluster, alone=alone,
            )
        )  # fmt: skip

    async def record(self, owner: str, outcomes: Sequence[Outcome]) -> None:
        """Write what attempts decided: the recipients' new states and one event each.
        Recipients no longer leased to ``owner`` keep their state; the events are kept."""
        queued = await self._engine.submit(queue.Record(owner, outcomes))
        for o in outcomes:
            if o.next_attempt_at is None:  # a later attempt (a retry) reads the body back from the store
                self._bodies.drop(o.queue_id)
        assert isinstance(queued, list)
        for dsn in queued:
            self._enqueued(dsn)

    async def release_leases(self, owner: str, recipient_ids: Iterable[int], now: float | None = None) -> int:
        """Give leased recipients back untouched, due at once (graceful shutdown). (``release``
        is support's: held recipients made due.)"""
        ids = list(recipient_ids)
        if not ids:
            return 0
        at = time.time() if now is None else now
        return await self._engine.call(lambda conn: queue.release(conn, owner, ids, at))

    async def load_bodies(self, queue_ids: Iterable[str]) -> dict[str, bytes]:
        wanted = set(queue_ids)
        found = {k: v for k in wanted if (v := self._bodies.get(k)) is not None}
        missing = wanted - found.keys()
        if missing:
            found.update(await self._engine.read(lambda conn: queue.load_bodies(conn, missing)))
        return found

    async def anything_due(self, now: float | None = None) -> bool:
        """A cheap read: is any recipient due (or its lease run out)?"""
        at = time.time() if now is None else now
        return await self._engine.read(lambda conn: queue.anything_due(conn, at))

    # -- queue control

    async def retry(
        self,
        queue_id: str | None,
        *,
        by: str = "cli",
        reason: str = "",
        now: float | None = None,
        case_id: int | None = None,
        ip: str = "",
    ) -> int:
        """Make the message's recipients in RETRY_STATES due now (with no id: every message's
        recipients in RETRY_ALL_STATES, never old bounces; held ones never: see ``release``);
        log a "retried" event for each, and an audit line naming ``by``. With ``case_id``, the
        case's action entry too, whose targets are the recipients made due; all in one
        transaction. NotFound: an unknown queue id or case; Conflict: a closed case."""
        if queue_id is None and case_id is not None:
            raise ValueError("a case's retry names a message")
        actor, at = actions.Actor(by, ip, case_id), time.time() if now is None else now
        _text("reason", reason)
        done = await self._engine.call(lambda conn: actions.retry(conn, queue_id, actor, reason=reason, now=at))
        if done:
            self._due()
        return len(done)

    async def cancel(
        self,
        queue_id: str,
        *,
        by: str = "cli",
        reason: str = "",
        now: float | None = None,
        case_id: int | None = None,
        ip: str = "",
    ) -> int:
        """Cancel the message's recipients that are not final yet (held ones too); log
        "cancelled" for each, an audit line and (``case_id``) the case's entry, in one
        transaction. Their last_response stays the remote server's last reply: the
        cancellation is an event."""
        actor, at = actions.Actor(by, ip, case_id), time.time() if now is None else now
        _text("reason", reason)
        count = await self._engine.call(lambda conn: actions.cancel(conn, queue_id, actor, reason=reason, now=at))
        self._bodies.drop(queue_id)
        return count

    async def queue_summary(self, *, active_only: bool = False) -> QueueSummary:
        """Recipients per state (only the queue's states when active_only: cheap at any size)
        and when the oldest message still in the queue arrived."""
        return await self._engine.read(lambda conn: queue.summary(conn, active_only=active_only))

    async def queue_list(
        self, *, state: str | None = None, domain: str | None = None, limit: int = 1000
    ) -> list[QueueEntry]:
        """Active recipients (queued, deferred, sending), oldest message first, optionally only
        one state or one recipient domain: what ``relay queue list`` prints."""
        if state is not None and state not in ACTIVE_STATES:
            raise ValueError(f"{state!r} is not a queue state")
        return await self._engine.read(lambda conn: queue.queue_list(conn, state=state, domain=domain, limit=limit))

    # -- tracking

    async def tracking_target(self, recipient_id: int, ordinal: int | None) -> TrackTarget | None:
        """The recipient a token names (and the link, for clicks); None when either is unknown."""
        return await self._engine.read(lambda conn: event_log.tracking_target(conn, recipient_id, ordinal))

    async def record_engagement(
        self, queue_id: str, address: str, kind: EventType, details: Mapping[str, object], *, window: float = 0.0
    ) -> bool | None:
        """Append an opened/clicked event, unless one with the same ``ip``, ``user_agent`` and
        ``url`` details was logged for this recipient less than ``window`` seconds ago: then
        None (coalesced). Else True when it is the recipient's first human (``machine`` false)
        event of its kind, which the event records as ``first``; machine hits are never first."""
        at = time.time()
        return await self._engine.call(
            lambda conn: event_log.record_engagement(conn, queue_id, address, kind, details, at=at, window=window)
        )

    # -- suppression

    async def suppression_check(self, address: str, now: float | None = None) -> Suppression | None:
        """The entry that stops mail to ``address``: its own, else its domain's ``*@domain``
        one; expired entries do not count. Case-insensitive."""
        at = time.time() if now is None else now
        found = await self._engine.read(lambda conn: suppressions.find(conn, [address], at))
        return found.get(address)

    async def suppression(self, address: str, now: float | None = None) -> Suppression | None:
        """The entry in force whose key is ``address`` (a mailbox, or ``*@domain``), exactly."""
        key, at = suppression_key(address), time.time() if now is None else now
        return (await self._engine.read(lambda conn: suppressions.find_keys(conn, [key], at))).get(key)

    async def suppressions(
        self,
        *,
        address: str | None = None,
        reason: SuppressionReason | None = None,
        limit: int = 100,
        after: tuple[float, str] | None = None,
        now: float | None = None,
    ) -> tuple[list[Suppression], tuple[float, str] | None]:
        """Entries in force (the one of ``address`` exactly, those of a ``reason``), newest
        first, a page at a time: pass the returned (created_at, address) as ``after`` for the
        next page (None: no more)."""
        at = time.time() if now is None else now
        return await self._engine.read(
            lambda conn: suppressions.page(conn, address=address, reason=reason, limit=limit, after=after, now=at)
        )

    async def suppress(self, entry: Suppression, actor: str) -> tuple[Suppression, bool]:
        """Add an entry with an audit line naming ``actor``, unless its address has one in
        force already, which then stays as it is: (the entry in force, whether it is new)."""
        now = time.time()
        if entry.expires_at is not None and entry.expires_at <= now:
            raise ValueError("expires_at is in the past")
        found, new = await self._engine.call(lambda conn: suppressions.suppress(conn, entry, actor=actor, now=now))
        if new:
            log.info("suppressed %s (%s) by %s via %s", found.address, found.reason, actor, found.origin)
        return found, new

    async def unsuppress(
        self, address: str, reason: str, actor: str, origin: SuppressionOrigin, now: float | None = None
    ) -> Suppression:
        """Remove the address's own entry, with an audit line and a log record saying who and
        why; returns the entry removed. NotFound when it has none in force; ReasonRequired when
        ``reason`` is blank and the entry is a complaint's."""
        at = time.time() if now is None else now
        entry = await self._engine.call(
            lambda conn: suppressions.remove(conn, address, reason=reason, actor=actor, origin=origin, now=at)
        )
        log.info(
            "unsuppressed %s (was %s) by %s via %s, reason: %s", entry.address, entry.reason, actor, origin,
            reason.strip() or "-",
        )  # fmt: skip
        return entry

    async def import_suppressions(
        self, entries: Sequence[Suppression], actor: str, now: float | None = None
    ) -> list[Suppression]:
        """Add the entries whose address has none in force, all or none, in one transaction;
        each entry keeps its origin, the audit lines say "cli". Returns those added."""
        at = time.time() if now is None else now
        added = await self._engine.transaction(
            lambda conn: suppressions.add(conn, entries, actor=actor, now=at, via="cli")
        )
        if added:
            log.info("imported %d suppression entries by %s", len(added), actor)
        return added

    async def suppression_audit(
        self, address: str | None = None, limit: int = 100, before: int | None = None
    ) -> tuple[list[SuppressionChange], int | None]:
        """Additions and removals (of one address or ``*@domain`` key, or all), newest first, a
        page at a time: pass the returned number as ``before`` for the next (None: no more)."""
        return await self._engine.read(
            lambda conn: suppressions.audit(conn, address=address, limit=limit, before=before)
        )

    async def suppression_count(self, now: float | None = None) -> int:
        """Entries in force (the gauge relay_suppression_entries)."""
        at = time.time() if now is None else now
        return await self._engine.read(lambda conn: suppressions.count(conn, at))

    # -- webhooks

    def on_outbox_rows(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (in the event loop) after each commit that put rows in the outbox."""
        if self._outbox is not None:
            self._outbox.written.listeners.append(listener)

    async def webhook_claim(
        self, owner: str, *, slots: Mapping[str, int], lease: float, limit: int = 100, now: float | None = None
    ) -> list[webhook_store.Pending]:
        """Lease due webhook deliveries to ``owner`` until now + lease: at most ``slots[url]``
        per endpoint (the configured ones; disabled endpoints wait), oldest due first."""
        at = time.time() if now is None else now
        return await self._engine.call(
            lambda conn: webhook_store.claim(
                conn, owner=owner, urls=list(slots), slots=slots, lease=lease, limit=limit, now=at
            )
        )

    async def webhook_next_due(self, urls: Collection[str]) -> float | None:
        """When the next delivery to these endpoints is due (a cheap read; None: none pending)."""
        return await self._engine.read(lambda conn: webhook_store.next_due(conn, urls))

    async def webhook_record(self, owner: str, url: str, outcomes: Sequence[webhook_store.Attempted]) -> int:
        """Write what attempts to one endpoint decided, while ``owner`` holds their lease; an
        outcome with ``disable`` disables the endpoint (410 Gone)."""
        now = time.time()
        return await self._engine.call(lambda conn: webhook_store.record(conn, owner, url, outcomes, now))

    async def webhook_release(self, owner: str, ids: Sequence[int]) -> int:
        """Give leased deliveries back untouched, due at once (shutdown)."""
        if not ids:
            return 0
        now = time.time()
        return await self._engine.call(lambda conn: webhook_store.release(conn, owner, ids, now))

    async def webhook_enable(self, url: str) -> bool:
        """Enable an endpoint that answered 410 again; its pending deliveries are due now.
        False when it was not disabled."""
        now = time.time()
        return await self._engine.call(lambda conn: webhook_store.enable(conn, url, now))

    async def webhook_endpoints(self, urls: Sequence[str]) -> list[webhook_store.Endpoint]:
        """The endpoints (these, and any the outbox holds rows for) with their counts and state."""
        return await self._engine.read(lambda conn: webhook_store.endpoints(conn, urls))

    async def webhook_summary(self) -> webhook_store.WebhookSummary:
        """Pending deliveries, the oldest's age, disabled endpoints (the gauges)."""
        return await self._engine.read(webhook_store.summary)

    async def webhook_deliveries(
        self,
        *,
        status: webhook_store.DeliveryStatus | None = None,
        url: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> tuple[list[webhook_store.Delivery], int | None]:
        """Deliveries, newest first, a page at a time: pass the returned id as ``before``."""
        return await self._engine.read(
            lambda conn: webhook_store.page(conn, status=status, url=url, limit=limit, before=before)
        )

    async def webhook_retry(self, delivery_id: int) -> None:
        """Make one delivery due now (whatever its status); NotFound for an unknown id."""
        now = time.time()
        await self._engine.call(lambda conn: webhook_store.retry(conn, delivery_id, now))

    async def webhook_replay(
        self, webhooks: Sequence[WebhookConfig], *, since: float, until: float, kinds: Collection[str] = ()
    ) -> int:
        """Queue the events of [since, until) again as new deliveries to the endpoints that
        want them (only ``kinds``, when given), in one transaction. Returns how many."""
        outbox = _outbox(webhooks)
        if outbox is None:
            return 0
        now = time.time()
        return await self._engine.transaction(
            lambda conn: webhook_store.replay(conn, outbox, since=since, until=until, kinds=kinds, now=now)
        )

    # -- bulk import

    async def bulk_import(self, items: Sequence[Imported]) -> None:
        """Write messages with their recipients' states and events as given, in one
        transaction and a handful of statements: for migrations and benchmark seeding."""
        await self._engine.transaction(lambda conn: queue.bulk_import(conn, items))

    # -- reporting

    async def stats(self, since: float, until: float, group_by: str) -> list[StatsRow]:
        """Per tag, recipient domain or user: what happened between since and until."""
        if group_by not in ("tag", "domain", "user"):
            raise ValueError(f"cannot group by {group_by!r}")
        return await self._engine.read(lambda conn: event_log.stats(conn, since, until, group_by))

    # -- lookups

    async def lookup(self, query: str, limit: int = 20) -> list[MessageView]:
        """Messages matching a queue id, a Message-ID (with or without <>) or a recipient
        address, newest first."""
        return await self._engine.read(lambda conn: event_log.lookup(conn, query, limit))

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
        returned (received_at, queue id) as ``after`` for the next page (None: no more)."""
        stmt = event_log.search_statement(
            queue_id=queue_id, message_id=message_id, recipient=recipient, tag=tag, status=status,
            since=since, until=until, limit=limit, after=after,
        )  # fmt: skip
        return await self._engine.read(lambda conn: event_log.search_page(conn, stmt, limit))

    async def get_message(self, queue_id: str) -> MessageView | None:
        found = await self._engine.read(lambda conn: event_log.views(conn, [queue_id]))
        return found[0] if found else None

    # -- users

    async def add_user(
        self, name: str, password_hash: str, role: Role = "smtp", *, actor: str = "cli", ip: str = ""
    ) -> None:
        """Add a user and its "user.add" line in the access audit, in one transaction;
        Conflict when the name is taken."""
        now = time.time()

        def add(conn: Connection) -> None:
            users.add(conn, name, password_hash, now, role)
            audit_store.append(conn, actor=actor, ip=ip, action="user.add", target=name, details={"role": role}, at=now)

        await self._engine.call(add)

    async def remove_user(self, name: str, *, actor: str = "cli", ip: str = "") -> None:
        """Remove a user (its console sessions end with it) and write its "user.remove" audit
        line, in one transaction; NotFound when there is no such user."""
        now = time.time()

        def remove(conn: Connection) -> None:
            role = users.role(conn, name)
            users.remove(conn, name)
            audit_store.append(
                conn, actor=actor, ip=ip, action="user.remove", target=name, details={"role": role}, at=now
            )

        await self._engine.call(remove)

    async def list_users(self) -> list[User]:
        return await self._engine.read(users.all_users)

    async def password_hash(self, name: str, roles: Collection[Role] = SMTP_ROLES) -> str | None:
        """The user's hash, when the user has one of ``roles`` (SMTP AUTH asks for "smtp" only,
        the console's sign-in for CONSOLE_ROLES)."""
        return await self._engine.read(lambda conn: users.password_hash(conn, name, roles))

    async def user_role(self, name: str) -> Role | None:
        return await self._engine.read(lambda conn: users.role(conn, name))

    # -- search (relay.search's grammar; relay/store/search.py)

    async def search_messages(
        self,
        query: str,
        *,
        limit: int = 20,
        after: tuple[float, str] | None = None,
        count: bool = True,
        now: float | None = None,
    ) -> SearchPage:
        """Messages matching a search (relay.search's grammar), newest first, a page at a time:
        pass the page's ``next`` as ``after`` for the next one. With ``count``, ``total`` counts
        the matches (of every page) up to 10,000, ``total_capped`` saying there are more;
        without, ``total`` is -1. QueryError (a ValueError, its message fit for the user) for
        a query that cannot be run."""
        from relay import search as grammar
        from relay.store import search

        parsed = grammar.parse(query, now=time.time() if now is None else now)
        return await self._engine.read(lambda conn: search.run(conn, parsed, limit=limit, after=after, count=count))

    # -- dashboard

    async def dashboard(self, now: float | None = None) -> Dashboard:
        """The last hour's and day's figures, queue depth, and the last day per tag."""
        from relay.store import dashboard

        at = time.time() if now is None else now
        return await self._engine.read(lambda conn: dashboard.dashboard(conn, at))

    # -- console sessions (relay/store/sessions.py)

    async def session_create(
        self, username: str, ip: str, *, idle: float, now: float | None = None
    ) -> tuple[str, console_sessions.ConsoleSession]:
        """A new console session for ``username``: (the token for the cookie, the session). Sessions
        idle past ``idle`` seconds are deleted in the same transaction."""
        at = time.time() if now is None else now
        return await self._engine.call(lambda conn: console_sessions.create(conn, username, ip, idle=idle, now=at))

    async def session_get(
        self, token: str, *, idle: float, now: float | None = None
    ) -> console_sessions.ConsoleSession | None:
        """The session of a cookie's token, with its user's current role; None when unknown, idle
        past ``idle`` seconds, or its user can no longer sign in."""
        at = time.time() if now is None else now
        return await self._engine.read(lambda conn: console_sessions.get(conn, token, idle=idle, now=at))

    async def session_touch(self, session_id: str, now: float | None = None) -> bool:
        """Mark a session used now (written only when its last mark is older than a minute)."""
        at = time.time() if now is None else now
        return await self._engine.call(lambda conn: console_sessions.touch(conn, session_id, at))

    async def session_delete(self, session_id: str) -> bool:
        return await self._engine.call(lambda conn: console_sessions.delete(conn, session_id))

    async def session_delete_user(self, username: str) -> int:
        """Sign a user out of every console session."""
        return await self._engine.call(lambda conn: console_sessions.delete_user(conn, username))

    # -- support actions: resend, notes, hold mode (relay/store/actions.py)
    # Each writes its events, its audit line ("action.*", naming ``by`` and ``ip``) and, with
    # ``case_id``, the case's action entry, in one transaction: an unknown case (NotFound) or a
    # closed one (Conflict) refuses the whole action. Bad input is a ValueError.

    async def resend(
        self,
        queue_id: str,
        address: str,
        new_address: str,
        *,
        by: str,
        ip: str = "",
        case_id: int | None = None,
        reason: str = "",
    ) -> str:
        """Send the message again as a new message (new queue id; same body, sender, tags,
        user and tracking) to ``new_address`` alone: its "received" event says ``resend_of``,
        the old message's recipient ``address`` gets a "resent" event naming the new queue id.
        Delivery is woken after the commit, as for any new message (hold mode holds it like
        any other of its user's). Returns the new queue id.

        ValueError: ``new_address`` is not a valid address. NotFound: no such message, or
        ``address`` is not one of its recipients. Conflict: ``new_address`` is suppressed, or
        the old message's body is no longer kept."""
        new = _mailbox(new_address)
        _text("reason", reason)
        actor, at = actions.Actor(by, ip, case_id), time.time()
        msg = await self._engine.call(
            lambda conn: actions.resend(
                conn, queue_id, address, new, actor, reason=reason, hold=self._hold, now=at
            )
        )  # fmt: skip
        log.info("resent %s to <%s> as %s by %s", queue_id, new, msg.queue_id, by)
        self._enqueued(msg)
        return msg.queue_id

    async def comment(self, queue_id: str, text: str, *, by: str, ip: str = "", case_id: int | None = None) -> None:
        """A support note on the message's timeline ("commented": no webhook)."""
        if not text.strip():
            raise ValueError("a note needs some text")
        _text("text", text)
        actor, at = actions.Actor(by, ip, case_id), time.time()
        await self._engine.call(lambda conn: actions.comment(conn, queue_id, text, actor, now=at))

    async def release(self, queue_id: str, *, by: str, ip: str = "", case_id: int | None = None) -> int:
        """Held recipients -> queued, due now, a "released" event each; how many (0: none
        was held). With ``case_id`` they are the case's targets."""
        actor, at = actions.Actor(by, ip, case_id), time.time()

        def release(conn: Connection) -> list[tuple[int, str]]:
            released = actions.release(conn, queue_id, actor, now=at)
            if released:
                node_store.notify_due(conn)  # every node's delivery, as for new mail
            return released

        done = await self._engine.call(release)
        if done:
            log.info("released %s (%d recipients) by %s", queue_id, len(done), by)
            self._due()
        return len(done)

    async def discard(self, queue_id: str, *, by: str, ip: str = "", case_id: int | None = None) -> int:
        """Held recipients -> cancelled, a "cancelled" event each with ``discarded``; how many."""
        actor, at = actions.Actor(by, ip, case_id), time.time()
        count = await self._engine.call(lambda conn: actions.discard(conn, queue_id, actor, now=at))
        if count:
            log.info("discarded %s (%d held recipients) by %s", queue_id, count, by)
            self._bodies.drop(queue_id)
        return count

    async def unsuppress_recipient(
        self,
        queue_id: str,
        address: str,
        reason: str,
        *,
        by: str,
        ip: str = "",
        case_id: int | None = None,
        origin: SuppressionOrigin = "api",
    ) -> Suppression:
        """Lift the suppression of one of the message's recipients (its own entry) with a
        reason, an "unsuppressed" event on the message, the suppression audit line and the
        access audit's, in one transaction. NotFound: no such message or recipient, or it has
        no entry of its own; ReasonRequired: a complaint's entry and a blank reason."""
        _text("reason", reason)
        actor, at = actions.Actor(by, ip, case_id), time.time()
        entry = await self._engine.call(
            lambda conn: actions.unsuppress(conn, queue_id, address, reason, actor, origin=origin, now=at)
        )
        log.info("unsuppressed %s (was %s) from %s by %s, reason: %s", entry.address, entry.reason, queue_id, by,
                 reason.strip() or "-")  # fmt: skip
        return entry

    async def raw_message(self, queue_id: str) -> bytes | None:
        """The stored body, as it is sent (None: no such message, or the body is gone)."""
        cached = self._bodies.get(queue_id)
        if cached is not None:
            return cached
        return await self._engine.read(lambda conn: actions.raw_message(conn, queue_id))

    async def message_webhooks(self, queue_id: str, limit: int = 100) -> list[webhook_store.Delivery]:
        """The webhook deliveries of the message's events, newest first."""
        return await self._engine.read(lambda conn: webhook_store.of_message(conn, queue_id, limit))

    # -- cases (relay/store/cases.py)

    async def open_case(
        self,
        *,
        title: str,
        customer_ref: str = "",
        owner: str = "",
        queue_ids: Sequence[str] = (),
        actor: str,
        ip: str = "",
        incident: str = "",
        now: float | None = None,
    ) -> CaseView:
        """Open a case over ``queue_ids`` with its "incident" entry: ``incident`` when given,
        else a summary of what went wrong for those messages. ValueError: a bad field or an
        unknown queue id."""
        at = time.time() if now is None else now
        case_id = await self._engine.call(
            lambda conn: case_store.open_case(
                conn, title=title, customer_ref=customer_ref, owner=owner, queue_ids=queue_ids, actor=actor,
                ip=ip, incident=incident, at=at,
            )
        )  # fmt: skip
        log.info("case %s opened by %s over %d messages", case_id, actor, len(queue_ids))
        view = await self.case(case_id, sla=float("inf"))
        assert view is not None
        return view

    async def case(self, case_id: int, *, sla: float, now: float | None = None) -> CaseView | None:
        """A case with its whole trail; ``sla``: [console] case_sla, for ``overdue``."""
        at = time.time() if now is None else now
        return await self._engine.read(lambda conn: case_store.case(conn, case_id, sla=sla, now=at))

    async def cases(
        self,
        *,
        state: CaseState | None = None,
        owner: str | None = None,
        overdue: bool | None = None,
        escalated: bool | None = None,
        queue_id: str | None = None,
        sla: float,
        limit: int = 50,
        before: int | None = None,
        now: float | None = None,
    ) -> tuple[list[CaseView], int | None]:
        """Cases (without their trails) newest first, filtered, a page at a time: pass the
        returned id as ``before`` for the next (None: no more). ``escalated``: escalated at some
        time; ``overdue``: opened more than ``sla`` seconds ago and not closed."""
        at = time.time() if now is None else now
        return await self._engine.read(
            lambda conn: case_store.page(
                conn, state=state, owner=owner, overdue=overdue, escalated=escalated, queue_id=queue_id, sla=sla,
                now=at, limit=limit, before=before,
            )
        )  # fmt: skip

    async def add_case_entry(
        self, case_id: int, kind: EntryKind, details: Mapping[str, Any], *, actor: str, ip: str = ""
    ) -> CaseEntry:
        """Append an entry written by hand (relay.cases.validate says what each kind holds);
        ValueError: bad details or kind "action"; NotFound; Conflict: the case is closed."""
        at = time.time()
        entry = await self._engine.call(
            lambda conn: case_store.add_entry(conn, case_id, kind, details, actor=actor, ip=ip, at=at)
        )
        log.info("case %s: %s entry %s by %s", case_id, kind, entry.id, actor)
        return entry

    async def close_case(self, case_id: int, reason: str, *, actor: str, ip: str = "") -> CaseView:
        """Close without a resolution (closed_unresolved). ValueError: no reason; NotFound;
        Conflict: closed already."""
        at = time.time()
        await self._engine.call(lambda conn: case_store.close_case(conn, case_id, reason, actor=actor, ip=ip, at=at))
        log.info("case %s closed unresolved by %s", case_id, actor)
        view = await self.case(case_id, sla=float("inf"))
        assert view is not None
        return view

    async def confirm_cases(self, now: float | None = None) -> list[tuple[int, float]]:
        """Confirm every case whose retried or resent recipients are all delivered; returns
        (case id, seconds from opening to the last delivery) for each confirmed by this call."""
        at = time.time() if now is None else now
        done = await self._engine.call(lambda conn: case_store.confirm(conn, now=at))
        for case_id, took in done:
            log.info("case %s confirmed: every target delivered, %.0f s after it was opened", case_id, took)
        return done

    async def case_counts(self) -> dict[str, int]:
        """Cases per state, every state included (the gauge relay_cases)."""
        return await self._engine.read(case_store.counts)

    async def case_messages(self, case: CaseView) -> list[MessageView]:
        """The messages a case covers, with their recipients' live states."""
        return await self._engine.read(lambda conn: event_log.views(conn, case.queue_ids))

    # -- the access audit (relay/store/audit.py)

    async def audit(
        self,
        *,
        actor: str,
        ip: str,
        action: str,
        target: str = "",
        details: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> AuditEntry:
        """Append a line to the access audit (hash-chained; nothing edits one; retention deletes the oldest)."""
        at = time.time() if now is None else now
        return await self._engine.call(
            lambda conn: audit_store.append(
                conn, actor=actor, ip=ip, action=action, target=target, details=details, at=at
            )
        )

    async def audit_entries(
        self, *, limit: int = 100, before: int | None = None, actor: str | None = None, action: str | None = None
    ) -> tuple[list[AuditEntry], int | None]:
        """Lines newest first (only ``actor``'s, only ``action``), a page at a time: pass the
        returned id as ``before`` for the next (None: no more)."""
        return await self._engine.read(
            lambda conn: audit_store.page(conn, limit=limit, before=before, actor=actor, action=action)
        )

    async def verify_chains(self) -> ChainReport:
        """Recompute the audit's and the case trails' hash chains: the first broken link, if any."""
        return await self._engine.read(chain.verify)

    # -- bounces

    async def record_report(
        self,
        report: NewReport,
        recipient_ids: Sequence[int],
        decide: Callable[[list[ReportTarget]], ReportDecision],
        *,
        with_headers: bool = False,
    ) -> tuple[int, ReportDecision]:
        """Store a report from the bounce listener with what it does: ``decide`` is given the
        recipients it names (unknown ids left out; with their message's header section when
        ``with_headers``) and says which events, state changes, suppression entries and DSNs
        follow, all written in one transaction. Returns the report's id and the decision."""
        report_id, decision = await self._engine.call(
            lambda conn: reports.record(conn, report, recipient_ids, decide, with_headers=with_headers)
        )
        for dsn in decision.notify:
            self._enqueued(dsn)
        return report_id, decision

    async def bounce_report(self, report_id: int) -> bytes | None:
        """A stored report, raw, as it came to the bounce listener."""
        return await self._engine.read(lambda conn: reports.raw(conn, report_id))

    # -- nodes: heartbeats, dead nodes' leases, wake-ups across nodes (relay/store/nodes.py)

    async def node_register(self, node: Node) -> None:
        """Write this node's row (a row of the same name is replaced: alive, not stopped)."""
        await self._engine.call(lambda conn: node_store.register(conn, node))

    async def node_watch(self, me: Node | None, name: str, now: float | None = None) -> node_store.Watch:
        """One look at the registry by the node ``name``: with ``me``, its heartbeat first; then
        every other node found dead (silent for 3 of its heartbeat intervals, not stopped) has
        its leases freed, due at once, in this one transaction (NOTIFY wakes every node). A
        silence counts only where this process could have seen it broken: it has reached the
        store unbroken since before the other's last heartbeat, or for 3 of its intervals (after
        an outage of the database, every node is silent: none is dead for that)."""
        at = time.time() if now is None else now
        # Since when this process has reached the store unbroken (now, if it has just lost it):
        # a silence that began before that may be the store's, not the other node's.
        contact = self._engine.availability
        since = contact.since if contact.since is not None and contact.lost_at is None else at
        watch = await self._engine.call(lambda conn: node_store.watch(conn, me, name, at, contact_since=since))
        if any(f.recipients or f.webhook_deliveries for f in watch.freed):
            self._due()
        return watch

    async def node_stop(self, name: str, now: float | None = None) -> None:
        """A clean shutdown (after delivery gave its leases back): the node shows as stopped."""
        at = time.time() if now is None else now
        await self._engine.call(lambda conn: node_store.stop(conn, name, at))

    async def nodes(self) -> list[Node]:
        """Every registered node, oldest first (rows of nodes gone for a day are deleted)."""
        return await self._engine.read(node_store.all_nodes)

    def wakeups(self, on_due: Callable[[], None]) -> Wakeups | None:
        """A listener that calls ``on_due`` whenever any node made recipients due (PostgreSQL
        LISTEN on its own connection; run it with ``run()``). None on SQLite: processes poll."""
        if self._engine.dialect != "postgresql":
            return None
        return Wakeups(self._url, on_due)

    # -- retention (relay/store/retention.py)

    async def purge(
        self,
        kind: retention.Kind,
        cutoff: float,
        batch: int = retention.BATCH,
        *,
        dry_run: bool = False,
        now: float | None = None,
        kept: str = "",
        message_cutoff: float | None = None,
        on_batch: Callable[[RetentionCount], None] | None = None,
        pause: float = 0.0,
    ) -> RetentionCount:
        """Delete what ``kind`` keeps until ``cutoff`` (seconds since the epoch), ``batch`` rows
        per transaction, sleeping ``pause`` seconds between them; ``on_batch`` is told each
        committed batch. A dry run deletes nothing and says what would go. ``kept``: the
        setting, for the "body_purged" events; ``message_cutoff`` (bodies, dry run): leave out
        bodies the messages kind deletes whole first. Call through ``retention_run`` so that
        one node purges at a time."""
        at = time.time() if now is None else now
        batch = max(1, batch)
        if kind == "audit":
            return await self._purge_audit(cutoff, batch, dry_run=dry_run, now=at, kept=kept, on_batch=on_batch,
                                           pause=pause)  # fmt: skip
        rows = size = 0
        cursor: tuple[Any, ...] | None = retention.START[kind]
        while cursor is not None:
            found = await self._engine.read(
                functools.partial(
                    retention.candidates, kind=kind, cursor=cursor, cutoff=cutoff, batch=batch,
                    message_cutoff=message_cutoff if dry_run else None,
                )
            )  # fmt: skip
            cursor, keys = found.cursor, found.keys
            if dry_run:
                count = await self._engine.read(functools.partial(retention.measure, kind=kind, keys=keys))
            elif keys:
                count = await self._purge_batch(kind, keys, cutoff=cutoff, now=at, kept=kept)
                if count.rows and on_batch is not None:
                    on_batch(count)
                await asyncio.sleep(pause)  # intake and delivery first
            else:
                continue
            rows, size = rows + count.rows, size + count.bytes
        if kind == "messages":  # reports that matched no message: their bytes count here
            extra_rows, extra = await self._purge_orphans(cutoff, batch, dry_run=dry_run, pause=pause)
            size += extra
            if extra_rows:
                log.info("retention: %s %d unmatched bounce reports", "would delete" if dry_run else "deleted",
                         extra_rows)  # fmt: skip
        return RetentionCount(kind, rows, size)

    async def _purge_batch(
        self, kind: retention.Kind, keys: Sequence[Any], *, cutoff: float, now: float, kept: str
    ) -> RetentionCount:
        def run(conn: Connection) -> retention.Purged:
            if kind == "bodies":
                return retention.purge_bodies(conn, keys, cutoff=cutoff, now=now, kept=kept)
            if kind == "messages":
                return retention.purge_messages(conn, keys, cutoff=cutoff)
            return retention.purge_webhooks(conn, keys, cutoff=cutoff)

        done = await self._engine.transaction(run)
        for qid in done.queue_ids:
            self._bodies.drop(qid)
        return done.count

    async def _purge_orphans(self, cutoff: float, batch: int, *, dry_run: bool, pause: float) -> tuple[int, int]:
        if dry_run:
            return await self._engine.read(lambda conn: retention.count_orphan_reports(conn, cutoff=cutoff))
        rows = size = 0
        while True:
            n, b = await self._engine.transaction(
                lambda conn: retention.orphan_reports(conn, cutoff=cutoff, batch=batch, dry_run=False)
            )
            rows, size = rows + n, size + b
            if n < batch:
                return rows, size
            await asyncio.sleep(pause)

    async def _purge_audit(
        self,
        cutoff: float,
        batch: int,
        *,
        dry_run: bool,
        now: float,
        kept: str,
        on_batch: Callable[[RetentionCount], None] | None,
        pause: float,
    ) -> RetentionCount:
        if dry_run:
            n = await self._engine.read(lambda conn: retention.count_audit(conn, cutoff=cutoff))
            return RetentionCount("audit", n, 0)
        rows = 0
        while True:
            done = await self._engine.transaction(
                lambda conn: retention.purge_audit(conn, cutoff=cutoff, batch=batch, now=now, kept=kept)
            )
            rows += done.count.rows
            if done.count.rows and on_batch is not None:
                on_batch(done.count)
            if done.count.rows < batch:
                return RetentionCount("audit", rows, 0)
            await asyncio.sleep(pause)

    async def retention_run(
        self,
        config: RetentionConfig,
        now: float | None = None,
        *,
        dry_run: bool = False,
        batch: int = retention.BATCH,
        session_idle: float | None = None,
        on_batch: Callable[[RetentionCount], None] | None = None,
        pause: float = 0.0,
    ) -> list[RetentionCount] | None:
        """One retention pass over every kind ([retention]; 0 keeps a kind forever), in
        retention.KINDS order, a ``batch`` at a time; with ``session_idle``, console sessions
        idle that long go too. None when another process (any node) is purging now: one purges
        at a time. A dry run deletes nothing, takes no lock, and reports what would go."""
        at = time.time() if now is None else now
        settings = {"messages": config.messages, "bodies": config.bodies,
                    "webhook_deliveries": config.webhook_deliveries, "audit": config.audit}  # fmt: skip
        message_cutoff = at - config.messages if config.messages > 0 else None

        async def run() -> list[RetentionCount]:
            out = []
            for kind in retention.KINDS:
                keep = settings[kind]
                if keep <= 0:
                    out.append(RetentionCount(kind, 0, 0))
                    continue
                out.append(
                    await self.purge(
                        kind, at - keep, batch, dry_run=dry_run, now=at, kept=retention.span(keep),
                        message_cutoff=message_cutoff, on_batch=on_batch, pause=pause,
                    )
                )  # fmt: skip
            if session_idle is not None and not dry_run:
                await self._engine.call(lambda conn: retention.delete_idle_sessions(conn, before=at - session_idle))
            return out

        if dry_run:
            return await run()
        try:
            async with self._engine.exclusive("retention") as mine:
                if not mine:
                    return None
                return await run()
        except (SQLAlchemyError, OSError) as exc:  # taking or giving back the lock
            raise StoreError(f"retention: {exc}") from exc

    # -- copying a store to another (relay/store/copy.py)

    async def copy_preflight(self) -> store_copy.Preflight:
        """This store as the target of a copy: its schema state and the copied tables that hold
        rows. Reads only. "missing" for a PostgreSQL database that does not exist (see
        ``schema_state``); StoreError when it cannot be read at all."""
        if await self.schema_state() == "missing" and not await self._reachable():
            return store_copy.Preflight("missing")  # no such database
        doing = f"cannot read the store at {self._display_url}"
        return await self._engine.read(store_copy.preflight, Failure(doing, reason=True, unreachable=doing))

    async def _reachable(self) -> bool:
        try:
            await self.ping()
        except StoreError:
            return False
        return True

    async def copy_from(self, source_url: str, progress: store_copy.Progress | None = None) -> store_copy.Copied:
        """Copy the SQLite store at ``source_url`` into this one, from one read snapshot of it,
        in one transaction here that also runs the migrations: all or nothing. Conflict when
        this store holds rows already; StoreError for the rest (the table and ids named)."""

        def copy(target: Connection) -> store_copy.Copied:
            with store_copy.snapshot(source_url) as source:
                return store_copy.copy_into(target, source, progress)

        return await self._engine.transaction(copy, Failure("copy failed", reason=True, unreachable="copy failed"))

    async def copy_counts(self) -> dict[str, int]:
        """Rows in each table a copy writes."""
        return await self._engine.read(store_copy.counts)


def _text(name: str, text: str) -> None:
    """A free-text field of an action: bounded, and no NUL (PostgreSQL text cannot hold one)."""
    if len(text) > actions.MAX_TEXT:
        raise ValueError(f"{name} is too long (at most {actions.MAX_TEXT} characters)")
    if "\x00" in text:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no database stores it
        raise ValueError(f"{name} is not valid Unicode") from exc


def _mailbox(address: str) -> str:
    """A corrected address as RCPT would take it (no domain literal), its domain in lower case."""
    from relay.smtp_in import valid_address  # the RCPT rule

    text = address.strip()
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text) or not valid_address(text):
        raise ValueError(f"not a valid address: {address!r}")
    local, _, domain = text.rpartition("@")
    if domain.startswith("["):
        raise ValueError("domain literals are not accepted")
    return f"{local}@{domain.lower()}"


def _outbox(webhooks: Sequence[WebhookConfig]) -> webhook_store.Outbox | None:
    routes = tuple(webhook_store.Route(w.url, frozenset(w.events), w.deferred == "every") for w in webhooks if w.url)
    return webhook_store.Outbox(routes) if routes else None
