"""What a report does, decided by a pure function of the parsed report and its targets."""

from __future__ import annotations

from relay.bounces.inbound import Policy, decide
from relay.bounces.reports import RecipientStatus, Report
from relay.model import ReportTarget

NOW = 1_800_000_000.0
JANE = ReportTarget(1, "Q1", "jane@example.com", "delivered", "app@example.com", NOW - 60, b"Subject: hi\r\n")
JOE = ReportTarget(2, "Q2", "joe@example.com", "delivered", "app@example.com", NOW - 60, b"Subject: hi\r\n")
POLICY = Policy("relay.test")


def report(kind: str, *blocks: RecipientStatus, **fields: object) -> Report:
    names = ("reporting_mta", "feedback_type", "user_agent", "source_ip", "arf_recipient", "original_message_id",
             "auto_reply_reason")  # fmt: skip
    base: dict[str, object] = {**dict.fromkeys(names), "subject": "", "relay_refs": ()}
    base.update(fields)
    return Report(kind, tuple(blocks), **base)  # type: ignore[arg-type]


def block(action: str, status: str, diagnostic: str, rcpt: str = "jane@example.com") -> RecipientStatus:
    return RecipientStatus(action, status, int(diagnostic[:3]), diagnostic, rcpt, None, "mx.example.com", "RCPT")


def test_a_failed_dsn_bounces_a_delivered_recipient_and_suppresses_a_hard_one() -> None:
    d = decide(report("dsn", block("failed", "5.1.1", "550 5.1.1 User unknown")), [JANE], by_rcpt=[1], by_ref=[],
               policy=POLICY, now=NOW)  # fmt: skip
    assert d.result == "matched"
    assert [rid for rid, _ in d.bounce] == [1]
    (event,) = d.events
    assert (event.type, event.details["reason"], event.details["hard"], event.details["async"]) == (
        "bounced", "userunknown", True, True)  # fmt: skip
    assert [s.reason for s in d.suppress] == ["hard_bounce"]
    assert d.notify == ()


def test_a_soft_failure_suppresses_nobody_and_notify_sender_queues_a_dsn() -> None:
    d = decide(report("dsn", block("failed", "5.2.2", "552 5.2.2 Mailbox full")), [JANE], by_rcpt=[1], by_ref=[],
               policy=Policy("relay.test", notify_sender=True), now=NOW)  # fmt: skip
    assert d.events[0].details["reason"] == "mailboxfull"
    assert d.suppress == ()
    (dsn,) = d.notify
    assert dsn.mail_from == ""
    assert dsn.recipients == ("app@example.com",)


def test_a_report_for_a_recipient_that_is_not_delivered_changes_no_state() -> None:
    bounced = ReportTarget(1, "Q1", "jane@example.com", "bounced", "app@example.com", NOW - 60)
    d = decide(report("dsn", block("failed", "5.1.1", "550 5.1.1 User unknown")), [bounced], by_rcpt=[1], by_ref=[],
               policy=POLICY, now=NOW)  # fmt: skip
    assert d.bounce == ()
    assert [e.type for e in d.events] == ["noted"]


def test_a_complaint_follows_the_enclosed_reference_before_the_return_path() -> None:
    arf = report("arf", feedback_type="abuse", user_agent="FBL/1", source_ip="192.0.2.1")
    d = decide(arf, [JANE, JOE], by_rcpt=[1], by_ref=[2], policy=POLICY, now=NOW)
    (event,) = d.events
    assert (event.type, event.recipient) == ("complained", "joe@example.com")
    assert [(s.address, s.reason, s.origin) for s in d.suppress] == [("joe@example.com", "complaint", "complaint")]


def test_complaints_off_records_the_complaint_without_suppressing() -> None:
    arf = report("arf", feedback_type="fraud")
    d = decide(arf, [JANE], by_rcpt=[1], by_ref=[], policy=Policy("relay.test", complaints=False), now=NOW)
    assert [e.type for e in d.events] == ["complained"]
    assert d.suppress == ()


def test_not_spam_delivered_notices_and_auto_replies_are_not_bounces() -> None:
    for r in (
        report("arf", feedback_type="not-spam"),
        report("dsn", block("delivered", "2.0.0", "250 2.0.0 Ok")),
        report("auto_reply", auto_reply_reason="vacation"),
        report("unknown"),
    ):
        d = decide(r, [JANE], by_rcpt=[1], by_ref=[], policy=POLICY, now=NOW)
        assert d.result == "not_a_bounce"
        assert [e.type for e in d.events] == ["noted"]
        assert d.bounce == ()
        assert d.suppress == ()


def test_a_delayed_dsn_is_an_async_deferral() -> None:
    d = decide(report("dsn", block("delayed", "4.4.7", "451 4.4.7 delivery delayed")), [JANE], by_rcpt=[1],
               by_ref=[], policy=POLICY, now=NOW)  # fmt: skip
    (event,) = d.events
    assert event.type == "deferred"
    assert event.details["async"] is True
    assert d.bounce == ()


def test_a_report_naming_nobody_keeps_nothing() -> None:
    d = decide(report("dsn", block("failed", "5.1.1", "550 5.1.1 x")), [], by_rcpt=[7], by_ref=[], policy=POLICY,
               now=NOW)  # fmt: skip
    assert (d.result, d.keep, d.events) == ("unmatched", False, ())
