"""The JSON shapes, written once: pydantic models that the API validates its answers against and
publishes in its OpenAPI document, and the functions that build them from relay.model records.

``relay log --json`` and ``relay stats --json`` print what these functions build, so the CLI and
the API cannot drift apart. Imports pydantic, not FastAPI: the CLI imports this module alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from relay.model import MessageView, StatsRow, iso


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


class RetryRequest(BaseModel, extra="forbid"):
    reason: str = Field("", max_length=1000, description="Why; logged with the retried events")


class RetryResult(BaseModel):
    id: str
    retried: int = Field(description="Recipients made due now")


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
