"""The JSON shapes, written once: pydantic models that the API validates its answers against and
publishes in its OpenAPI document, and the functions that build them from relay.model records.

``relay log --json`` and ``relay stats --json`` print what these functions build, so the CLI and
the API cannot drift apart. So does `relay suppressions`: its input (an address, an expiry, a CSV
row) passes the same checks as the API's. Imports pydantic, not FastAPI: the CLI imports this
module alone."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from relay.model import (
    AuditEntry,
    CaseView,
    MessageView,
    StatsRow,
    Suppression,
    SuppressionChange,
    SuppressionOrigin,
    SuppressionReason,
    iso,
    suppression_key,
)
from relay.model import CaseEntry as CaseEntryView

if TYPE_CHECKING:
    from relay.store.webhooks import Delivery


class Recipient(BaseModel):
    address: str
    status: str
    attempts: int
    next_attempt_at: str | None
    last_response: str | None


# at, type and recipient, and beside them the event's details, which vary by type. (A comment,
# not a docstring: pydantic would publish a docstring in the OpenAPI document.)
class Event(BaseModel, extra="allow"):
    at: str
    type: str
    recipient: str | None


class Message(BaseModel):
    id: str  # the queue id
    message_id: str  # the Message-ID header, without <>
    mail_from: str
    subject: str
    size: int
    tags: list[str]
    user: str | None
    client_ip: str
    received_at: str
    recipients: list[Recipient]
    events: list[Event]


class MessagePage(BaseModel):
    messages: list[Message]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")
    total: int | None = Field(
        default=None, description="With `q`: messages matching (every page), at most 10,000; else null"
    )
    total_capped: bool = Field(default=False, description="True: more than `total` match")


def _case_id() -> Any:
    return Field(None, ge=1, le=2**63 - 1, description="The case this action belongs to (its trail records it)")


_NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: 422, not a 500


class RetryRequest(BaseModel, extra="forbid"):
    reason: str = Field("", max_length=1000, pattern=_NO_NUL, description="Why; logged with the retried events")
    case_id: int | None = _case_id()


class RetryResult(BaseModel):
    id: str
    retried: int = Field(description="Recipients made due now")


# -- support actions on a message


class ActionRequest(BaseModel, extra="forbid"):
    reason: str = Field("", max_length=1000, pattern=_NO_NUL, description="Why; logged with the events")
    case_id: int | None = _case_id()


class CaseRef(BaseModel, extra="forbid"):
    case_id: int | None = _case_id()


class ResendRequest(BaseModel, extra="forbid"):
    address: str = Field(max_length=320, pattern=_NO_NUL, description="The recipient of this message to send again")
    new_address: str = Field(
        max_length=320, pattern=_NO_NUL, description="Where to send it now (the corrected address)"
    )
    reason: str = Field("", max_length=1000, pattern=_NO_NUL)
    case_id: int | None = _case_id()


class NoteRequest(BaseModel, extra="forbid"):
    text: str = Field(min_length=1, max_length=10_000, pattern=_NO_NUL, description="The note, shown on the timeline")
    case_id: int | None = _case_id()


class UnsuppressRecipientRequest(BaseModel, extra="forbid"):
    address: str = Field(max_length=320, pattern=_NO_NUL, description="The recipient whose own entry to remove")
    reason: str = Field("", max_length=1000, pattern=_NO_NUL, description="Why (required for a complaint's entry)")
    case_id: int | None = _case_id()


class ActionResult(BaseModel):
    id: str
    action: Literal["cancel", "release", "discard", "note", "unsuppress"]
    count: int = Field(description="Recipients it changed (a note: 0)")


class ResendResult(BaseModel):
    id: str
    new_id: str = Field(description="The queue id of the new message")


class Counts(BaseModel):
    human: int
    machine: int


class Latency(BaseModel):
    p50: float | None
    p95: float | None


class StatsGroup(BaseModel):
    group: str | None
    received: int
    delivered: int = Field(description="Recipients whose latest outcome in the window is delivered")
    deferred: int = Field(description="Recipients deferred at least once in the window")
    bounced: int = Field(description="Recipients whose latest outcome in the window is bounced")
    expired: int = Field(description="Recipients whose latest outcome in the window is expired")
    deferrals: int = Field(description="Deferred attempts in the window")
    complained: int = Field(description="Recipients who complained (an ARF report) in the window")
    suppressed: int = Field(description="Recipients whose latest outcome in the window is suppressed (not attempted)")
    unique_opens: Counts
    unique_clicks: Counts
    delivery_latency_seconds: Latency


class Stats(BaseModel):
    since: str
    until: str
    group_by: str
    groups: list[StatsGroup]


class Problem(BaseModel):
    detail: Any


def _at(ts: float) -> str:
    text = iso(ts)
    assert text is not None  # iso() is None only for None
    return text


def message(view: MessageView) -> Message:
    """A message as the API and ``relay log --json`` show it: ``id`` is the queue id, times are
    ISO-8601 UTC with milliseconds, each event's details sit beside its at/type/recipient."""
    return Message(
        id=view.queue_id,
        message_id=view.message_id,
        mail_from=view.mail_from,
        subject=view.subject,
        size=view.size,
        tags=list(view.tags),
        user=view.user,
        client_ip=view.client_ip,
        received_at=_at(view.received_at),
        recipients=[
            Recipient(
                address=r.address,
                status=r.status,
                attempts=r.attempts,
                next_attempt_at=iso(r.next_attempt_at),
                last_response=r.last_response,
            )
            for r in view.recipients
        ],
        # the details first: a detail never overrides at, type or recipient
        events=[
            Event.model_validate({**e.details, "at": _at(e.at), "type": e.type, "recipient": e.recipient})
            for e in view.events
        ],
    )


