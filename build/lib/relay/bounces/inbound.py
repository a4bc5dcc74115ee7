"""The bounce listener's work: a report that came back (a DSN, an ARF complaint, an
auto-reply, another bounce) becomes events, state changes, suppression entries and DSNs to
senders, written with the raw report in one transaction.

``decide`` is the policy, a pure function of the parsed report and the recipients it names;
``BounceInbox.receive`` parses, records, counts, and gives the SMTP reply. Whose message a
report is about comes from signed tokens only: the return path the report was sent to (DSNs,
bounces), or the X-Relay-Ref header of the original it encloses (complaints, whose envelope
is often redacted), so a forged report can affect nobody.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ulid import ULID

from relay import metrics
from relay.bounces import dsn, reports
from relay.bounces.classify import Classification, classify
from relay.bounces.reports import RecipientStatus, Report
from relay.bounces.verp import ReturnPath
from relay.config import Config
from relay.errors import StoreError
from relay.logstore import LogStore
from relay.model import (
    DELIVERED,
    NewMessage,
    NewReport,
    ReportDecision,
    ReportEvent,
    ReportTarget,
    Suppression,
)

log = logging.getLogger(__name__)

PARSE_IN_THREAD = 256 * 1024  # bytes; a larger report is parsed off the event loop
# Reports kept per recipient of a message: a real MTA sends one or two (delayed, then failed);
# more is someone replaying a token they saw to fill the disk. Later ones are answered and dropped.
MAX_REPORTS_PER_RECIPIENT = 10
REPLY_STORED = "250 2.0.0 Ok: report recorded"
REPLY_STORE_FAILED = "451 4.3.0 Temporary failure storing the report, try again later"
_COMPLAINT_TYPES = ("abuse", "fraud", "virus", "other")


@dataclass(frozen=True, slots=True)
class Policy:
    """What reports may do, from [suppression] and [bounces]."""

    hostname: str
    hard_bounces: bool = True
    complaints: bool = True
    notify_sender: bool = False


def decide(
    report: Report, targets: Sequence[ReportTarget], *, by_rcpt: Sequence[int], by_ref: Sequence[int],
    policy: Policy, now: float,
) -> ReportDecision:  # fmt: skip
    """What a report does to the recipients it names (``by_rcpt``: the tokens it was sent to;
    ``by_ref``: X-Relay-Ref tokens in the original it encloses)."""
    known = {t.recipient_id: t for t in targets}
    # A complaint is about the message it encloses; a DSN about the return path it came to.
    order = [*by_ref, *by_rcpt] if report.kind == "arf" else [*by_rcpt, *by_ref]
    chosen = [known[i] for i in dict.fromkeys(order) if i in known]
    if report.kind == "arf":
        chosen = chosen[:1]
    if not chosen:  # a token of a recipient no longer in the store: counted, nothing kept
        bouncy = report.kind in ("dsn", "arf", "bounce")
        return ReportDecision(report.kind, "unmatched" if bouncy else "not_a_bounce", keep=False)
    chosen = [t for t in chosen if t.reports < MAX_REPORTS_PER_RECIPIENT]
    if not chosen:
        return ReportDecision(report.kind, "not_a_bounce", keep=False)
    parts = [_one(report, t, policy, now) for t in chosen]
    events = tuple(e for p in parts for e in p.events)
    matched = any(e.type in ("bounced", "deferred", "complained") for e in events)
    return ReportDecision(
        kind=report.kind,
        result="matched" if matched else "not_a_bounce",
        events=events,
        bounce=tuple(b for p in parts for b in p.bounce),
        suppress=tuple(s for p in parts for s in p.suppress),
        notify=tuple(n for p in parts for n in p.notify),
        queue_id=chosen[0].queue_id,
        recipient=chosen[0].address,
    )


def _one(report: Report, t: ReportTarget, policy: Policy, now: float) -> ReportDecision:
    if report.kind == "arf":
        return _complaint(report, t, policy, now)
    if report.kind in ("dsn", "bounce"):
        return _bounce(report, t, policy, now)
    reason = report.auto_reply_reason if report.kind == "auto_reply" else None
    details: dict[str, Any] = {"async": True, "report": report.kind, "subject": report.subject[:200]}
    if report.kind == "auto_reply":
        details.update(reason="vacation", hard=False, rule=f"auto-reply: {reason or 'auto_replied'}")
    return _noted(report, t, details)


def _noted(report: Report, t: ReportTarget, details: dict[str, Any]) -> ReportDecision:
    return ReportDecision(report.kind, "not_a_bounce", events=(ReportEvent(t.queue_id, t.address, "noted", details),))


def _complaint(report: Report, t: ReportTarget, policy: Policy, now: float) -> ReportDecision:
    feedback = report.feedback_type or "abuse"  # a report with no Feedback-Type is still a complaint
    details: dict[str, Any] = {"async": True, "report": "arf", "feedback_type": feedback}
    if report.user_agent:
        details["user_agent"] = report.user_agent[:200]
    if report.source_ip:
        details["source_ip"] = report.source_ip[:64]
    if feedback not in _COMPLAINT_TYPES:
        return _noted(report, t, {**details, "note": f"feedback type {feedback}: not a complaint"})
    details.update(reason="feedback", hard=False, rule=f"feedback-type: {feedback}")
    suppress: tuple[Suppression, ...] = ()
    if policy.complaints:
        source = report.user_agent or report.reporting_mta or "unknown"
        note = f"{feedback} report from {source}"[:500]
        suppress = (Suppression(t.address.lower(), "complaint", "complaint", t.queue_id, now, None, note),)
    return ReportDecision(
        "arf", "matched", events=(ReportEvent(t.queue_id, t.address, "complained", details),), suppress=suppress
    )


def _bounce(report: Report, t: ReportTarget, policy: Policy, now: float) -> ReportDecision:
    block = _block_for(report.recipients, t.address)
    action = _action(block, report.kind)
    details: dict[str, Any] = {"async": True, "report": report.kind, "action": action}
    if block is not None:
        details.update(
            status=block.status, code=block.code, enhanced_code=block.status, reply=block.diagnostic,
            remote_mta=block.remote_mta, final_recipient=block.final_recipient,
        )  # fmt: skip
    if action not in ("failed", "delayed"):
        return _noted(report, t, details)
    cls = _classify(block, report)
    details.update(cls.details())
    if action == "delayed":
        return ReportDecision(report.kind, "matched", events=(ReportEvent(t.queue_id, t.address, "deferred", details),))
    response = _response(block, cls)
    suppress: tuple[Suppression, ...] = ()
    if cls.hard and policy.hard_bounces:
        suppress = (Suppression(t.address.lower(), "hard_bounce", "bounce", t.queue_id, now, None, response[:500]),)
    if t.status != DELIVERED:
        # A bounce for a recipient that is not delivered (bounced already, or being retried):
        # the report is kept and shown; the state stays.
        details["note"] = f"the recipient is {t.status}: state unchanged"
        return ReportDecision(report.kind, "matched", events=(ReportEvent(t.queue_id, t.address, "noted", details),),
                              suppress=suppress)  # fmt: skip
    notify: tuple[NewMessage, ...] = ()
    if policy.notify_sender and t.mail_from and t.headers is not None:
        status = block.status if block and block.status else _status(cls)
        remote = block.remote_mta if block else None
        notify = (
            sender_dsn(t, status=status, diagnostic=response, remote_mta=remote, hostname=policy.hostname, now=now),
        )
        details["dsn_queue_id"] = notify[0].queue_id
    return ReportDecision(
        report.kind, "matched", events=(ReportEvent(t.queue_id, t.address, "bounced", details),),
        bounce=((t.recipient_id, response),), suppress=suppress, notify=notify,
    )  # fmt: skip


def _block_for(blocks: Sequence[RecipientStatus], address: str) -> RecipientStatus | None:
    """The report's block about this recipient; else its first failed one (a forward may have
    changed the address), else its first."""
    lowered = address.lower()
    for b in blocks:
        if lowered in ((b.final_recipient or "").lower(), (b.original_recipient or "").lower()):
            return b
    return next((b for b in blocks if b.action == "failed"), blocks[0] if blocks else None)


def _action(block: RecipientStatus | None, kind: str) -> str:
    if block is not None and block.action:
        return block.action
    status = (block.status if block else None) or ""
    if status.startswith("4"):
        return "delayed"
    if status.startswith("2"):
        return "delivered"
    return "failed"  # a bounce that says no more than that it is one


def _classify(block: RecipientStatus | None, report: Report) -> Classification:
    if block is None:
        return classify(None, None, report.subject)
    return classify(block.code, block.status, block.diagnostic, command=block.command)


def _response(block: RecipientStatus | None, cls: Classification) -> str:
    if block is None:
        return f"bounce report ({cls.reason})"
    if block.diagnostic[:3].isdigit():
        return block.diagnostic  # "550 5.1.1 ...": the remote server's reply, whole
    parts = [str(block.code) if block.code else "", block.status or "", block.diagnostic]
    text = " ".join(p for p in parts if p)
    return text or f"bounce report ({cls.reason})"


def _status(cls: Classification) -> str:
    return "5.1.1" if cls.reason == "userunknown" else "5.0.0"


def sender_dsn(
    t: ReportTarget, *, status: str, diagnostic: str, remote_mta: str | None, hostname: str, now: float
) -> NewMessage:
    """The DSN that tells the original sender, as a message for the normal queue: from ``<>``,
    so nothing ever answers it with another DSN."""
    queue_id = str(ULID())
    raw = dsn.build_dsn(
        hostname=hostname, queue_id=t.queue_id, sender=t.mail_from, recipient=t.address, status=status,
        diagnostic=diagnostic, remote_mta=remote_mta, arrival=t.received_at, at=now,
        original_headers=t.headers or b"",
    )  # fmt: skip
    return NewMessage(
        queue_id=queue_id,
        message_id=_message_id(raw) or f"{queue_id}@{hostname}",
        mail_from="",
        recipients=(t.mail_from,),
        subject="Undelivered Mail Returned to Sender",
        tags=(),
        user=None,
        client_ip="",
        received_at=now,
        raw=raw,
        details={"dsn_for": t.queue_id, "recipient": t.address, "size": len(raw), "recipients": 1},
    )


def _message_id(raw: bytes) -> str | None:
    head = raw.partition(b"\r\n\r\n")[0]
    m = re.search(rb"(?im)^message-id:\s*<([^<>\s]{1,900})>", head)
    return m.group(1).decode("ascii", "replace") if m else None


class BounceInbox:
    """What the bounce listener does with a report once it has the whole of it."""

    def __init__(self, config: Config, store: LogStore, return_path: ReturnPath) -> None:
        self.store = store
        self.return_path = return_path
        s = config.suppression
        self.policy = Policy(config.server.hostname, s.hard_bounces, s.complaints, config.bounces.notify_sender)

    async def receive(self, raw: bytes, *, mail_from: str, recipient_ids: Sequence[int], client_ip: str) -> str:
        """Record a report sent to these (verified) return path recipients; the SMTP reply."""
        if len(raw) > PARSE_IN_THREAD:
            report = await asyncio.to_thread(reports.parse, raw)
        else:
            report = reports.parse(raw)
        by_ref = [i for ref in report.relay_refs if (i := self.return_path.verify(ref)) is not None]
        by_rcpt = list(dict.fromkeys(recipient_ids))
        now = time.time()

        def decided(targets: list[ReportTarget]) -> ReportDecision:
            return decide(report, targets, by_rcpt=by_rcpt, by_ref=by_ref, policy=self.policy, now=now)

        try:
            report_id, decision = await self.store.record_report(
                NewReport(raw, mail_from, client_ip, now), [*by_rcpt, *by_ref], decided,
                with_headers=self.policy.notify_sender,
            )  # fmt: skip
        except StoreError:
            log.exception("could not store a report from %s", client_ip)
            return REPLY_STORE_FAILED
        metrics.BOUNCE_REPORTS.labels(decision.result).inc()
        if not decision.keep:
            log.info("report from %s (%s, %s) names no recipient that takes reports: not kept",
                     client_ip, report.kind, decision.result)  # fmt: skip
            return REPLY_STORED
        for e in decision.events:
            if e.type == "bounced":
                metrics.BOUNCES.labels("async", str(e.details.get("reason", "undefined"))).inc()
            elif e.type == "complained":
                metrics.COMPLAINTS.inc()
        log.info(
            "report %d from %s (%s): %s %s%s", report_id, client_ip, report.kind, decision.result,
            ", ".join(f"{e.type} {e.recipient} in {e.queue_id}" for e in decision.events) or "-",
            f", {len(decision.suppress)} suppressed" if decision.suppress else "",
        )  # fmt: skip
        return REPLY_STORED
