"""A message's story in plain words: its events, its webhook deliveries and the cases that cover
it, merged into one timeline, oldest first, each line written for support staff
("Delivered to mx.example.com [192.0.2.1] over TLSv1.3 in 0.8 s: 250 2.0.0 OK").

Event details are what relay.delivery, relay.smtp_in, relay.http.send, relay.bounces.inbound,
relay.tracking and relay.store.actions write; a detail that is absent or of a surprising type
is left out, never an error (old rows, imported rows)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.model import CaseView, EventView, MessageView
from relay.store.webhooks import Delivery

# The tone of a line: its dot's colour.
GOOD, BAD, WARN, INFO, ACT, PLAIN = "good", "bad", "warn", "info", "act", ""

LABELS: Mapping[str, str] = {
    "received": "Received", "held": "Held", "released": "Released", "delivered": "Delivered",
    "deferred": "Deferred", "bounced": "Bounced", "expired": "Expired", "suppressed": "Not sent: suppressed",
    "cancelled": "Cancelled", "opened": "Opened", "clicked": "Clicked", "complained": "Complaint",
    "retried": "Retry requested", "noted": "Report (no change)", "resent": "Sent again",
    "commented": "Note", "unsuppressed": "Suppression lifted",
}  # fmt: skip
TONES: Mapping[str, str] = {
    "received": PLAIN, "held": INFO, "released": ACT, "delivered": GOOD, "deferred": WARN, "bounced": BAD,
    "expired": BAD, "suppressed": PLAIN, "cancelled": PLAIN, "opened": INFO, "clicked": INFO, "complained": BAD,
    "retried": ACT, "noted": PLAIN, "resent": ACT, "commented": ACT, "unsuppressed": ACT,
}  # fmt: skip
SUPPORT_ACTIONS = frozenset({"retried", "released", "resent", "commented", "unsuppressed"})


@dataclass(frozen=True, slots=True)
class Link:
    text: str
    href: str
    support_only: bool = False  # shown to support and admin only (a raw report may quote the body)


@dataclass(frozen=True, slots=True)
class Item:
    """One line of the timeline."""

    at: float
    kind: str  # an event type, "webhook" or "case"
    label: str
    tone: str
    text: str
    recipient: str | None = None
    more: tuple[str, ...] = ()
    links: tuple[Link, ...] = ()
    badges: tuple[str, ...] = ()  # small extra badges: "machine", "support", "hard"
    by: str = ""


def _s(d: Mapping[str, Any], key: str) -> str:
    """A detail as text; "" when absent or not a plain value."""
    value = d.get(key)
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value)


def _tls(value: str) -> str:
    return "without TLS" if value in ("", "none", "None", "False") else f"over {value}"


def _seconds(ms: object) -> str:
    if isinstance(ms, int | float) and not isinstance(ms, bool):
        return f"{ms / 1000:.1f} s"
    return ""


def _reply(d: Mapping[str, Any]) -> str:
    code = " ".join(x for x in (_s(d, "code"), _s(d, "enhanced_code")) if x)
    reply = _s(d, "reply")
    if reply[:3].isdigit():  # a reply that carries its own code
        return reply
    return " ".join(x for x in (code, reply) if x)


def _where(d: Mapping[str, Any]) -> str:
    host, ip = _s(d, "mx_host"), _s(d, "ip")
    if host and ip and host != ip:
        return f"{host} [{ip}]"
    return host or (f"[{ip}]" if ip else "the receiving server")


def _why(d: Mapping[str, Any]) -> str:
    reason = _s(d, "reason")
    if not reason or "hard" not in d:  # an action's "reason" is free text, not a classification
        return ""
    kind = "permanent" if d.get("hard") else "temporary"
    rule = _s(d, "rule")
    return f"Reason: {reason} ({kind})" + (f"; matched rule: {rule}" if rule else "")


def _case_link(d: Mapping[str, Any]) -> tuple[Link, ...]:
    case_id = d.get("case_id")
    if isinstance(case_id, int) and not isinstance(case_id, bool):
        return (Link(f"case #{case_id}", f"/ui/cases/{case_id}"),)
    return ()


def _report_link(d: Mapping[str, Any]) -> tuple[Link, ...]:
    report_id = d.get("report_id")
    if isinstance(report_id, int) and not isinstance(report_id, bool):
        return (Link("the report as received", f"/ui/reports/{report_id}", support_only=True),)
    return ()


def _attempt(e: EventView, d: Mapping[str, Any]) -> tuple[str, list[str]]:
    where, tls, took, reply = _where(d), _tls(_s(d, "tls")), _seconds(d.get("duration_ms")), _reply(d)
    n = _s(d, "attempt")
    more: list[str] = []
    if e.type == "delivered":
        text = f"Delivered to {where} {tls}" + (f" in {took}" if took else "") + (f": {reply}" if reply else "")
    elif e.type == "deferred":
        text = f"Could not deliver yet: {where} answered {reply or 'nothing'} ({tls}" + (f", {took})" if took else ")")
    elif e.type == "bounced":
        text = f"Refused by {where}: {reply or 'no reply'} ({tls}" + (f", {took})" if took else ")")
    elif e.type == "expired":
        text = "Gave up: the message stayed undeliverable for too long" + (f"; last reply: {reply}" if reply else "")
    else:
        text = f"{where}: {reply}"
    if n:
        more.append(f"Attempt {n}" + (f", port {_s(d, 'port')}" if _s(d, "port") else ""))
    tried = d.get("tried")
    if isinstance(tried, list):
        more += [f"Tried first: {t}" for t in tried[:10] if isinstance(t, str)]
    why = _why(d)
    if why:
        more.append(why)
    if _s(d, "next_attempt_at"):
        more.append(f"Next attempt: {_s(d, 'next_attempt_at').replace('T', ' ').replace('Z', ' UTC')}")
    dkim = d.get("dkim")
    if isinstance(dkim, list):
        more += [f"Signed with DKIM d={s.get('d')} s={s.get('s')}" for s in dkim[:5] if isinstance(s, dict)]
    if _s(d, "dsn_queue_id"):
        more.append(f"A bounce notice was sent to the sender ({_s(d, 'dsn_queue_id')})")
    return text, more


def _report(e: EventView, d: Mapping[str, Any]) -> tuple[str, list[str]]:  # noqa: PLR0912 -- one branch per kind of report
    """An event caused by a report that came back to the bounce listener."""
    kind = _s(d, "report") or "report"
    more: list[str] = []
    if e.type == "complained" or _s(d, "feedback_type"):
        text = f"The recipient's mailbox provider reported a complaint ({_s(d, 'feedback_type') or 'abuse'})"
        if _s(d, "user_agent"):
            more.append(f"Reported by: {_s(d, 'user_agent')}")
        if _s(d, "source_ip"):
            more.append(f"Source IP in the report: {_s(d, 'source_ip')}")
    else:
        reply = _reply(d)
        remote = _s(d, "remote_mta")
        said = f"{remote} said: {reply}" if remote and reply else (reply or "no diagnostic given")
        if e.type == "bounced":
            text = f"Bounced after delivery: a {kind.upper()} report came back; {said}"
        elif e.type == "deferred":
            text = f"Delayed at the far end: a {kind.upper()} report says it is still trying; {said}"
        elif kind == "auto_reply" or _s(d, "reason") == "vacation":
            text = "An automatic reply came back (out of office or similar): nothing changes"
            if _s(d, "subject"):
                more.append(f"Its subject: {_s(d, 'subject')}")
        else:
            action = _s(d, "action")
            text = f"A {kind.upper()} report came back" + (f" ({action})" if action else "") + f"; {said}"
    why = _why(d)
    if why:
        more.append(why)
    if _s(d, "final_recipient"):
        more.append(f"Final recipient in the report: {_s(d, 'final_recipient')}")
    if _s(d, "note"):
        more.append(_s(d, "note"))
    if _s(d, "dsn_queue_id"):
        more.append(f"A bounce notice was sent to the sender ({_s(d, 'dsn_queue_id')})")
    return text, more


def _received(d: Mapping[str, Any]) -> tuple[str, list[str], tuple[Link, ...]]:
    more: list[str] = []
    links: tuple[Link, ...] = ()
    protocol = _s(d, "protocol")
    if _s(d, "resend_of"):
        original = _s(d, "resend_of")
        text = f"Created by {_s(d, 'by') or 'support'}: a copy of message {original}, sent again to a corrected address"
        links = (Link(f"the original message {original}", f"/ui/messages/{original}"),)
        if _s(d, "reason"):
            more.append(f"Why: {_s(d, 'reason')}")
    elif _s(d, "dsn_for"):
        original = _s(d, "dsn_for")
        text = f"A bounce notice Relay wrote to the sender of message {original}"
        if _s(d, "recipient"):
            text += f" (about {_s(d, 'recipient')})"
        links = (Link(f"message {original}", f"/ui/messages/{original}"),)
    elif protocol == "HTTP":
        text = f"Received through the send API from {_s(d, 'client_ip') or 'an unknown address'}"
    else:
        text = f"Received from {_s(d, 'client_ip') or 'an unknown address'}"
        if _s(d, "helo"):
            text += f" (which introduced itself as {_s(d, 'helo')})"
        text += f" {_tls(_s(d, 'tls'))}"
        if protocol:
            more.append(f"Protocol: {protocol}")
    if _s(d, "user"):
        more.append(f"Sent by user {_s(d, 'user')}")
    counts = []
    if isinstance(d.get("recipients"), int):
        n = d["recipients"]
        counts.append(f"{n} recipient" + ("" if n == 1 else "s"))
    if isinstance(d.get("size"), int):
        counts.append(f"{d['size']:,} bytes")
    if counts:
        more.append(", ".join(counts))
    return text, more, links


Lines = tuple[str, list[str], tuple[Link, ...]]  # the text, the lines below it, its links


def _by(d: Mapping[str, Any]) -> str:
    return _s(d, "by") or "someone"


def _why_line(d: Mapping[str, Any]) -> list[str]:
    return [f"Why: {_s(d, 'reason')}"] if _s(d, "reason") else []


def _held(d: Mapping[str, Any]) -> Lines:
    setting = "[delivery] hold_users" if _s(d, "by") == "hold_users" else "[delivery] hold"
    return f"Held in the queue by hold mode ({setting}): it is not sent until someone releases it", [], ()


def _suppressed(d: Mapping[str, Any]) -> Lines:
    entry = d.get("entry")
    if not isinstance(entry, Mapping):
        return "Not sent: the address is on the suppression list", [], ()
    since = str(entry.get("created_at") or "").replace("T", " ").replace("Z", " UTC")
    text = (
        f"Not sent: {entry.get('address')} is on the suppression list "
        f"({entry.get('reason')}, added by {entry.get('origin')}"
    )
    return text + (f" on {since})" if since else ")"), [], ()


def _cancelled(d: Mapping[str, Any]) -> Lines:
    if d.get("discarded"):
        return f"Discarded while held by {_by(d)}: it will not be sent", [], ()
    return f"Cancelled by {_by(d)}: it will not be sent", _why_line(d), ()


def _engagement(kind: str, d: Mapping[str, Any]) -> Lines:
    who = "A machine (a mail proxy or a link scanner)" if d.get("machine") else "The recipient"
    text = f"{who} opened the message" if kind == "opened" else f"{who} clicked a link: {_s(d, 'url') or 'unknown'}"
    more = ["First human " + ("open" if kind == "opened" else "click")] if d.get("first") else []
    seen = ", ".join(x for x in (_s(d, "ip"), _s(d, "user_agent")) if x)
    return text, more + ([f"From {seen}"] if seen else []), ()


def _resent(d: Mapping[str, Any]) -> Lines:
    new_id = _s(d, "new_queue_id")
    text = f"Sent again by {_by(d)} to the corrected address {_s(d, 'to') or '?'}"
    if not new_id:
        return text, _why_line(d), ()
    return (
        text + f" as a new message {new_id}",
        _why_line(d),
        (Link(f"the new message {new_id}", f"/ui/messages/{new_id}"),),
    )


def _unsuppressed(d: Mapping[str, Any]) -> Lines:
    entry = d.get("entry")
    was = f" (it was there for: {entry.get('reason')})" if isinstance(entry, Mapping) else ""
    return f"Removed from the suppression list by {_by(d)}{was}", _why_line(d), ()


def _other(d: Mapping[str, Any]) -> Lines:
    return ", ".join(f"{k}: {v}" for k, v in d.items() if isinstance(v, str | int | float) and v != ""), [], ()


def _released(d: Mapping[str, Any]) -> Lines:
    return f"Released from hold by {_by(d)}: it is sent now", [], ()


def _retried(d: Mapping[str, Any]) -> Lines:
    return f"Retry requested by {_by(d)}: due now", _why_line(d), ()


def _commented(d: Mapping[str, Any]) -> Lines:
    return f"Note by {_by(d)}: {_s(d, 'text')}", [], ()


def _noted(d: Mapping[str, Any]) -> Lines:
    return "A report came back that changes nothing", [_s(d, "note")], ()


def _expired(d: Mapping[str, Any]) -> Lines:
    return "Gave up: the message stayed undeliverable for too long", [_why(d)], ()


_SIMPLE: Mapping[str, Callable[[Mapping[str, Any]], Lines]] = {
    "held": _held, "released": _released, "suppressed": _suppressed, "cancelled": _cancelled, "retried": _retried,
    "resent": _resent, "commented": _commented, "unsuppressed": _unsuppressed, "noted": _noted, "expired": _expired,
}  # fmt: skip


def _lines(e: EventView, d: Mapping[str, Any]) -> Lines:
    if e.type == "received":
        return _received(d)
    if d.get("async") or e.type == "complained":
        text, more = _report(e, d)
        return text, more, _report_link(d)
    if e.type in ("delivered", "deferred", "bounced", "expired") and ("attempt" in d or "mx_host" in d):
        text, more = _attempt(e, d)
        return text, more, ()
    if e.type in ("opened", "clicked"):
        return _engagement(e.type, d)
    return _SIMPLE.get(e.type, _other)(d)


def describe(e: EventView) -> Item:
    """One event as a timeline line."""
    d: Mapping[str, Any] = e.details if isinstance(e.details, Mapping) else {}
    text, more, links = _lines(e, d)
    by = "" if e.type == "held" else _s(d, "by")
    badges = ["machine"] if e.type in ("opened", "clicked") and d.get("machine") else []
    if e.type in SUPPORT_ACTIONS or (e.type == "cancelled" and by):
        badges.append("support")
    return Item(
        at=e.at, kind=e.type, label=LABELS.get(e.type, e.type), tone=TONES.get(e.type, PLAIN), text=text,
        recipient=e.recipient, more=tuple(m for m in more if m), links=links + _case_link(d), badges=tuple(badges),
        by=by,
    )  # fmt: skip


def webhook_item(w: Delivery) -> Item:
    status = {"delivered": "delivered", "pending": "not delivered yet", "failed": "gave up"}.get(w.status, w.status)
    text = f"Webhook {w.type} to {w.url}: {status}"
    more = [f"{w.attempts} attempt" + ("" if w.attempts == 1 else "s")]
    if w.last_status is not None:
        more.append(f"last answer: HTTP {w.last_status}")
    if w.last_error:
        more.append(f"last error: {w.last_error}")
    tone = GOOD if w.status == "delivered" else (BAD if w.status == "failed" else WARN)
    return Item(at=w.event_at, kind="webhook", label="Webhook", tone=tone, text=text, more=("; ".join(more),))


def case_item(c: CaseView) -> Item:
    text = f"Case #{c.id} opened by {c.opened_by}: {c.title}"
    more = [f"State now: {c.state.replace('_', ' ')}"]
    if c.customer_ref:
        more.append(f"Customer reference: {c.customer_ref}")
    if c.owner:
        more.append(f"Owner: {c.owner}")
    return Item(
        at=c.opened_at, kind="case", label="Case opened", tone=ACT, text=text, more=tuple(more),
        links=(Link(f"case #{c.id}", f"/ui/cases/{c.id}"),), badges=("case",),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Story:
    items: tuple[Item, ...]
    resent_as: tuple[str, ...] = field(default=())  # new queue ids made from this message
    resend_of: str | None = None  # the message this one is a copy of


def story(view: MessageView, webhooks: Sequence[Delivery] = (), cases: Sequence[CaseView] = ()) -> Story:
    """The merged timeline, oldest first (events keep their order at equal times)."""
    items = [describe(e) for e in view.events]
    items += [webhook_item(w) for w in webhooks]
    items += [case_item(c) for c in cases]
    items.sort(key=lambda i: i.at)  # stable: events first in their own order
    resent = tuple(
        _s(e.details, "new_queue_id") for e in view.events if e.type == "resent" and _s(e.details, "new_queue_id")
    )
    original = next(
        (_s(e.details, "resend_of") for e in view.events if e.type == "received" and _s(e.details, "resend_of")), None
    )
    return Story(tuple(items), resent, original or None)