def messages_json(views: Sequence[MessageView]) -> dict[str, Any]:
    """What ``relay log --json`` prints: ``{"messages": [...]}``, each as GET /api/v1/messages/{id} returns it."""
    return {"messages": [message(v).model_dump(mode="json") for v in views]}


def stats(since: float, until: float, group_by: str, rows: Sequence[StatsRow]) -> Stats:
    """GET /api/v1/stats, and ``relay stats --json``."""
    return Stats(
        since=_at(since),
        until=_at(until),
        group_by=group_by,
        groups=[
            StatsGroup(
                group=r.group,
                received=r.received,
                delivered=r.delivered,
                deferred=r.deferred,
                bounced=r.bounced,
                expired=r.expired,
                deferrals=r.deferrals,
                complained=r.complained,
                suppressed=r.suppressed,
                unique_opens=Counts(human=r.unique_opens, machine=r.unique_opens_machine),
                unique_clicks=Counts(human=r.unique_clicks, machine=r.unique_clicks_machine),
                delivery_latency_seconds=Latency(p50=r.latency_p50, p95=r.latency_p95),
            )
            for r in rows
        ],
    )


# -- suppression

SUPPRESSION_NOTE_MAX = 1000  # characters of a note or a removal's reason
_EXPIRY_HORIZON = 100 * 365 * 86400.0  # seconds: an expiry further out than that is a typo, or "never"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{1,32}$")


def suppression_address(text: str) -> str:
    """A suppression key (lower case) from what a person typed: a mailbox with the syntax Relay
    accepts at RCPT, or ``*@domain``. ValueError, saying why, for anything else."""
    text = text.strip()
    if len(text) > 320 or _CONTROL.search(text) or not _utf8(text):
        raise ValueError("not a mailbox or *@domain")
    from relay.smtp_in import valid_address  # the RCPT rule: Relay suppresses what it could have accepted

    mailbox = "x" + text[1:] if text.startswith("*@") else text  # a domain entry: its domain, checked alone
    if not valid_address(mailbox):
        raise ValueError("not a mailbox or *@domain")
    return suppression_key(text)


def suppression_text(text: str) -> str:
    """A note or a reason as stored: no NUL (PostgreSQL text cannot hold it), UTF-8 only."""
    if "\x00" in text or not _utf8(text):
        raise ValueError("must be UTF-8 text without NUL characters")
    return text


