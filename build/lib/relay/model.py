"""Plain records that cross module boundaries: what intake stores, what delivery claims,
what an attempt decided, and what a lookup shows. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

# Recipient states, defined once. A recipient is due when next_attempt_at <= now; final ones have none.
RecipientState = Literal[
    "queued", "deferred", "sending", "held", "delivered", "bounced", "expired", "suppressed", "cancelled"
]  # fmt: skip
STATES: Final[tuple[RecipientState, ...]] = get_args(RecipientState)
QUEUED: Final = "queued"
DEFERRED: Final = "deferred"
SENDING: Final = "sending"
HELD: Final = "held"  # hold mode ([delivery] hold): kept in the queue, never due, until released or discarded
DELIVERED: Final = "delivered"
BOUNCED: Final = "bounced"
EXPIRED: Final = "expired"
SUPPRESSED: Final = "suppressed"
CANCELLED: Final = "cancelled"
ACTIVE_STATES: Final = (QUEUED, DEFERRED, SENDING, HELD)
FINAL_STATES: Final = (DELIVERED, BOUNCED, EXPIRED, SUPPRESSED, CANCELLED)
# The one retry rule (`relay queue retry ID`, POST /api/v1/messages/{id}/retry): a message's
# recipients in these states become due now. Delivered, suppressed and cancelled ones never do.
RETRY_STATES: Final = (QUEUED, DEFERRED, EXPIRED, BOUNCED)
# `relay queue retry --all` touches only these: retrying every bounce ever would mail addresses
# that refused mail, possibly years ago.
RETRY_ALL_STATES: Final = (QUEUED, DEFERRED)

# Event types, defined once: fixed names, so later features add types rather than rename them.
EventType = Literal[
    "received", "delivered", "deferred", "bounced", "expired", "suppressed",
    "cancelled", "opened", "clicked", "complained", "retried", "noted",
    "held", "released", "resent", "commented", "unsuppressed", "body_purged",
]  # fmt: skip
# "noted": a report that changes nothing (an auto-reply, a "delivered" DSN, a not-spam report).
# Support's actions (the console, the API): "held" (hold mode kept it at intake), "released"
# (held -> queued), "resent" (on the old message: sent again to a corrected address, details
# name the new queue id; the new message's "received" details carry "resend_of"),
# "commented" (a support note), "unsuppressed" (the recipient's suppression lifted from here).
# Every action's details carry "by" (the actor) and, when done from a case, "case_id".
# "body_purged": retention deleted the raw message ([retention] bodies); the timeline stays.
EVENT_TYPES: Final[tuple[EventType, ...]] = get_args(EventType)


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch -> ISO-8601 UTC with milliseconds, e.g. 2026-11-23T12:00:00.123Z."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def header_section(message: bytes) -> bytes:
    """A message's header section, with its final CRLF (the whole of it when it has no body)."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message accepted at intake, ready to be stored in one transaction."""

    queue_id: str
    message_id: str  # the Message-ID header, without <>
    mail_from: str
    recipients: tuple[str, ...]
    subject: str
    tags: tuple[str, ...]
    user: str | None
    client_ip: str
    received_at: float
    raw: bytes
    details: Mapping[str, Any] = field(default_factory=dict)  # for the "received" event
    track: str = ""  # "", "opens", "clicks" or "opens,clicks"
    links: tuple[str, ...] = ()  # trackable URLs of its HTML, in order (a click token names the position)

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A recipient leased to one delivery worker."""

    recipient_id: int
    queue_id: str
    address: str
    domain: str
    attempts: int  # attempts made before this one
    mail_from: str
    received_at: float
    track: str = ""
    size: int = 0  # the message's, in bytes
    suppressed: Suppression | None = None  # set when the claim found it suppressed and ended it instead


@dataclass(frozen=True, slots=True)
class TrackTarget:
    """What a tracking token points at."""

    queue_id: str
    address: str
    delivered_at: float | None
    url: str | None  # for clicks


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt decided for one recipient; the store writes it as given."""

    recipient_id: int
    queue_id: str
    address: str
    status: str  # delivered | deferred | bounced | expired | ...
    attempts: int
    next_attempt_at: float | None
    last_response: str
    event: EventType
    details: Mapping[str, Any]
    at: float
    suppress: Suppression | None = None  # a hard bounce's entry, added in the same transaction
    notify: NewMessage | None = None  # a DSN to the sender, queued in the same transaction (if still leased)


