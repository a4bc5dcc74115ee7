"""Every statement the store runs, each a named constant built once (the statement cache then
only binds values), with a line saying what it is. Values come in as bind parameters, named
in each statement; a few are refined at the call (the claim's filters, search's conditions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from relay.model import ACTIVE_STATES, BOUNCED, CANCELLED, DEFERRED, DELIVERED, QUEUED, SENDING, SUPPRESSED
from relay.store.schema import (
    bodies,
    bounce_reports,
    events,
    idempotency_keys,
    link_chunks,
    message_tags,
    messages,
    nodes,
    recipients,
    suppression_audit,
    suppressions,
    users,
    webhook_deliveries,
    webhook_endpoints,
)

# -- intake

# A new message, its body, its tags, its tracked link chunks and its recipients (executemany each).
INSERT_MESSAGE = messages.insert()
INSERT_BODY = bodies.insert()
INSERT_TAG = message_tags.insert()
INSERT_LINK_CHUNK = link_chunks.insert()
INSERT_RECIPIENT = recipients.insert()

# Events, appended; the log never updates nor deletes one (see log.append_events).
INSERT_EVENT = events.insert()

# -- delivery

# What a claim reads of a due recipient (the fields of model.Claimed, in order), oldest due first;
# the claim adds its limit, skipped domains, size cap and (PostgreSQL) FOR UPDATE SKIP LOCKED.
DUE = (
    sa.select(
        recipients.c.id,
        recipients.c.queue_id,
        recipients.c.address,
        recipients.c.domain,
        recipients.c.attempts,
        messages.c.mail_from,
        messages.c.received_at,
        messages.c.track,
        messages.c.size,
    )
    .join(messages, messages.c.queue_id == recipients.c.queue_id)
    .where(recipients.c.next_attempt_at <= sa.bindparam("now"))
    .order_by(recipients.c.next_attempt_at)
)

# Lease claimed recipients to a worker until a time.
LEASE = (
    recipients.update()
    .where(recipients.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(
        status=SENDING,
        lease_owner=sa.bindparam("owner"),
        next_attempt_at=sa.bindparam("until"),
        updated_at=sa.bindparam("at"),
    )
)

# Write an attempt's outcome onto a recipient, only while the worker still holds its lease.
RECORD = (
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

# Give leased recipients back untouched, due at once (graceful shutdown).
RELEASE = (
    recipients.update()
    .where(
        recipients.c.id.in_(sa.bindparam("ids", expanding=True)),
        recipients.c.lease_owner == sa.bindparam("owner"),
        recipients.c.status == SENDING,
    )
    .values(
        status=sa.case((recipients.c.attempts == 0, QUEUED), else_=DEFERRED),
        next_attempt_at=sa.bindparam("now"),
        lease_owner=None,
        updated_at=sa.bindparam("now"),
    )
)

# Bodies by queue id (those not in the body cache).
BODIES = sa.select(bodies.c.queue_id, bodies.c.data).where(bodies.c.queue_id.in_(sa.bindparam("qids", expanding=True)))

# Is any recipient due (or its lease run out)?
ANY_DUE = sa.select(recipients.c.id).where(recipients.c.next_attempt_at <= sa.bindparam("now")).limit(1)

# -- queue control

# Does a message exist?
MESSAGE_EXISTS = sa.select(messages.c.queue_id).where(messages.c.queue_id == sa.bindparam("qid"))

# Make recipients in the given states due now (one message's, or every message's), returning them.
_RETRY = (
    recipients.update()
    .where(recipients.c.status.in_(sa.bindparam("states", expanding=True)))
    .values(
        status=sa.case((recipients.c.attempts == 0, QUEUED), else_=DEFERRED),
        next_attempt_at=sa.bindparam("now"),
        updated_at=sa.bindparam("now"),
    )
    .returning(recipients.c.id, recipients.c.queue_id, recipients.c.address)
)
RETRY_ALL = _RETRY
RETRY_ONE = _RETRY.where(recipients.c.queue_id == sa.bindparam("qid"))

# Cancel a message's recipients that are not final yet, returning them.
CANCEL = (
    recipients.update()
    .where(recipients.c.queue_id == sa.bindparam("qid"), recipients.c.status.in_(ACTIVE_STATES))
    .values(status=CANCELLED, next_attempt_at=None, lease_owner=None, updated_at=sa.bindparam("now"))
    .returning(recipients.c.address)
)

# Recipients per state (all states, or only the queue's: cheap at any size).
COUNT_BY_STATUS = sa.select(recipients.c.status, sa.func.count()).group_by(recipients.c.status)
COUNT_ACTIVE_BY_STATUS = COUNT_BY_STATUS.where(recipients.c.status.in_(ACTIVE_STATES))

# When the oldest message with a recipient still in the queue arrived.
OLDEST_QUEUED = sa.select(sa.func.min(messages.c.received_at)).where(
    messages.c.queue_id.in_(sa.select(recipients.c.queue_id).where(recipients.c.next_attempt_at.is_not(None)))
)

# The queue as `relay queue list` shows it: one row per active recipient, oldest message first.
QUEUE_LIST = (
    sa.select(
        recipients.c.queue_id,
        messages.c.received_at,
        recipients.c.address,
        recipients.c.status,
        recipients.c.attempts,
        recipients.c.next_attempt_at,
        recipients.c.last_response,
    )
    .join(messages, messages.c.queue_id == recipients.c.queue_id)
    .where(recipients.c.status.in_(sa.bindparam("states", expanding=True)))
    .order_by(messages.c.received_at, recipients.c.queue_id, recipients.c.id)
    .limit(sa.bindparam("limit"))
)
# The same, for one recipient domain.
QUEUE_LIST_DOMAIN = QUEUE_LIST.where(recipients.c.domain == sa.bindparam("domain"))

# -- bulk import

# The recipients of imported messages (ids assigned on insert).
IMPORTED_RECIPIENTS = sa.select(recipients.c.id, recipients.c.queue_id).where(
    recipients.c.queue_id.in_(sa.bindparam("qids", expanding=True))
)

# Set an imported recipient's state as given, with no lease check.
IMPORT_STATE = (
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

# -- lookups (support's hot path)

# A message by queue id.
BY_QUEUE_ID = sa.select(messages.c.queue_id).where(messages.c.queue_id == sa.bindparam("qid"))
_MID_MATCH = sa.select(messages.c.queue_id, messages.c.received_at).where(messages.c.message_id == sa.bindparam("mid"))
_RCPT_MATCH = (
    sa.select(messages.c.queue_id, messages.c.received_at)
    .join(recipients, recipients.c.queue_id == messages.c.queue_id)
    .where(sa.func.lower(recipients.c.address) == sa.bindparam("rcpt"))
)
# Messages by Message-ID header, newest first.
BY_MESSAGE_ID = _MID_MATCH.order_by(messages.c.received_at.desc()).limit(sa.bindparam("limit"))
_EITHER = sa.union(_MID_MATCH, _RCPT_MATCH).subquery()
# Messages by Message-ID header or recipient address (lowercased), newest first.
BY_MESSAGE_ID_OR_RECIPIENT = (
    sa.select(_EITHER.c.queue_id).order_by(_EITHER.c.received_at.desc()).limit(sa.bindparam("limit"))
)

# What a message view shows: the messages, their recipients and their events, by queue id.
VIEW_MESSAGES = sa.select(messages).where(messages.c.queue_id.in_(sa.bindparam("qids", expanding=True)))
VIEW_RECIPIENTS = (
    sa.select(recipients)
    .where(recipients.c.queue_id.in_(sa.bindparam("qids", expanding=True)))
    .order_by(recipients.c.id)
)
VIEW_EVENTS = (
    sa.select(events)
    .where(events.c.queue_id.in_(sa.bindparam("qids", expanding=True)))
    .order_by(events.c.at, events.c.id)
)

# -- tracking

# The recipient a tracking token names.
TRACK_RECIPIENT = sa.select(
    recipients.c.queue_id, recipients.c.address, recipients.c.status, recipients.c.updated_at
).where(recipients.c.id == sa.bindparam("rid"))

# A click's link: the one chunk of the message's URLs that holds it (see schema.LINK_CHUNK).
LINK_CHUNK_URLS = sa.select(link_chunks.c.urls).where(
    link_chunks.c.queue_id == sa.bindparam("qid"), link_chunks.c.chunk == sa.bindparam("chunk")
)

# Serialize the tracking hits of one recipient until commit (PostgreSQL; SQLite writes are serial).
ENGAGEMENT_LOCK = sa.select(sa.func.pg_advisory_xact_lock(sa.bindparam("key", type_=sa.BigInteger)))

_ENGAGEMENT_OF = (
    events.c.queue_id == sa.bindparam("qid"),
    events.c.recipient == sa.bindparam("recipient"),
    events.c.type == sa.bindparam("type"),
)
# Tracking hits of one recipient and kind in the last seconds (repeats are coalesced).
RECENT_ENGAGEMENTS = sa.select(events.c.details).where(*_ENGAGEMENT_OF, events.c.at > sa.bindparam("since"))
# The recipient's first human hit of a kind, if any.
FIRST_ENGAGEMENT = (
    sa.select(events.c.id)
    .where(
        *_ENGAGEMENT_OF,
        events.c.details["first"].as_boolean().is_(True),
        # an older Relay marked machine hits first too
        sa.not_(events.c.details["machine"].as_boolean().is_(True)),
    )
    .limit(1)
)

# -- stats


@dataclass(frozen=True, slots=True)
class StatsQueries:
    """What `relay stats` reads for one grouping, between :since and :until (rows: group first)."""

    received: sa.Select[Any]  # messages received
    outcomes: sa.Select[Any]  # recipients by their latest outcome in the window
    deferred: sa.Select[Any]  # recipients deferred, and deferrals
    engaged: sa.Select[Any]  # recipients who opened/clicked, human or machine
    waits: sa.Select[Any]  # seconds from received to delivered, per delivery


OUTCOME_EVENTS = ("delivered", "bounced", "expired", "suppressed")


def _stats_queries(group_by: str) -> StatsQueries:
    m, r, e, t = messages, recipients, events, message_tags
    since, until = sa.bindparam("since", type_=sa.Float), sa.bindparam("until", type_=sa.Float)
    window_events = e.c.at.between(since, until)
    group: sa.ColumnElement[str | None]
    if group_by == "domain":
        group = r.c.domain
        received = sa.select(group, sa.func.count()).select_from(r.join(m, m.c.queue_id == r.c.queue_id))
        received = received.where(m.c.received_at.between(since, until))
        by_event = e.join(r, (r.c.queue_id == e.c.queue_id) & (r.c.address == e.c.recipient))
        with_message = by_event.join(m, m.c.queue_id == e.c.queue_id)
    else:
        group = t.c.tag if group_by == "tag" else m.c.username
        base = m.outerjoin(t, t.c.queue_id == m.c.queue_id) if group_by == "tag" else m
        received = sa.select(group, sa.func.count()).select_from(base).where(m.c.received_at.between(since, until))
        with_message = e.join(base, m.c.queue_id == e.c.queue_id)
        by_event = with_message
    who = e.c.queue_id + "/" + sa.func.coalesce(e.c.recipient, "")
    # Recipients, not attempts: each recipient counts once, by its latest outcome in the window
    # (bounced, retried, bounced again: one bounce; bounced, retried, delivered: one delivery).
    latest = sa.select(sa.func.max(e.c.id)).where(window_events, e.c.type.in_(OUTCOME_EVENTS))
    latest = latest.group_by(e.c.queue_id, e.c.recipient)
    outcomes = sa.select(group, e.c.type, sa.func.count()).select_from(by_event)
    deferred = sa.select(group, sa.func.count(sa.distinct(who)), sa.func.count()).select_from(by_event)
    machine = sa.func.coalesce(e.c.details["machine"].as_boolean(), sa.false())
    engaged = sa.select(group, e.c.type, machine, sa.func.count(sa.distinct(who))).select_from(by_event)
    waits = sa.select(group, e.c.at - m.c.received_at).select_from(with_message)
    return StatsQueries(
        received=received.group_by(group),
        outcomes=outcomes.where(e.c.id.in_(latest)).group_by(group, e.c.type),
        deferred=deferred.where(window_events, e.c.type == "deferred").group_by(group),
        engaged=engaged.where(window_events, e.c.type.in_(("opened", "clicked", "complained"))).group_by(
            group, e.c.type, machine
        ),
        waits=waits.where(window_events, e.c.type == "delivered"),
    )


# What `relay stats` reads, per grouping: by tag, by recipient domain, by user.
STATS = {group_by: _stats_queries(group_by) for group_by in ("tag", "domain", "user")}

# -- users

# A user's name, if it exists.
USER_EXISTS = sa.select(users.c.name).where(users.c.name == sa.bindparam("name"))
# Add a user.
INSERT_USER = users.insert()
# Remove a user.
DELETE_USER = users.delete().where(users.c.name == sa.bindparam("name"))
# Every user and when it was added, by name.
LIST_USERS = sa.select(users.c.name, users.c.role, users.c.created_at).order_by(users.c.name)
# A user's password hash.
PASSWORD_HASH = sa.select(users.c.password_hash).where(
    users.c.name == sa.bindparam("name"), users.c.role.in_(sa.bindparam("roles", expanding=True))
)
USER_ROLE = sa.select(users.c.role).where(users.c.name == sa.bindparam("name"))

# -- suppression

# The entries in force for some keys (addresses and "*@domain"s, lower case) at :now.
SUPPRESSIONS_FOR = sa.select(suppressions).where(
    suppressions.c.address.in_(sa.bindparam("keys", expanding=True)),
    sa.or_(suppressions.c.expires_at.is_(None), suppressions.c.expires_at > sa.bindparam("now")),
)
# Entries for some keys that have expired by :now (a new entry replaces them).
DELETE_EXPIRED_SUPPRESSIONS = suppressions.delete().where(
    suppressions.c.address.in_(sa.bindparam("keys", expanding=True)),
    suppressions.c.expires_at <= sa.bindparam("now"),
)
# Add an entry unless one exists for its address (executemany), per dialect.
INSERT_SUPPRESSION = {
    "postgresql": postgresql.insert(suppressions).on_conflict_do_nothing(index_elements=["address"]),
    "sqlite": sqlite.insert(suppressions).on_conflict_do_nothing(index_elements=["address"]),
}
# End claimed-to-be recipients that are suppressed (executemany): never attempted.
SUPPRESS_RECIPIENT = (
    recipients.update()
    .where(recipients.c.id == sa.bindparam("rid"))
    .values(
        status=SUPPRESSED,
        next_attempt_at=None,
        lease_owner=None,
        last_response=sa.bindparam("response"),
        updated_at=sa.bindparam("at"),
    )
)
# A line of the suppression audit trail.
INSERT_SUPPRESSION_AUDIT = suppression_audit.insert()
# The same inserts, returning the addresses actually inserted (a concurrent insert of the same
# address, on another node, makes one of them a no-op: that one must not write an audit line).
INSERT_SUPPRESSION_RETURNING = {
    dialect: stmt.returning(suppressions.c.address) for dialect, stmt in INSERT_SUPPRESSION.items()
}
_IN_FORCE = sa.or_(suppressions.c.expires_at.is_(None), suppressions.c.expires_at > sa.bindparam("now"))
# A page of entries in force at :now, newest first, one more than :limit (the list's filters and
# cursor are added at the call).
SUPPRESSION_PAGE = (
    sa.select(suppressions)
    .where(_IN_FORCE)
    .order_by(suppressions.c.created_at.desc(), suppressions.c.address.desc())
    .limit(sa.bindparam("limit"))
)
# Entries in force at :now (the gauge relay_suppression_entries).
COUNT_SUPPRESSIONS = sa.select(sa.func.count()).select_from(suppressions).where(_IN_FORCE)
# Remove one entry by its key.
DELETE_SUPPRESSION = suppressions.delete().where(suppressions.c.address == sa.bindparam("key"))
# A page of the audit trail, newest first, one more than :limit (address and cursor added at the call).
SUPPRESSION_AUDIT_PAGE = (
    sa.select(suppression_audit).order_by(suppression_audit.c.id.desc()).limit(sa.bindparam("limit"))
)

# -- bounce reports

# A report as it came to the bounce listener; its id goes in the events it caused.
INSERT_BOUNCE_REPORT = bounce_reports.insert().returning(bounce_reports.c.id)
# The recipients reports name, with what a report needs of their message.
REPORT_TARGETS = (
    sa.select(
        recipients.c.id,
        recipients.c.queue_id,
        recipients.c.address,
        recipients.c.status,
        messages.c.mail_from,
        messages.c.received_at,
    )
    .join(messages, messages.c.queue_id == recipients.c.queue_id)
    .where(recipients.c.id.in_(sa.bindparam("ids", expanding=True)))
)
# A bounce that came back after delivery: delivered -> bounced (executemany).
ASYNC_BOUNCE = (
    recipients.update()
    .where(recipients.c.id == sa.bindparam("rid"), recipients.c.status == DELIVERED)
    .values(status=BOUNCED, last_response=sa.bindparam("response"), updated_at=sa.bindparam("at"))
)
# How many reports are kept for one recipient of one message.
REPORT_COUNT = sa.select(sa.func.count()).where(
    bounce_reports.c.queue_id == sa.bindparam("qid"), bounce_reports.c.recipient == sa.bindparam("rcpt")
)
# One report, raw.
BOUNCE_REPORT = sa.select(bounce_reports).where(bounce_reports.c.id == sa.bindparam("id"))

# -- sending over HTTP

# Take an idempotency key, unless the caller has taken it already (then no row: rowcount 0).
INSERT_IDEMPOTENCY_KEY = {
    "postgresql": postgresql.insert(idempotency_keys).on_conflict_do_nothing(index_elements=["caller", "key"]),
    "sqlite": sqlite.insert(idempotency_keys).on_conflict_do_nothing(index_elements=["caller", "key"]),
}
# A caller's idempotency key: the request it was first used with and the message that request queued.
IDEMPOTENCY_KEY = sa.select(
    idempotency_keys.c.request_hash,
    idempotency_keys.c.queue_id,
    idempotency_keys.c.message_id,
    idempotency_keys.c.created_at,
).where(idempotency_keys.c.caller == sa.bindparam("caller"), idempotency_keys.c.key == sa.bindparam("key"))

# -- webhooks

_wd, _we = webhook_deliveries, webhook_endpoints
# New deliveries in the outbox (executemany), written in the transaction of their event.
INSERT_WEBHOOK_DELIVERY = _wd.insert()
# The message fields every message.* webhook carries, by queue id.
WEBHOOK_MESSAGES = sa.select(
    messages.c.queue_id, messages.c.message_id, messages.c.mail_from, messages.c.tags, messages.c.username,
    messages.c.subject,
).where(messages.c.queue_id.in_(sa.bindparam("qids", expanding=True)))  # fmt: skip
# Has the recipient been deferred before? (message.deferred is sent for the first deferral only)
EARLIER_DEFERRAL = (
    sa.select(events.c.id)
    .where(events.c.queue_id == sa.bindparam("qid"), events.c.recipient == sa.bindparam("rcpt"),
           events.c.type == DEFERRED)
    .limit(1)
)  # fmt: skip
# The first deferral of each recipient of some messages (replay's first-only rule).
FIRST_DEFERRALS = (
    sa.select(sa.func.min(events.c.id))
    .where(events.c.queue_id.in_(sa.bindparam("qids", expanding=True)), events.c.type == DEFERRED)
    .group_by(events.c.queue_id, events.c.recipient)
)
_DISABLED_URLS = sa.select(_we.c.url).where(_we.c.disabled_at.is_not(None))
# Due deliveries to the given endpoints (not disabled), oldest due first; the claim adds its
# limit, its full endpoints and (PostgreSQL) FOR UPDATE SKIP LOCKED.
WEBHOOKS_DUE = (
    sa.select(_wd.c.id, _wd.c.webhook_id, _wd.c.url, _wd.c.type, _wd.c.body, _wd.c.attempts)
    .where(
        _wd.c.status == "pending",
        _wd.c.next_attempt_at <= sa.bindparam("now"),
        _wd.c.url.in_(sa.bindparam("urls", expanding=True)),
        _wd.c.url.not_in(_DISABLED_URLS),
    )
    .order_by(_wd.c.next_attempt_at)
)
# When the next delivery to the given endpoints is due (None: nothing pending).
WEBHOOK_NEXT_DUE = sa.select(sa.func.min(_wd.c.next_attempt_at)).where(
    _wd.c.status == "pending",
    _wd.c.url.in_(sa.bindparam("urls", expanding=True)),
    _wd.c.url.not_in(_DISABLED_URLS),
)
# Lease claimed deliveries to a dispatcher until a time.
LEASE_WEBHOOKS = (
    _wd.update()
    .where(_wd.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(lease_owner=sa.bindparam("owner"), next_attempt_at=sa.bindparam("until"), updated_at=sa.bindparam("at"))
)
# Write an attempt's outcome, only while the dispatcher still holds the lease.
RECORD_WEBHOOK = (
    _wd.update()
    .where(_wd.c.id == sa.bindparam("did"), _wd.c.lease_owner == sa.bindparam("owner"))
    .values(
        status=sa.bindparam("status"),
        attempts=sa.bindparam("attempts"),
        next_attempt_at=sa.bindparam("next_at"),
        last_status=sa.bindparam("code"),
        last_error=sa.bindparam("error"),
        lease_owner=None,
        updated_at=sa.bindparam("at"),
    )
)
# Give leased deliveries back untouched, due at once (shutdown).
RELEASE_WEBHOOKS = (
    _wd.update()
    .where(_wd.c.id.in_(sa.bindparam("ids", expanding=True)), _wd.c.lease_owner == sa.bindparam("owner"))
    .values(lease_owner=None, next_attempt_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
)
# Make one delivery due now, whatever its status (the API's retry), unless it is being sent.
WEBHOOK_EXISTS = sa.select(_wd.c.id).where(_wd.c.id == sa.bindparam("did"))
RETRY_WEBHOOK = (
    _wd.update()
    .where(_wd.c.id == sa.bindparam("did"), _wd.c.lease_owner.is_(None))
    .values(status="pending", next_attempt_at=sa.bindparam("now"), lease_owner=None, updated_at=sa.bindparam("now"))
)
# Pending deliveries to one endpoint due now (it was enabled again).
WEBHOOKS_DUE_NOW = (
    _wd.update()
    .where(_wd.c.url == sa.bindparam("endpoint"), _wd.c.status == "pending", _wd.c.lease_owner.is_(None))
    .values(next_attempt_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
)
# Deliveries per endpoint and status (`relay webhooks list`).
WEBHOOK_COUNTS = sa.select(_wd.c.url, _wd.c.status, sa.func.count()).group_by(_wd.c.url, _wd.c.status)
# Pending deliveries and when the oldest of them was written (the gauges).
WEBHOOK_PENDING = sa.select(sa.func.count(), sa.func.min(_wd.c.created_at)).where(_wd.c.status == "pending")
# A page of deliveries, newest first, one more than :limit (filters and cursor added at the call).
WEBHOOK_PAGE = sa.select(_wd).order_by(_wd.c.id.desc()).limit(sa.bindparam("limit"))
# Every endpoint's disabled state.
WEBHOOK_ENDPOINTS = sa.select(_we)
# Disable an endpoint (410 Gone), per dialect: a row per URL.
_disable_pg, _disable_sqlite = postgresql.insert(_we), sqlite.insert(_we)
DISABLE_WEBHOOK_ENDPOINT = {
    "postgresql": _disable_pg.on_conflict_do_update(
        index_elements=["url"],
        set_={"disabled_at": _disable_pg.excluded.disabled_at, "disabled_reason": _disable_pg.excluded.disabled_reason},
    ),
    "sqlite": _disable_sqlite.on_conflict_do_update(
        index_elements=["url"],
        set_={
            "disabled_at": _disable_sqlite.excluded.disabled_at,
            "disabled_reason": _disable_sqlite.excluded.disabled_reason,
        },
    ),
}
# Enable an endpoint again.
ENABLE_WEBHOOK_ENDPOINT = (
    _we.update().where(_we.c.url == sa.bindparam("endpoint"), _we.c.disabled_at.is_not(None)).values(disabled_at=None)
)
# Events of a window, with their message, for replay (types and order added at the call).
REPLAY_EVENTS = (
    sa.select(events.c.id, events.c.queue_id, events.c.recipient, events.c.at, events.c.type, events.c.details)
    .where(events.c.at >= sa.bindparam("since"), events.c.at < sa.bindparam("until"))
    .order_by(events.c.at, events.c.id)
)
# Suppression list changes of a window, for replay.
REPLAY_SUPPRESSION_CHANGES = (
    sa.select(suppression_audit)
    .where(suppression_audit.c.at >= sa.bindparam("since"), suppression_audit.c.at < sa.bindparam("until"))
    .order_by(suppression_audit.c.id)
)

# -- health

# The cheapest round trip.
PING = sa.text("SELECT 1")

# -- several nodes: the node registry, dead nodes' leases, wake-ups, per_domain across the cluster

# Register a node (or register it again: a row left from an earlier life of the same name).
_node_pg, _node_sqlite = postgresql.insert(nodes), sqlite.insert(nodes)
_NODE_FIELDS = ("host", "pid", "version", "started_at", "heartbeat_at", "heartbeat", "in_flight")
INSERT_NODE = {
    "postgresql": _node_pg.on_conflict_do_update(
        index_elements=["name"],
        set_={**{f: _node_pg.excluded[f] for f in _NODE_FIELDS}, "stopped_at": None, "released_at": None},
    ),
    "sqlite": _node_sqlite.on_conflict_do_update(
        index_elements=["name"],
        set_={**{f: _node_sqlite.excluded[f] for f in _NODE_FIELDS}, "stopped_at": None, "released_at": None},
    ),
}
_BEAT: dict[str, Any] = {"heartbeat_at": sa.bindparam("now"), "heartbeat": sa.bindparam("interval"),
         "in_flight": sa.bindparam("in_flight"), "released_at": None}  # fmt: skip
# A heartbeat of a node that was taken for dead (its leases freed): alive again (rowcount 1).
REVIVE_NODE = (
    nodes.update()
    .where(nodes.c.name == sa.bindparam("node"), nodes.c.released_at.is_not(None), nodes.c.stopped_at.is_(None))
    .values(**_BEAT)
)
# A heartbeat (rowcount 0: the row is gone, register again).
BEAT_NODE = nodes.update().where(nodes.c.name == sa.bindparam("node")).values(**_BEAT)
# A clean shutdown, after delivery gave its leases back.
STOP_NODE = (
    nodes.update().where(nodes.c.name == sa.bindparam("node")).values(stopped_at=sa.bindparam("now"), in_flight=0)
)
# Every node, oldest first (`relay nodes`, the dashboard).
NODES = sa.select(nodes).order_by(nodes.c.started_at, nodes.c.name)
# Running nodes whose leases nobody has freed, but :name: the ones to watch for silence (the
# claim adds FOR UPDATE SKIP LOCKED on PostgreSQL: one live node frees a dead one's leases).
WATCHED_NODES = sa.select(nodes.c.name, nodes.c.heartbeat_at, nodes.c.heartbeat).where(
    nodes.c.stopped_at.is_(None), nodes.c.released_at.is_(None), nodes.c.name != sa.bindparam("node")
)
# Mark a dead node's leases freed, so that no node frees them again.
NODE_RELEASED = nodes.update().where(nodes.c.name == sa.bindparam("node")).values(released_at=sa.bindparam("now"))
# Rows of nodes stopped, or silent, since before :before.
FORGET_NODES = nodes.delete().where(sa.func.coalesce(nodes.c.stopped_at, nodes.c.heartbeat_at) < sa.bindparam("before"))
# A dead node's leased recipients, due at once (RELEASE's rule: queued if never attempted, else
# deferred), returning them.
RELEASE_DEAD = (
    recipients.update()
    .where(recipients.c.status == SENDING, recipients.c.lease_owner == sa.bindparam("owner"))
    .values(
        status=sa.case((recipients.c.attempts == 0, QUEUED), else_=DEFERRED),
        next_attempt_at=sa.bindparam("now"),
        lease_owner=None,
        updated_at=sa.bindparam("now"),
    )
    .returning(recipients.c.id)
)
# A dead node's leased webhook deliveries, due at once (the dispatcher leases under the node's name).
RELEASE_DEAD_WEBHOOKS = (
    webhook_deliveries.update()
    .where(webhook_deliveries.c.status == "pending", webhook_deliveries.c.lease_owner == sa.bindparam("owner"))
    .values(lease_owner=None, next_attempt_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
)
# Wake every node's delivery (PostgreSQL; sent on commit, once per transaction and payload).
DUE_CHANNEL = "relay_due"
NOTIFY_DUE = sa.select(sa.func.pg_notify(DUE_CHANNEL, ""))
# Serialize claims across nodes until commit (PostgreSQL), so that each counts the others'
# transactions in flight. The two-key form: its key space is apart from ENGAGEMENT_LOCK's.
CLAIM_LOCK = sa.select(sa.func.pg_advisory_xact_lock(0x52454C59, 1))
# Migrations: nodes started together on a fresh database take turns (the second finds it done).
MIGRATION_LOCK = sa.select(sa.func.pg_advisory_xact_lock(0x52454C59, 3))


def _in_flight(alone: bool) -> sa.Select[Any]:
    """SMTP transactions in flight per domain, every node's: leased recipients whose lease runs,
    one transaction per message and domain, or per recipient for a tracked message (and, with
    ``alone``, VERP, any message but Relay's own DSNs from <>), as delivery.job_key groups them."""
    r, m = recipients, messages
    single = m.c.track != ""
    if alone:
        single = sa.or_(single, m.c.mail_from != "")
    key = sa.case((single, sa.cast(r.c.id, sa.Text)), else_=r.c.queue_id)
    return (
        sa.select(r.c.domain, sa.func.count(sa.distinct(key)))
        .join(m, m.c.queue_id == r.c.queue_id)
        .where(r.c.status == SENDING, r.c.next_attempt_at > sa.bindparam("now"))
        .group_by(r.c.domain)
    )


IN_FLIGHT_BY_DOMAIN = {alone: _in_flight(alone) for alone in (False, True)}