def expiry(value: datetime, now: float) -> float:
    """An expiry time in seconds, checked: in the future, within a century. A time without a
    zone is UTC."""
    at = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
    if at <= now:
        raise ValueError("must be in the future")
    if at > now + _EXPIRY_HORIZON:
        raise ValueError("must be within 100 years (leave it out for an entry that never expires)")
    return at


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: "\udc80" in JSON
        return False
    return True


class SuppressionEntry(BaseModel):
    address: str = Field(description="A mailbox, or `*@domain` for a whole domain; lower case")
    reason: SuppressionReason
    origin: SuppressionOrigin
    source_queue_id: str | None = Field(description="The message whose bounce or complaint added it")
    created_at: str
    expires_at: str | None = Field(description="When it stops counting; null: never")
    note: str


class SuppressionPage(BaseModel):
    suppressions: list[SuppressionEntry]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class _AddressAndNote(BaseModel, extra="forbid"):
    """What every suppression input checks the same way: an address (a mailbox or ``*@domain``)
    and a note (no NUL, no control characters). The subclasses declare the fields, in their order."""

    @field_validator("address", check_fields=False)
    @classmethod
    def _address(cls, value: str) -> str:
        return suppression_address(value)

    @field_validator("note", check_fields=False)
    @classmethod
    def _note(cls, value: str) -> str:
        return suppression_text(value)


class SuppressionRequest(_AddressAndNote):
    address: str = Field(
        max_length=320,
        pattern="@",
        description="A mailbox, or `*@domain` for a whole domain",
        examples=["jane@example.com", "*@example.org"],
    )
    note: str = Field("", max_length=SUPPRESSION_NOTE_MAX, examples=["asked by phone, ticket 4411"])
    expires_at: datetime | None = Field(
        None, description="ISO-8601, in the future; leave out for never", examples=["2027-01-01T00:00:00Z"]
    )

    @field_validator("expires_at")
    @classmethod
    def _expires_at(cls, value: datetime | None) -> datetime | None:
        if value is not None:
            expiry(value, time.time())
        return value


class UnsuppressRequest(BaseModel, extra="forbid"):
    reason: str = Field(
        "", max_length=SUPPRESSION_NOTE_MAX, description="Why; required when the entry is a complaint's"
    )

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        return suppression_text(value)


class SuppressionCheck(BaseModel):
    address: str = Field(description="The address asked about, as given")
    suppressed: bool
    entry: SuppressionEntry | None = Field(description="The entry that applies: the address's own, else its domain's")


class SuppressionChangeEntry(BaseModel):
    at: str
    address: str
    action: Literal["added", "removed"]
    reason: str = Field(description="The entry's reason when added; why, when removed")
    origin: SuppressionOrigin
    actor: str = Field(description="Who: a CLI user, `api:` and a token's fingerprint, `delivery`, `bounces`")
    source_queue_id: str | None
    note: str


class SuppressionAudit(BaseModel):
    changes: list[SuppressionChangeEntry]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


# A row of `relay suppressions import`: the columns of `relay suppressions export`, all but
# `address` optional (empty cells count as absent).
class SuppressionRow(_AddressAndNote):
    address: str = Field(max_length=320)
    reason: SuppressionReason = "manual"
    origin: SuppressionOrigin = "cli"
    source_queue_id: str | None = Field(None, pattern=_QUEUE_ID.pattern)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    note: str = Field("", max_length=SUPPRESSION_NOTE_MAX)

    @field_validator("created_at")
    @classmethod
    def _created_at(cls, value: datetime | None) -> datetime | None:
        if value is not None and not 0 <= _utc(value) <= time.time() + 86400:  # a day of clock skew
            raise ValueError("must be between 1970 and now")
        return value

    @field_validator("expires_at")
    @classmethod
    def _expires_at(cls, value: datetime | None) -> datetime | None:
        # one in the past is no error: the import skips it (an export read back a while later)
        if value is not None and _utc(value) > time.time() + _EXPIRY_HORIZON:
            raise ValueError("must be within 100 years (leave it empty for an entry that never expires)")
        return value

    def entry(self, now: float) -> Suppression:
        """The entry: created now unless the row says when; times without a zone are UTC."""
        return Suppression(
            address=self.address,
            reason=self.reason,
            origin=self.origin,
            source_queue_id=self.source_queue_id,
            created_at=now if self.created_at is None else _utc(self.created_at),
            expires_at=None if self.expires_at is None else _utc(self.expires_at),
            note=self.note,
        )