@dataclass(frozen=True, slots=True)
class RecipientView:
    address: str
    status: str
    attempts: int
    next_attempt_at: float | None
    last_response: str | None


@dataclass(frozen=True, slots=True)
class EventView:
    """One event of a message's timeline, as read back, or as given to bulk import."""

    at: float
    type: EventType
    recipient: str | None
    details: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class MessageView:
    """A message as support sees it: envelope, recipients' states and the timeline."""

    queue_id: str
    message_id: str  # the Message-ID header, without <>
    mail_from: str
    subject: str
    size: int
    tags: tuple[str, ...]
    user: str | None
    client_ip: str
    received_at: float
    recipients: tuple[RecipientView, ...]
    events: tuple[EventView, ...]


@dataclass(frozen=True, slots=True)
class QueueSummary:
    counts: Mapping[str, int]  # every state, zero included
    oldest_queued_at: float | None  # received_at of the oldest message still active


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One active recipient, as ``relay queue list`` shows it (like a line of Postfix mailq)."""

    queue_id: str
    received_at: float
    recipient: str
    state: str  # queued | deferred | sending
    attempts: int
    next_attempt_at: float | None  # due time; the lease expiry while sending
    last_response: str | None

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "received_at": iso(self.received_at),
            "age_seconds": round(max(0.0, now - self.received_at), 3),
            "recipient": self.recipient,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at),
            "last_response": self.last_response,
        }


@dataclass(frozen=True, slots=True)
class Imported:
    """A message with its recipients' states and events, for bulk import (migrations,
    benchmarks): written as given, no delivery decisions."""

    message: NewMessage
    status: str
    attempts: int
    next_attempt_at: float | None
    last_response: str | None
    events: tuple[EventView, ...]


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One group of ``LogStore.stats``: what happened in the window, counted in recipients
    (a recipient retried and bounced again is one bounce), except ``deferrals``."""

    group: str | None
    received: int
    delivered: int  # delivered, bounced, expired: recipients by their latest outcome in the window
    deferred: int  # recipients deferred at least once
    bounced: int
    expired: int
    deferrals: int  # deferred attempts
    complained: int  # recipients who complained (ARF) in the window
    suppressed: int  # recipients not attempted: on the suppression list
    unique_opens: int  # recipients who opened, human opens only
    unique_opens_machine: int  # recipients with machine opens (proxies, scanners)
    unique_clicks: int
    unique_clicks_machine: int
    latency_p50: float | None  # seconds from received to delivered
    latency_p95: float | None


# -- webhooks

# The webhook types (Standard Webhooks "type"), defined once: message events are
# "message." + the event type; the suppression list's additions and removals have their own.
WebhookType = Literal[
    "message.received", "message.delivered", "message.deferred", "message.bounced", "message.expired",
    "message.suppressed", "message.complained", "message.opened", "message.clicked", "message.retried",
    "message.cancelled", "message.held", "message.released", "message.resent",
    "suppression.created", "suppression.deleted",
]  # fmt: skip
# Events with no webhook of their own: a report that changes nothing, support's notes, and a
# lifted suppression (which has suppression.deleted).
NO_WEBHOOK_EVENTS: Final = frozenset({"noted", "commented", "unsuppressed", "body_purged"})
WEBHOOK_TYPES: Final[tuple[WebhookType, ...]] = get_args(WebhookType)

# -- suppression

