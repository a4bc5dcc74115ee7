"""The rules of cases, without I/O: what each kind of trail entry must say, which state an entry
moves a case to, and the incident summary written when a case is opened over failed messages.

    open ──action──> action_taken ──resolution──> resolved ──confirmation──> confirmed
      │                  ^   │                       │
      └──escalation──> escalated (from any open state; an action later -> action_taken)
    any open state ──close (a reason)──> closed_unresolved

Interactions and incidents change no state; feedback is welcome in every state, closed ones
included, and is all a confirmed or closed_unresolved case still takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, get_args

from relay.errors import Conflict
from relay.model import CLOSED_CASE_STATES, ENTRY_KINDS, CaseState, EntryKind, MessageView

Channel = Literal["email", "phone", "chat", "internal"]
CHANNELS: Final[tuple[Channel, ...]] = get_args(Channel)
# What an "action" entry says was done (relay.store.actions runs it and links it).
ACTIONS: Final = ("retry", "cancel", "resend", "unsuppress", "note", "release", "discard")
# Recipient states and event types an incident summary lists.
TROUBLE_STATES: Final = ("bounced", "expired", "deferred")

MAX_SHORT: Final = 200  # a title, a customer reference, an owner, an escalation's "to"
MAX_TEXT: Final = 4000  # a summary, a comment, a reason
MAX_INCIDENT: Final = 20000  # an incident summary (built from many recipients)
MAX_QUEUE_IDS: Final = 500  # messages one case covers


def text(value: Any, name: str, *, limit: int = MAX_TEXT, required: bool = True) -> str:
    """A text field, stripped; ValueError (readable) when absent and required, too long, or with a NUL."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text")
    if "\x00" in value:
        raise ValueError(f"{name} cannot contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode") from exc
    value = value.strip()
    if required and not value:
        raise ValueError(f"{name} is required")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    return str(value)


def _only(details: Mapping[str, Any], kind: str, allowed: Sequence[str]) -> None:
    extra = sorted(set(details) - set(allowed))
    if extra:
        raise ValueError(f"a {kind} entry has no field {', '.join(extra)} (it has {', '.join(allowed)})")


def _interaction(d: Mapping[str, Any]) -> dict[str, Any]:
    _only(d, "interaction", ("channel", "summary"))
    if d.get("channel") not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
    return {"channel": d["channel"], "summary": text(d.get("summary"), "summary")}


def _escalation(d: Mapping[str, Any]) -> dict[str, Any]:
    _only(d, "escalation", ("to", "why"))
    return {"to": text(d.get("to"), "to", limit=MAX_SHORT), "why": text(d.get("why"), "why")}


def _resolution(d: Mapping[str, Any]) -> dict[str, Any]:
    _only(d, "resolution", ("summary",))
    return {"summary": text(d.get("summary"), "summary")}


def _confirmation(d: Mapping[str, Any]) -> dict[str, Any]:
    _only(d, "confirmation", ("how",))
    return {"automatic": False, "how": text(d.get("how"), "how")}


def _feedback(d: Mapping[str, Any]) -> dict[str, Any]:
    _only(d, "feedback", ("score", "comment"))
    score = d.get("score")
    if isinstance(score, str) and score.strip().isdigit() and len(score.strip()) < 3:
        score = int(score.strip())  # from a form
    if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
        raise ValueError("score must be a whole number from 1 to 5")
    return {"score": score, "comment": text(d.get("comment"), "comment", required=False)}


def _incident(d: Mapping[str, Any]) -> dict[str, Any]:
    _only(d, "incident", ("summary",))
    return {"summary": text(d.get("summary"), "summary", limit=MAX_INCIDENT)}


def _action(d: Mapping[str, Any]) -> dict[str, Any]:
    """What relay.store.actions did, with what it needs to say (queue id, addresses, ...)."""
    if d.get("action") not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    return {k: text(v, k, required=False, limit=MAX_INCIDENT) if isinstance(v, str) else v for k, v in d.items()}


_VALIDATORS: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "interaction": _interaction,
    "escalation": _escalation,
    "resolution": _resolution,
    "confirmation": _confirmation,
    "feedback": _feedback,
    "incident": _incident,
    "action": _action,
}


def validate(kind: str, details: Mapping[str, Any]) -> dict[str, Any]:
    """The details of an entry of ``kind`` written by a person (or an action), checked and
    normalized. ValueError, with a message fit to show, when they are not right."""
    if kind not in ENTRY_KINDS:
        raise ValueError(f"unknown entry kind {kind!r} (one of {', '.join(ENTRY_KINDS)})")
    if not isinstance(details, Mapping):
        raise ValueError("details must be an object")
    return _VALIDATORS[kind](details)


def after(state: CaseState, kind: EntryKind) -> CaseState:
    """The state a case in ``state`` moves to with an entry of ``kind``. Conflict when the case
    takes no such entry any more (closed: only feedback)."""
    if kind == "feedback":
        return state
    if state in CLOSED_CASE_STATES:
        raise Conflict(f"the case is {state.replace('_', ' ')}: it takes only feedback now")
    match kind:
        case "action":
            return "action_taken"
        case "escalation":
            return "escalated"
        case "resolution":
            return "resolved"
        case "confirmation":
            return "confirmed"
        case _:  # incident, interaction
            return state


def close(state: CaseState) -> CaseState:
    """Closing without a resolution: Conflict when the case is closed already."""
    if state in CLOSED_CASE_STATES:
        raise Conflict(f"the case is {state.replace('_', ' ')} already")
    return "closed_unresolved"


def case_fields(title: Any, customer_ref: Any, owner: Any, queue_ids: Sequence[Any]) -> tuple[str, str, str, list[str]]:
    """A new case's fields, checked: (title, customer reference, owner, unique queue ids in order)."""
    ids: list[str] = []
    if isinstance(queue_ids, str):
        raise ValueError("queue_ids must be a list")
    for qid in queue_ids:
        value = text(qid, "a queue id", limit=32)
        if value not in ids:
            ids.append(value)
    if len(ids) > MAX_QUEUE_IDS:
        raise ValueError(f"a case covers at most {MAX_QUEUE_IDS} messages")
    return (
        text(title, "title", limit=MAX_SHORT),
        text(customer_ref, "customer_ref", limit=MAX_SHORT, required=False),
        text(owner, "owner", limit=MAX_SHORT, required=False),
        ids,
    )


def incident_summary(messages: Sequence[MessageView]) -> str:
    """What went wrong for these messages, one line per recipient that bounced, expired, is
    deferred or complained: its state, last response and the reason that matched. "" when
    nothing did."""
    lines: list[str] = []
    for m in messages:
        complained = {e.recipient for e in m.events if e.type == "complained"}
        why: dict[str | None, str] = {}
        for e in m.events:  # the latest reason per recipient wins
            if e.type in ("bounced", "expired", "deferred", "complained") and e.details.get("reason"):
                rule = e.details.get("rule")
                why[e.recipient] = str(e.details["reason"]) + (f" ({rule})" if rule else "")
        for r in m.recipients:
            states = [r.status] if r.status in TROUBLE_STATES else []
            if r.address in complained:
                states.append("complained")
            if not states:
                continue
            line = f"{m.queue_id} to {r.address}: {', '.join(states)}"
            if r.last_response:
                line += f"; last response: {r.last_response}"
            if why.get(r.address):
                line += f"; reason: {why[r.address]}"
            lines.append(line)
    summary = "\n".join(lines)
    return summary if len(summary) <= MAX_INCIDENT else summary[: MAX_INCIDENT - 1] + "…"