SUPPRESSION_CSV_COLUMNS = tuple(SuppressionRow.model_fields)  # the header `relay suppressions export` writes


def suppression_row(cells: Mapping[str, str], now: float) -> Suppression | list[str]:
    """The entry a CSV row of `relay suppressions import` describes (cells by column; empty
    ones count as absent), or its problems, each "column: what is wrong"."""
    try:
        row = SuppressionRow.model_validate({k: v for k, v in cells.items() if v != ""})
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
    return row.entry(now)


def _utc(value: datetime) -> float:
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()


def suppression_entry(e: Suppression) -> SuppressionEntry:
    return SuppressionEntry.model_validate(e.to_json())


def suppression_change(c: SuppressionChange) -> SuppressionChangeEntry:
    return SuppressionChangeEntry.model_validate(c.to_json())


# -- sending over HTTP (POST /api/v1/messages)

MAX_SEND_LIST = 1000  # entries in to, cc, bcc, headers, attachments: a bound on hostile input; the real limit is
# [smtp] max_recipients


class SendAttachment(BaseModel, extra="forbid"):
    filename: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f/\\]+$")
    content_type: str = Field("application/octet-stream", max_length=129, examples=["application/pdf"])
    content: str = Field(description="The file, base64")


# Either `raw` (with `mail_from` and `to`: the envelope), or the parts of a message that Relay
# builds: `from` is the envelope sender and From:, the envelope recipients are to + cc + bcc.
class SendRequest(BaseModel, extra="forbid", populate_by_name=True):
    raw: str | None = Field(None, description="A whole RFC 5322 message, base64; sent as it is")
    mail_from: str | None = Field(None, max_length=320, description="With `raw`: the envelope sender")
    from_: str | None = Field(
        None, alias="from", max_length=998, description="`addr` or `Name <addr>`", examples=["Shop <shop@example.com>"]
    )
    to: list[str] = Field(default_factory=list, max_length=MAX_SEND_LIST, examples=[["jane@example.net"]])
    cc: list[str] = Field(default_factory=list, max_length=MAX_SEND_LIST)
    bcc: list[str] = Field(default_factory=list, max_length=MAX_SEND_LIST, description="Envelope only, never shown")
    reply_to: str | None = Field(None, max_length=998)
    subject: str = Field("", max_length=998)
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, max_length=MAX_SEND_LIST, description="Extra fields")
    tags: list[str] = Field(default_factory=list, description="At most 20, 100 characters each (X-Relay-Tag)")
    attachments: list[SendAttachment] = Field(default_factory=list, max_length=MAX_SEND_LIST)
    track: str | None = Field(None, max_length=100, examples=["opens,clicks"], description="As X-Relay-Track")


class SendResult(BaseModel):
    id: str = Field(description="The queue id")
    message_id: str = Field(description="The Message-ID header, without <>")


# -- webhooks


class WebhookDelivery(BaseModel):
    id: int = Field(description="The delivery's id (POST .../deliveries/{id}/retry)")
    webhook_id: str = Field(description="The webhook-id header: the same on every attempt and for every endpoint")
    url: str
    type: str
    event_at: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: str | None = Field(description="When it is due (pending only)")
    last_status: int | None = Field(description="The receiver's HTTP status on the last attempt, if it answered")
    last_error: str | None
    created_at: str
    updated_at: str
    queue_id: str | None = Field(None, description="The message a message.* event is about (null: suppression.*)")


