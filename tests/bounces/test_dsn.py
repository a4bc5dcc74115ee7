"""relay.bounces.dsn: the DSN Relay writes is read back by Relay's parser, the stdlib and flufl.bounce."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import pytest
from flufl.bounce import all_failures
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.bounces.dsn import build_dsn
from relay.bounces.reports import parse

ORIGINAL = (
    b"From: App <app@example.org>\r\nTo: bob@example.net\r\nSubject: Your receipt\r\n"
    b"Message-ID: <m1@example.org>\r\nX-Relay-Ref: tok-123\r\n\r\nthe body, which must never come back\r\n"
)


def dsn(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "hostname": "relay.example.com",
        "queue_id": "01J0QUEUE",
        "sender": "app@example.org",
        "recipient": "bob@example.net",
        "status": "5.1.1",
        "diagnostic": "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual mailbox table",
        "remote_mta": "mx.example.net",
        "arrival": 1_700_000_000.0,
        "at": 1_700_000_600.0,
        "original_headers": ORIGINAL,
    }
    args.update(overrides)
    return build_dsn(**args)


def test_round_trip() -> None:
    raw = dsn()
    report = parse(raw)
    assert report.kind == "dsn"
    assert report.reporting_mta == "relay.example.com"
    assert report.subject == "Undelivered Mail Returned to Sender"
    assert report.relay_refs == ("tok-123",)
    assert report.original_message_id == "m1@example.org"
    (r,) = report.recipients
    assert (r.action, r.status, r.code, r.final_recipient, r.remote_mta) == (
        "failed",
        "5.1.1",
        550,
        "bob@example.net",
        "mx.example.net",
    )
    assert (
        r.diagnostic == "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual mailbox table"
    )


def test_shape_as_postfix_writes_it() -> None:
    raw = dsn()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.defects == []
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert b"\r\nTo: <app@example.org>\r\n" in raw
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@relay.example.com>")
    assert msg["Date"]
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    text = parts[0].get_content()
    assert "bob@example.net" in text
    assert "Relay gave up" in text
    assert "User unknown" in text
    per_message, per_recipient = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    assert per_message["X-Relay-Queue-ID"] == "01J0QUEUE"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.net"
    assert per_recipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert per_recipient["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:23:20 +0000"
    headers = parts[2].get_content()
    assert "X-Relay-Ref: tok-123" in headers
    assert b"must never come back" not in raw


def test_flufl_bounce_finds_the_recipient() -> None:
    msg = email.message_from_bytes(dsn(), policy=email.policy.compat32)
    temporary, permanent = all_failures(msg)
    assert permanent == {b"bob@example.net"}
    assert not temporary


def test_delayed_round_trip_without_remote_mta() -> None:
    raw = dsn(
        action="delayed", status="4.4.1", diagnostic="connect to mx.example.net: Connection timed out", remote_mta=None
    )
    (r,) = parse(raw).recipients
    assert (r.action, r.status, r.remote_mta, r.code) == ("delayed", "4.4.1", None, None)
    assert r.diagnostic == "connect to mx.example.net: Connection timed out"
    assert b"Diagnostic-Code: X-Relay; connect to" in raw


def test_header_injection_is_stripped() -> None:
    raw = dsn(
        recipient="bob@example.net\r\nBcc: victim@example.com",
        sender="app@example.org\r\nX-Evil: 1",
        diagnostic="550 no\r\n\r\nFinal-Recipient: rfc822; other@example.com",
        hostname="relay.example.com\r\nX-Evil: 2",
        queue_id="Q\nX-Evil: 3",
        remote_mta="mx\r\nX-Evil: 4",
    )
    assert b"\r\nBcc:" not in raw
    assert b"\r\nX-Evil" not in raw
    report = parse(raw)
    assert len(report.recipients) == 1
    assert report.recipients[0].diagnostic == "550 no Final-Recipient: rfc822; other@example.com"


def test_hostile_original_headers() -> None:
    long_line = b"X-Long: " + b"a" * 5000 + b"\r\n"
    original = b" folded first\r\n" + long_line + b"Subject: hi\rX-Bare-CR: 1\r\nA: \x00\xff\r\n\r\nbody\r\n"
    raw = dsn(original_headers=original)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert b"body" not in raw.split(b"text/rfc822-headers")[1]
    assert parse(raw).kind == "dsn"


def test_odd_queue_id_and_hostname_keep_the_mime_structure() -> None:
    raw = dsn(queue_id='a"b<c>@d; e', hostname='mx "x" <y>')
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.defects == []
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["Message-ID"].count("@") == 1
    assert parse(raw).recipients[0].final_recipient == "bob@example.net"


def test_boundary_not_in_the_original() -> None:
    raw = dsn(original_headers=b"X-A: --01J0QUEUE.\r\n")
    assert parse(raw).recipients[0].final_recipient == "bob@example.net"


@settings(max_examples=200, deadline=None)
@given(
    recipient=st.text(max_size=300),
    diagnostic=st.text(max_size=3000),
    status=st.text(max_size=20),
    action=st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded", "nonsense"]),
    remote_mta=st.none() | st.text(max_size=300),
    original=st.binary(max_size=3000),
)
def test_any_arguments_give_a_readable_dsn(
    recipient: str, diagnostic: str, status: str, action: str, remote_mta: str | None, original: bytes
) -> None:
    raw = dsn(
        recipient=recipient,
        diagnostic=diagnostic,
        status=status,
        action=action,
        remote_mta=remote_mta,
        original_headers=original,
    )
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    report = parse(raw)
    assert report.kind == "dsn"
    (r,) = report.recipients
    assert r.action == (action if action != "nonsense" else "failed")
    assert r.status is not None


@pytest.mark.parametrize(
    "diagnostic",
    ["550 5.1.1 user unknown", "421-4.7.0 try again later\r\n421 4.7.0 rate limited", "x" * 2000],
)
def test_diagnostic_round_trip(diagnostic: str) -> None:
    (r,) = parse(dsn(diagnostic=diagnostic)).recipients
    expected = " ".join(diagnostic.split())[:1000]
    if len(expected) < 900:  # a 900-character word is cut into pieces by folding
        assert r.diagnostic == expected
    # The cut pieces are read back joined by a space, so the 1000-character cap drops a character.
    assert expected.replace(" ", "").startswith(r.diagnostic.replace(" ", ""))
    assert len(r.diagnostic) >= min(len(expected), 990)


_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@settings(max_examples=200, deadline=None)
@given(
    diagnostic=st.text(_PRINTABLE, max_size=800),
    local=st.text(st.sampled_from("abcxyz019.+-_"), min_size=1, max_size=30),
    status=st.from_regex(r"\A[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z"),
    action=st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded"]),
)
def test_printable_values_round_trip_exactly(diagnostic: str, local: str, status: str, action: str) -> None:
    recipient = f"{local}@example.net"
    (r,) = parse(dsn(diagnostic=diagnostic, recipient=recipient, status=status, action=action)).recipients
    assert (r.action, r.status, r.final_recipient, r.remote_mta) == (action, status, recipient, "mx.example.net")
    assert r.diagnostic == " ".join(diagnostic.split())
