"""relay.bounces.reports on real bounces (tests/bounces/samples, see its README) and on hostile bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.bounces.reports import MAX_RECIPIENTS, Report, parse

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def one(report: Report) -> tuple[str | None, str | None, int | None, str | None]:
    assert len(report.recipients) == 1, report.recipients
    r = report.recipients[0]
    return r.action, r.status, r.code, r.final_recipient


# --- RFC 3464 DSNs --------------------------------------------------------------------------------


def test_postfix_dsn() -> None:
    report = parse(sample("lhost-postfix-31.eml"))
    assert report.kind == "dsn"
    assert report.reporting_mta == "nyaaan.example.com"
    assert report.subject == "Undelivered Mail Returned to Sender"
    assert one(report) == ("failed", "5.1.1", 550, "kijitora@gmail.com")
    r = report.recipients[0]
    assert r.original_recipient == "kijitora@gmail.com"
    assert r.remote_mta == "gmail-smtp-in.l.google.com"
    # Unfolded, "smtp;" gone, whitespace collapsed.
    assert r.diagnostic.startswith("550-5.1.1 The email account that you tried to reach does not exist. Please try 550")
    assert "\n" not in r.diagnostic
    assert "  " not in r.diagnostic
    assert report.original_message_id == "ffffff-eeeeee-22@neko.example.com"
    assert report.auto_reply_reason is None  # Postfix DSNs carry Auto-Submitted too


def test_dsn_with_two_recipients() -> None:
    report = parse(sample("lhost-postfix-13.eml"))
    assert report.kind == "dsn"
    assert [(r.final_recipient, r.action, r.status, r.code, r.remote_mta) for r in report.recipients] == [
        ("kijitora@example.jp", "failed", "5.2.1", 550, "mx.example.jp"),
        ("noraneko@example.jp", "failed", "5.2.2", 550, "mx.example.jp"),
    ]
    assert report.recipients[1].diagnostic == "550 5.2.2 <noraneko@example.jp>... Mailbox Full"


@pytest.mark.parametrize(
    ("name", "expected", "remote_mta", "diagnostic"),
    [
        (
            "lhost-exim-43.eml",
            ("failed", "5.0.0", 550, "kijitora@example.net"),
            "mail-mx1.example.net",
            "550 5.7.1 Connections not accepted from servers without a valid sender domain.",
        ),
        (
            "lhost-office365-04.eml",
            ("failed", "5.1.351", 550, "otsu-sakaba-hunter-neko-nyaaaaaaan@ezweb.ne.jp"),
            "msmx.au.com",
            "550 5.1.351 Remote server returned unknown recipient or mailbox unavailable",
        ),
        (
            "lhost-exchange2007-01.eml",
            ("failed", "5.1.1", 550, "mikeneko@example.co.jp"),
            None,
            "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
        ),
        (
            "lhost-sendmail-01.eml",
            ("failed", "5.1.1", 550, "userunknown@bouncehammer.jp"),
            "mx.bouncehammer.jp",
            "550 5.1.1 <userunknown@bouncehammer.jp>... User Unknown",
        ),
        (
            "rhost-gsuite-01.eml",
            ("failed", "5.0.0", 550, "kijitora@example.de"),
            "192.0.2.222",
            "550 #5.1.0 Address rejected.",
        ),
        ("rhost-outlook-06.eml", ("delayed", "4.4.7", None, "kijitora@example.com"), None, ""),
    ],
)
def test_dsns_of_several_mtas(
    name: str, expected: tuple[str, str, int | None, str], remote_mta: str | None, diagnostic: str
) -> None:
    report = parse(sample(name))
    assert report.kind == "dsn"
    assert one(report) == expected
    assert report.recipients[0].remote_mta == remote_mta
    assert report.recipients[0].diagnostic.startswith(diagnostic)


def test_sendmail_dsn_with_two_recipients() -> None:
    report = parse(sample("lhost-sendmail-02.eml"))
    assert [(r.final_recipient, r.status) for r in report.recipients] == [
        ("userunknown@example.org", "5.1.1"),
        ("filtered@example.com", "5.2.1"),
    ]


def test_dsn_whose_boundary_does_not_match_is_read_from_its_fields() -> None:
    report = parse(sample("rhost-google-02.eml"))
    assert report.kind == "dsn"
    assert one(report) == ("failed", "5.1.1", 550, "neko-nyaan@example.org")
    assert report.recipients[0].remote_mta == "aspmx.l.google.com"
    assert report.recipients[0].diagnostic.endswith("e22-n7GpZmsf093195.222 - gsmtp")


def test_report_without_its_delivery_status_part_is_read_from_its_text() -> None:
    report = parse(sample("lhost-activehunter-01.eml"))
    assert report.kind == "dsn"
    assert [r.final_recipient for r in report.recipients] == ["kijitora@example.org"]


# --- ARF ------------------------------------------------------------------------------------------


def test_arf_abuse() -> None:
    report = parse(sample("arf-01.eml"))
    assert report.kind == "arf"
    assert report.feedback_type == "abuse"
    assert report.user_agent == "SMP-FBL"
    assert report.source_ip == "192.0.2.89"
    assert report.recipients == ()


def test_arf_auth_failure_with_original_recipient() -> None:
    report = parse(sample("arf-18.eml"))
    assert report.kind == "arf"
    assert report.feedback_type == "auth-failure"
    assert report.user_agent == "Lua/1.0"
    assert report.source_ip == "192.0.2.222"
    assert report.arf_recipient == "kijitora@example.com"
    assert report.original_message_id == "000000002.2222222.1500000000022@example.net"


def test_arf_opt_out_without_the_original() -> None:
    report = parse(sample("arf-12.eml"))
    assert (report.kind, report.feedback_type, report.user_agent) == ("arf", "opt-out", "ARF-Agent/1.0")
    assert report.original_message_id is None


def test_arf_not_spam() -> None:
    raw = sample("arf-01.eml").replace(b"Feedback-Type: abuse", b"Feedback-Type: Not-Spam")
    assert parse(raw).feedback_type == "not-spam"


def test_hotmail_jmrp_complaint() -> None:
    report = parse(sample("arf-22.eml"))
    assert (report.kind, report.feedback_type, report.arf_recipient) == ("arf", "abuse", "kijitora@example.com")


# --- auto-replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [("rfc3834-02.eml", "vacation"), ("rfc3834-03.eml", "vacation"), ("rfc3834-05.eml", "auto_replied")],
)
def test_auto_replies(name: str, reason: str) -> None:
    report = parse(sample(name))
    assert (report.kind, report.auto_reply_reason, report.recipients) == ("auto_reply", reason, ())


@pytest.mark.parametrize("name", ["is-not-bounce-01.eml", "is-not-bounce-02.eml"])
def test_a_persons_message_is_unknown(name: str) -> None:
    report = parse(sample(name))
    assert report.kind == "unknown"
    assert report.recipients == ()


def test_person_writing_about_an_undeliverable_message_is_unknown() -> None:
    raw = (
        b"Return-Path: <bob@example.net>\nFrom: Bob <bob@example.net>\nTo: app@example.org\n"
        b"Subject: Re: your receipt\n\nI got an undeliverable notice, a permanent error, from carol@example.com.\n"
    )
    report = parse(raw)
    assert report.kind == "unknown"
    assert report.recipients == ()


def test_exchange_auto_subject() -> None:
    raw = b"From: a@example.net\nSubject: Auto: Your receipt\n\nI am out of the office until Monday.\n"
    report = parse(raw)
    assert (report.kind, report.auto_reply_reason) == ("auto_reply", "vacation")


@pytest.mark.parametrize("name", ["lhost-qmail-01.eml", "lhost-postfix-13.eml", "arf-18.eml", "rfc3834-02.eml"])
@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends_read_the_same(name: str, newline: bytes) -> None:
    raw = sample(name)
    assert parse(raw.replace(b"\n", newline)) == parse(raw)


# --- text bounces ---------------------------------------------------------------------------------


def test_qmail() -> None:
    report = parse(sample("lhost-qmail-01.eml"))
    assert report.kind == "bounce"
    assert one(report) == ("failed", "5.5.0", 550, "kijitora@example.ne.jp")
    assert report.recipients[0].diagnostic.startswith("Sorry, no SMTP connection got far enough")
    assert "(#5.5.0)" in report.recipients[0].diagnostic
    assert report.original_message_id == "000000000.9999999999999.JavaMail.postmaster@mailhub"


def test_bounce_from_post_master_with_its_reply_above_the_address() -> None:
    report = parse(sample("lhost-apachejames-01.eml"))  # broken MIME: the boundary is not folded
    assert report.kind == "bounce"
    assert one(report) == ("failed", None, 550, "000000000000@vtext.example.com")
    assert report.recipients[0].diagnostic.startswith("550 - Requested action not taken: no such user here")


def test_exim_text_bounce() -> None:
    report = parse(sample("lhost-exim-01.eml"))
    assert report.kind == "bounce"  # although it carries Auto-Submitted: auto-replied
    assert one(report) == ("failed", "5.7.0", 550, "kijitora@example.ed.jp")
    assert "550 5.7.0 <shironeko@example.jp>... Please use the smtp server of your ISP." in (
        report.recipients[0].diagnostic
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lhost-exim-02.eml", [("kijitora@example.jp", "5.1.1", 550), ("sabatora@example.jp", "5.2.1", 550)]),
        ("lhost-v5sendmail-04.eml", [("kijitora@example.ed.jp", None, 554), ("mikeneko@example.ac.jp", None, 554)]),
        ("lhost-exchange2003-02.eml", [("kijitora@example.co.jp", None, None), ("mikeneko@example.co.jp", None, None)]),
    ],
)
def test_text_bounces_with_two_recipients_keep_each_ones_diagnostic(
    name: str, expected: list[tuple[str, str | None, int | None]]
) -> None:
    report = parse(sample(name))
    assert report.kind == "bounce"
    assert [(r.final_recipient, r.status, r.code) for r in report.recipients] == expected
    first, second = report.recipients
    assert second.final_recipient is not None
    assert second.final_recipient not in first.diagnostic


@pytest.mark.parametrize(
    ("name", "expected", "diagnostic"),
    [
        ("lhost-gmail-01.eml", ("failed", "5.1.1", 550, "userunknown@example.jp"), "User Unknown"),
        ("lhost-yahoo-01.eml", ("failed", "5.1.1", 550, "kijitora@example.org"), "Remote host said: 550 5.1.1"),
    ],
)
def test_text_bounces_of_gmail_and_yahoo(name: str, expected: tuple[str, str, int, str], diagnostic: str) -> None:
    report = parse(sample(name))
    assert report.kind == "bounce"
    assert one(report) == expected
    assert diagnostic in report.recipients[0].diagnostic


# --- X-Relay-Ref ----------------------------------------------------------------------------------


def test_relay_ref_in_the_enclosed_original() -> None:
    raw = sample("lhost-sendmail-01.eml").replace(
        b"Content-Type: message/rfc822\n\n", b"Content-Type: message/rfc822\n\nX-Relay-Ref:  tok-AAA \n", 1
    )
    assert b"tok-AAA" in raw
    assert parse(raw).relay_refs == ("tok-AAA",)


def test_relay_ref_in_an_arf_original() -> None:
    raw = sample("arf-18.eml")
    marker = b"Content-Type: message/rfc822"
    assert marker in raw
    head, _, rest = raw.partition(marker)
    blank = rest.index(b"\n\n") + 2
    raw = head + marker + rest[:blank] + b"X-Relay-Ref: tok-ARF\n" + rest[blank:]
    assert parse(raw).relay_refs == ("tok-ARF",)


def test_relay_ref_quoted_in_a_text_bounce_and_in_top_headers_deduplicated() -> None:
    raw = sample("lhost-qmail-01.eml").replace(
        b"--- Below this line is a copy of the message.\n\n",
        b"--- Below this line is a copy of the message.\n\nX-Relay-Ref: tok-Q1\nX-Relay-Ref: tok-Q2\n",
    )
    raw = b"X-Relay-Ref: tok-Q1\n" + raw
    report = parse(raw)
    assert report.kind == "bounce"
    assert report.relay_refs == ("tok-Q1", "tok-Q2")


def test_relay_ref_quoted_in_the_notice_of_a_dsn_without_its_original() -> None:
    raw = sample("rhost-outlook-06.eml")
    marker = b"Content-Type: message/rfc822"
    assert marker in raw
    raw = raw.replace(marker, b"Content-Type: application/octet-stream", 1)  # the original, unreadable
    notice = b"Content-Type: text/plain"
    assert notice in raw
    head, _, rest = raw.partition(notice)
    blank = rest.index(b"\n\n") + 2
    raw = head + notice + rest[:blank] + b"> X-Relay-Ref: tok-N\n" + rest[blank:]
    report = parse(raw)
    assert report.kind == "dsn"
    assert report.relay_refs == ("tok-N",)


def test_relay_refs_are_capped() -> None:
    raw = sample("lhost-qmail-01.eml").replace(
        b"--- Below this line is a copy of the message.\n\n",
        b"--- Below this line is a copy of the message.\n\n" + b"".join(b"X-Relay-Ref: t%d\n" % i for i in range(50)),
    )
    assert len(parse(raw).relay_refs) == 10


# --- hostile input --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_any_bytes(raw: bytes) -> None:
    assert parse(raw).kind in ("dsn", "arf", "auto_reply", "bounce", "unknown")


_FRAGMENTS = [
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n",
    b"Content-Type: message/delivery-status\n",
    b"Content-Type: message/feedback-report\n",
    b"Content-Type: message/rfc822\n",
    b"Content-Type: text/rfc822-headers\n",
    b"Content-Transfer-Encoding: base64\n",
    b"--b\n",
    b"--b--\n",
    b"\n",
    b"Final-Recipient: rfc822; a@b.example\n",
    b"Action: failed\nStatus: 5.1.1\n",
    b"Diagnostic-Code: smtp; 550 5.1.1 no\n",
    b" folded\n",
    b"Feedback-Type: abuse\n",
    b"X-Relay-Ref: t\n",
    b"From: MAILER-DAEMON@x\nSubject: failure notice\n",
    b"<a@b.example>:\n",
    b"\xff\xfe\x00\r",
    b"=?utf-8?b?/w==?=\n",
    b"Auto-Submitted: auto-replied\n",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60))
def test_mime_shaped_garbage(fragments: list[bytes]) -> None:
    parse(b"".join(fragments))


def test_two_megabytes_of_random_bytes() -> None:
    import random

    assert parse(random.Random(1).randbytes(2_000_000)).kind == "unknown"


def test_ten_thousand_recipient_blocks_are_capped() -> None:
    blocks = "".join(
        f"Final-Recipient: rfc822; u{i}@example.com\nAction: failed\nStatus: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 unknown\n\n"
        for i in range(10_000)
    )
    raw = (
        'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        f"--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x.example\n\n{blocks}--b--\n"
    ).encode()
    report = parse(raw)
    assert report.kind == "dsn"
    assert len(report.recipients) == MAX_RECIPIENTS
    assert report.recipients[-1].final_recipient == f"u{MAX_RECIPIENTS - 1}@example.com"


def test_deeply_nested_multiparts() -> None:
    nest = "".join(f'--b{i}\nContent-Type: multipart/mixed; boundary="b{i + 1}"\n\n' for i in range(3000))
    raw = f'From: MAILER-DAEMON@x\nSubject: failure notice\nContent-Type: multipart/mixed; boundary="b0"\n\n{nest}'
    assert parse(raw.encode()).kind == "bounce"


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: " + b"a" * 2_000_000 + b"\n\nx",
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + (b"<a@b.cd>: " + b"x@" * 50_000 + b"\n") * 20,
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + b"a" * 60 + b"@" + b"a." * 1_000_000,
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n"
        + b"".join(b"<u%d@example.com>:\n550 5.1.1 no\n\n" % i for i in range(60_000)),
        b"Content-Type: message/delivery-status\n\nDiagnostic-Code: " + b"5.5." * 500_000,
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=\n\n--\n" * 50_000,
        b"Content-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n!!!!" + b"A" * 100,
        b'Content-Type: multipart/mixed; a="' + b";" * 2_000_000 + b"\n\nbody",
        b"From: MAILER-DAEMON@x\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
        b'Content-Type: text/plain; a="' + b";\n " * 600_000 + b"\n\n<a@b.cd>: 550 no\n--b--\n",
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + b"\n" * 2_000_000,
    ],
    ids=[
        "long-subject",
        "at-signs",
        "long-domain",
        "many-addresses",
        "dotted",
        "no-boundary",
        "bad-base64",
        "content-type-params",  # the stdlib's parameter parser is quadratic in ";" and quotes
        "part-params",
        "newlines",
    ],
)
def test_big_hostile_inputs(raw: bytes) -> None:
    report = parse(raw)
    assert len(report.recipients) <= MAX_RECIPIENTS
    assert len(report.subject) <= 1000
    assert all(len(r.diagnostic) <= 1000 for r in report.recipients)


@pytest.mark.parametrize(
    ("sample", "command"),
    [("lhost-postfix-13.eml", "RCPT"), ("lhost-exim-02.eml", "RCPT"), ("lhost-exim-01.eml", "MAIL")],
)
def test_the_refused_command_is_read_from_the_notice(sample: str, command: str) -> None:
    """ "User unknown" after RCPT is no such mailbox; after DATA, a filter: the classifier asks."""
    report = parse((SAMPLES / sample).read_bytes())
    assert report.recipients
    assert {r.command for r in report.recipients} == {command}


def test_a_command_named_across_a_folded_line_is_found() -> None:
    """Postfix wraps its notice: "(in reply to" ends one line and "RCPT TO command)" starts the next."""
    sample = (SAMPLES / "lhost-postfix-13.eml").read_bytes()
    folded = sample.replace(b"(in reply to RCPT TO command)", b"(in reply to\n    RCPT TO command)")
    assert folded != sample
    assert {r.command for r in parse(folded).recipients} == {"RCPT"}