class WebhookDeliveryPage(BaseModel):
    deliveries: list[WebhookDelivery]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class WebhookRetryResult(BaseModel):
    id: int
    status: Literal["pending"] = Field(description="Due now")


def webhook_delivery(d: Delivery) -> WebhookDelivery:
    return WebhookDelivery.model_validate(d.to_json())


# -- cases and the access audit (relay/http/cases.py, relay audit, the console's exports)


class CaseEntry(BaseModel):
    id: int
    case_id: int
    at: str
    actor: str
    kind: str = Field(description="incident, interaction, action, escalation, resolution, confirmation or feedback")
    details: dict[str, Any]
    hash: str = Field(description="SHA-256 chaining the entry to the one before it (`relay audit verify`)")


class CaseMessage(BaseModel):
    id: str  # the queue id
    subject: str
    mail_from: str
    received_at: str
    recipients: list[Recipient] = Field(description="Live states")


class Case(BaseModel):
    id: int
    title: str
    customer_ref: str
    owner: str
    state: str = Field(description="open, action_taken, resolved, confirmed, escalated or closed_unresolved")
    opened_by: str
    opened_at: str
    updated_at: str
    closed_reason: str
    queue_ids: list[str]
    overdue: bool = Field(description="Open longer than [console] case_sla and not closed")
    entries: list[CaseEntry] | None = Field(None, description="The trail, oldest first (one case only)")
    messages: list[CaseMessage] | None = Field(None, description="The messages covered (one case only)")


class CasePage(BaseModel):
    cases: list[Case]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class CaseRequest(BaseModel, extra="forbid"):
    title: str = Field(min_length=1, max_length=200)
    customer_ref: str = Field("", max_length=200, description="The customer's ticket id")
    owner: str = Field("", max_length=200)
    queue_ids: list[str] = Field(default_factory=list, max_length=500, description="The messages it covers")
    incident: str = Field(
        "", max_length=20000, description="What went wrong; empty: summarized from the messages' failures"
    )


# kind, and beside it the entry's details: interaction {channel, summary}, escalation {to, why},
# resolution {summary}, confirmation {how}, feedback {score, comment}, incident {summary}.
class CaseEntryRequest(BaseModel, extra="allow"):
    kind: str = Field(max_length=20, examples=["interaction"])


class CloseRequest(BaseModel, extra="forbid"):
    reason: str = Field(min_length=1, max_length=4000)


class AuditLine(BaseModel):
    id: int
    at: str
    actor: str
    ip: str
    action: str
    target: str
    details: dict[str, Any]
    hash: str


def case_entry(e: CaseEntryView) -> CaseEntry:
    return CaseEntry(id=e.id, case_id=e.case_id, at=_at(e.at), actor=e.actor, kind=e.kind, details=dict(e.details),
                     hash=e.hash)  # fmt: skip


def case(view: CaseView, *, entries: bool = False, messages: Sequence[MessageView] | None = None) -> Case:
    """A case as the API shows it (and the console exports it): with its trail when ``entries``,
    with its messages' live recipient states when ``messages`` is given."""
    return Case(
        id=view.id, title=view.title, customer_ref=view.customer_ref, owner=view.owner, state=view.state,
        opened_by=view.opened_by, opened_at=_at(view.opened_at), updated_at=_at(view.updated_at),
        closed_reason=view.closed_reason, queue_ids=list(view.queue_ids), overdue=view.overdue,
        entries=[case_entry(e) for e in view.entries] if entries else None,
        messages=None if messages is None else [
            CaseMessage(id=m.queue_id, subject=m.subject, mail_from=m.mail_from, received_at=_at(m.received_at),
                        recipients=message(m).recipients)
            for m in messages
        ],
    )  # fmt: skip


def audit_line(a: AuditEntry) -> AuditLine:
    return AuditLine(id=a.id, at=_at(a.at), actor=a.actor, ip=a.ip, action=a.action, target=a.target,
                     details=dict(a.details), hash=a.hash)  # fmt: skip