SuppressionReason = Literal["hard_bounce", "complaint", "manual"]
SUPPRESSION_REASONS: Final[tuple[SuppressionReason, ...]] = get_args(SuppressionReason)
SuppressionOrigin = Literal["bounce", "complaint", "api", "cli"]
SUPPRESSION_ORIGINS: Final[tuple[SuppressionOrigin, ...]] = get_args(SuppressionOrigin)


def suppression_key(address: str) -> str:
    """How an address is stored and compared on the suppression list: lower case, whole
    (``*@domain`` for a domain entry)."""
    return address.strip().lower()


@dataclass(frozen=True, slots=True)
class Suppression:
    """An address (or ``*@domain``) Relay does not send to."""

    address: str  # suppression_key form
    reason: SuppressionReason
    origin: SuppressionOrigin
    source_queue_id: str | None
    created_at: float
    expires_at: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "reason": self.reason,
            "origin": self.origin,
            "source_queue_id": self.source_queue_id,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class SuppressionChange:
    """One line of the suppression audit trail: who added or removed which entry, when, why."""

    at: float
    address: str
    action: Literal["added", "removed"]
    reason: str  # the entry's reason when added; why, when removed
    origin: SuppressionOrigin
    actor: str
    source_queue_id: str | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "address": self.address,
            "action": self.action,
            "reason": self.reason,
            "origin": self.origin,
            "actor": self.actor,
            "source_queue_id": self.source_queue_id,
            "note": self.note,
        }


# -- reports that come back to the bounce listener

ReportResult = Literal["matched", "unmatched", "not_a_bounce"]


@dataclass(frozen=True, slots=True)
class ReportTarget:
    """The recipient a report is about (named by a return path or X-Relay-Ref token), as the
    store has it when the report is recorded."""

    recipient_id: int
    queue_id: str
    address: str
    status: str
    mail_from: str
    received_at: float
    headers: bytes | None = None  # the original's header section, when a DSN to the sender may be needed
    reports: int = 0  # reports kept for this recipient so far


@dataclass(frozen=True, slots=True)
class ReportEvent:
    """An event a report causes (the store adds ``report_id`` to its details)."""

    queue_id: str
    recipient: str
    type: EventType
    details: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ReportDecision:
    """What one report does, decided from its targets inside the recording transaction."""

    kind: str  # dsn | arf | auto_reply | bounce | unknown
    result: ReportResult
    events: tuple[ReportEvent, ...] = ()
    bounce: tuple[tuple[int, str], ...] = ()  # (recipient id, last response): delivered -> bounced
    suppress: tuple[Suppression, ...] = ()
    notify: tuple[NewMessage, ...] = ()  # DSNs to senders
    queue_id: str | None = None  # what the report row is filed under
    recipient: str | None = None
    keep: bool = True  # False: nothing is written (a report about nobody, or one too many)


@dataclass(frozen=True, slots=True)
class NewReport:
    """A report as it came to the bounce listener."""

    raw: bytes
    mail_from: str
    client_ip: str
    received_at: float


# -- the console: users, cases, the access audit

Role = Literal["smtp", "viewer", "support", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
CONSOLE_ROLES: Final[tuple[Role, ...]] = ("viewer", "support", "admin")  # may sign in; "smtp" may only send


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    created_at: float


CaseState = Literal["open", "action_taken", "resolved", "confirmed", "escalated", "closed_unresolved"]
CASE_STATES: Final[tuple[CaseState, ...]] = get_args(CaseState)
CLOSED_CASE_STATES: Final[tuple[CaseState, ...]] = ("confirmed", "closed_unresolved")
EntryKind = Literal["incident", "interaction", "action", "escalation", "resolution", "confirmation", "feedback"]
ENTRY_KINDS: Final[tuple[EntryKind, ...]] = get_args(EntryKind)


@dataclass(frozen=True, slots=True)
class CaseEntry:
    """One line of a case's append-only trail. ``hash`` chains it to the entry before it."""

    id: int
    case_id: int
    at: float
    actor: str
    kind: EntryKind
    details: Mapping[str, Any]
    hash: str


@dataclass(frozen=True, slots=True)
class CaseView:
    id: int
    title: str
    customer_ref: str
    owner: str
    state: CaseState
    opened_by: str
    opened_at: float
    updated_at: float
    closed_reason: str
    queue_ids: tuple[str, ...]
    entries: tuple[CaseEntry, ...] = ()  # empty in lists; whole on a case's own page
    overdue: bool = False  # open past [console] case_sla


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the access audit: who did what, when, from where. Append-only, hash-chained."""

    id: int
    at: float
    actor: str
    ip: str
    action: str  # signin, signin_failed, signout, view_body, download, action.retry, case.entry, ...
    target: str  # what it was done to: a queue id, "case:12", a user name; "" for none
    details: Mapping[str, Any]
    hash: str


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of a search (relay.search grammar), newest first."""

    messages: tuple[MessageView, ...]
    total: int  # messages matching, counted up to a cap
    total_capped: bool  # True: there are more than ``total``
    next: tuple[float, str] | None  # (received_at, queue id) to pass as ``after``; None: last page


# -- dashboard


@dataclass(frozen=True, slots=True)
class DashboardWindow:
    """What happened in the last ``seconds``: messages received; recipients by their latest
    outcome (delivered, bounced), deferred at least once, complained."""

    seconds: float
    received: int
    delivered: int
    deferred: int
    bounced: int
    complained: int

    @property
    def complaint_rate(self) -> float | None:
        """Complaints per delivered recipient; None before anything was delivered."""
        return self.complained / self.delivered if self.delivered else None


@dataclass(frozen=True, slots=True)
class TagRow:
    """One tag's last day: which emails get the most response. Rates are per delivered
    recipient (delivery rate: per recipient with an outcome); None when nothing to divide by."""

    tag: str | None  # None: messages without a tag
    received: int
    delivered: int
    bounced: int
    opened: int  # unique human opens
    opened_machine: int  # recipients with machine opens (proxies, scanners)
    clicked: int
    clicked_machine: int
    delivery_rate: float | None
    open_rate: float | None
    open_rate_machine: float | None
    click_rate: float | None
    click_rate_machine: float | None


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The console's front page, as of ``at``."""

    at: float
    hour: DashboardWindow
    day: DashboardWindow
    queue: Mapping[str, int]  # active recipients per state (ACTIVE_STATES, zero included)
    oldest_queued_age: float | None  # seconds since the oldest message still in the queue (held too) arrived
    tags: tuple[TagRow, ...]  # the last day, most received first


# -- several nodes on one store


@dataclass(frozen=True, slots=True)
class Node:
    """A Relay process registered in the store (``relay nodes``, the dashboard's node panels)."""

    name: str  # the lease owner its deliveries write
    host: str
    pid: int
    version: str
    started_at: float
    heartbeat_at: float
    heartbeat: float  # its heartbeat interval, seconds
    in_flight: int  # SMTP transactions out at its last heartbeat
    stopped_at: float | None  # a clean shutdown

    def alive(self, now: float) -> bool:
        """Running and heard from within 3 heartbeat intervals."""
        return self.stopped_at is None and now - self.heartbeat_at <= 3 * self.heartbeat

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "name": self.name, "host": self.host, "pid": self.pid, "version": self.version,
            "started": iso(self.started_at), "last_heartbeat": iso(self.heartbeat_at),
            "heartbeat_age_seconds": round(max(now - self.heartbeat_at, 0.0), 3), "in_flight": self.in_flight,
            "state": "stopped" if self.stopped_at is not None else "alive" if self.alive(now) else "dead",
        }  # fmt: skip


# -- retention


@dataclass(frozen=True, slots=True)
class RetentionCount:
    """What one kind of purge deleted (or, in a dry run, would delete)."""

    kind: str  # bodies | messages | webhook_deliveries | audit
    rows: int
    bytes: int  # bodies' and outbox bodies' bytes; 0 where rows have no size worth counting
