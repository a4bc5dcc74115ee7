"""Bounces end to end with real peers: Relay delivers to an aiosmtpd sink through the test DNS
server with a VERP return path, then reports come back to its bounce listener over SMTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from helpers import command, running_relay, send, store_url, wait_for
from helpers.delivery import delivery_config, final, status, submit
from helpers.peers import Received, Sink, SinkBehaviour, Zone, sinks

from relay.bounces import reports
from relay.bounces.verp import ReturnPath
from relay.model import MessageView, Suppression
from relay.service.lifecycle import Relay, tracking_secret

DOMAIN = "bounces.example.com"


def bounce_config(tmp_path: Path, zone: Zone, port: int, **extra: Any) -> Any:
    base: dict[str, Any] = {"bounces": {"domain": DOMAIN, "listen": ["127.0.0.1:0"]}}
    for key, value in extra.items():
        base.setdefault(key, {}).update(value)
    return delivery_config(tmp_path, zone, port, **base)


@pytest.fixture
async def sink(zone: Zone) -> AsyncIterator[Sink]:
    zone.mx("example.com", (10, "mx.example.com"))
    zone.a("mx.example.com", "127.0.0.2")
    async with sinks("127.0.0.2") as (s,):
        yield s


@pytest.fixture(params=["sqlite", "postgres"])
async def relay(request: pytest.FixtureRequest, tmp_path: Path, zone: Zone, sink: Sink) -> AsyncIterator[Relay]:
    async with AsyncExitStack() as stack:
        url = await store_url(request.param, tmp_path / "data" / "relay.db", stack)
        config = bounce_config(tmp_path, zone, sink.port, store={"url": url})
        async with running_relay(config, deliver=True) as r:
            yield r


async def delivered(relay: Relay, rcpts: list[str]) -> tuple[str, MessageView]:
    qid = await submit(relay, rcpts)
    msg = await final(relay, qid)
    assert set(status(msg).values()) == {"delivered"}, status(msg)
    return qid, msg


def arrived_for(sink: Sink, rcpt: str) -> Received:
    (got,) = [m for m in sink.messages if m.rcpts == [rcpt]]
    return got


async def to_listener(relay: Relay, rcpt: str, data: bytes, mail_from: str = "") -> tuple[int, str]:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.bounce_addresses[0].port, timeout=10, local_hostname="mx.example.net"
    )
    await client.connect()
    try:
        await client.ehlo()
        return await send(client, mail_from, [rcpt], data)
    finally:
        client.close()


def postfix_dsn(rcpt: str, return_path: str, ref: str, *, action: str = "failed", status: str = "5.1.1",
                diagnostic: str = "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual "
                                  "mailbox table") -> bytes:  # fmt: skip
    """A DSN as Postfix writes one (RFC 3464), with the original's headers enclosed."""
    diagnostic = diagnostic.format(rcpt=rcpt)
    return (
        "Return-Path: <>\r\n"
        "From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"To: {return_path}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        "\r\n"
        "--B1\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "This is the mail system at host mx.example.com.\r\n\r\n"
        f"<{rcpt}>: host store.example.com[192.0.2.7] said: {diagnostic} (in reply to\r\n    RCPT TO command)\r\n\r\n"
        "--B1\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\nX-Postfix-Queue-ID: 4Xq1\r\n"
        "Arrival-Date: Thu,  3 Dec 2026 12:00:00 +0000 (UTC)\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\nAction: {action}\r\n"
        f"Status: {status}\r\nRemote-MTA: dns; store.example.com\r\nDiagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        "--B1\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"X-Relay-Ref: {ref}\r\nFrom: app@example.com\r\nSubject: Hi\r\n\r\n"
        "--B1--\r\n"
    ).encode()


def arf_report(ref: str, rcpt: str, feedback_type: str = "abuse") -> bytes:
    """A spam complaint as RFC 5965 writes one, its envelope recipient redacted."""
    return (
        "From: <staff@hotmail.example>\r\nTo: <abuse@example.com>\r\nSubject: complaint about message\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="part1"\r\n\r\n'
        '--part1\r\nContent-Type: text/plain; charset="US-ASCII"\r\n\r\n'
        "This is an email abuse report for an email message received from IP 192.0.2.1.\r\n\r\n"
        "--part1\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
        "Original-Mail-From: <redacted@example.com>\r\nOriginal-Rcpt-To: <redacted@example.com>\r\n"
        "Arrival-Date: Thu, 3 Dec 2026 12:00:00 +0000\r\nSource-IP: 192.0.2.1\r\nReported-Domain: example.com\r\n\r\n"
        "--part1\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        f"X-Relay-Ref: {ref}\r\nFrom: app@example.com\r\nTo: redacted@example.com\r\nSubject: Hi\r\n\r\nHello\r\n\r\n"
        "--part1--\r\n"
    ).encode()


def ref_of(got: Received) -> str:
    first = got.data.split(b"\r\n", 1)[0].decode()
    assert first.startswith("X-Relay-Ref: "), first
    return first.removeprefix("X-Relay-Ref: ")


def counter(name: str, **labels: str) -> float:
    """A metric of this process, as /metrics shows it."""
    from helpers import metric

    from relay import metrics
    from relay.model import QueueSummary

    return metric(metrics.render(QueueSummary({}, None)).decode(), name, **labels)


def events(msg: MessageView, kind: str) -> list[dict[str, Any]]:
    return [dict(e.details, recipient=e.recipient) for e in msg.events if e.type == kind]


async def test_each_recipient_gets_its_own_signed_return_path(relay: Relay, sink: Sink) -> None:
    _qid, msg = await delivered(relay, ["jane@example.com", "joe@example.com"])
    assert msg.mail_from == "app@example.com"  # the original sender stays in the log
    return_path = ReturnPath(tracking_secret(relay.config), DOMAIN)
    assert len(sink.messages) == 2  # one transaction per recipient
    seen = {}
    for got in sink.messages:
        (rcpt,) = got.rcpts
        local, _, domain = got.mail_from.partition("@")
        assert domain == DOMAIN
        assert local.startswith("b+")
        assert len(local) <= 64
        rid = return_path.recipient_of(got.mail_from)
        assert rid is not None
        seen[rcpt] = rid
        assert ref_of(got) == local.removeprefix("b+")
        assert b"\r\nFrom: app@example.com\r\n" in got.data  # From: untouched
    assert len(set(seen.values())) == 2


async def test_a_dsn_to_the_listener_bounces_the_right_recipient(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    qid, _ = await delivered(relay, ["jane@example.com", "joe@example.com"])
    got = arrived_for(sink, "joe@example.com")
    dsn = postfix_dsn("joe@example.com", got.mail_from, ref_of(got))
    before = counter("relay_bounces_total", kind="async", reason="userunknown")
    matched = counter("relay_bounce_reports_total", result="matched")
    code, text = await to_listener(relay, got.mail_from, dsn)
    assert code == 250, text
    assert counter("relay_bounces_total", kind="async", reason="userunknown") == before + 1
    assert counter("relay_bounce_reports_total", result="matched") == matched + 1
    msg = await relay.store.get_message(qid)
    assert msg is not None
    assert status(msg) == {"jane@example.com": "delivered", "joe@example.com": "bounced"}
    (bounce,) = events(msg, "bounced")
    assert bounce["recipient"] == "joe@example.com"
    assert bounce["async"] is True
    assert bounce["reason"] == "userunknown"
    assert bounce["hard"] is True
    assert bounce["rule"]
    assert bounce["status"] == "5.1.1"
    assert bounce["remote_mta"] == "store.example.com"
    assert await relay.store.bounce_report(bounce["report_id"]) == dsn  # support can read the raw DSN
    entry = await relay.store.suppression_check("Joe@Example.com")
    assert entry is not None
    assert entry.reason == "hard_bounce"
    assert entry.source_queue_id == qid


async def test_a_delayed_dsn_is_a_deferral_that_changes_no_state(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    qid, _ = await delivered(relay, ["jane@example.com"])
    got = arrived_for(sink, "jane@example.com")
    dsn = postfix_dsn("jane@example.com", got.mail_from, ref_of(got), action="delayed", status="4.2.2",
                      diagnostic="452 4.2.2 <{rcpt}>: mailbox is full")  # fmt: skip
    code, _ = await to_listener(relay, got.mail_from, dsn)
    assert code == 250
    msg = await relay.store.get_message(qid)
    assert msg is not None
    assert status(msg) == {"jane@example.com": "delivered"}
    (deferral,) = events(msg, "deferred")
    assert deferral["async"] is True
    assert deferral["reason"] == "mailboxfull"
    assert deferral["hard"] is False
    assert await relay.store.suppression_check("jane@example.com") is None


async def test_forged_and_foreign_addresses_are_refused_and_change_nothing(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    qid, _ = await delivered(relay, ["jane@example.com"])
    got = arrived_for(sink, "jane@example.com")
    local, _, _ = got.mail_from.partition("@")
    token = local.removeprefix("b+")
    forged = f"b+{token[:-1]}{'a' if token[-1] != 'a' else 'b'}@{DOMAIN}"
    port = relay.bounce_addresses[0].port
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, local_hostname="mx.example.net")
    await client.connect()
    try:
        await client.ehlo()
        assert "auth" not in client.esmtp_extensions  # no AUTH on the bounce listener
        assert (await command(client, "AUTH PLAIN AGphbmUAc2VjcmV0"))[0] == 502
        assert (await command(client, "MAIL FROM:<>"))[0] == 250
        assert await command(client, f"RCPT TO:<{forged}>") == (550, "5.1.1 Unknown bounce address")
        assert await command(client, f"RCPT TO:<b+{'a' * 29}@{DOMAIN}>") == (550, "5.1.1 Unknown bounce address")
        assert await command(client, f"RCPT TO:<postmaster@{DOMAIN}>") == (550, "5.1.1 Unknown bounce address")
        assert await command(client, "RCPT TO:<jane@example.com>") == (550, "5.7.1 Relay access denied")
        assert await command(client, f"RCPT TO:<{local}@elsewhere.example>") == (550, "5.7.1 Relay access denied")
        assert (await command(client, "DATA"))[0] == 503  # no valid recipient: nothing to take
    finally:
        client.close()
    msg = await relay.store.get_message(qid)
    assert msg is not None
    assert status(msg) == {"jane@example.com": "delivered"}
    assert [e.type for e in msg.events] == ["received", "delivered"]
    assert await relay.store.suppression_check("jane@example.com") is None


async def test_the_listener_refuses_reports_over_its_size_limit(tmp_path: Path, zone: Zone, sink: Sink) -> None:
    config = bounce_config(tmp_path, zone, sink.port, bounces={"max_message_size": 4096})
    async with running_relay(config, deliver=True) as relay:
        await delivered(relay, ["jane@example.com"])
        got = arrived_for(sink, "jane@example.com")
        big = postfix_dsn("jane@example.com", got.mail_from, ref_of(got)) + b"x" * 70 + (b"y" * 70 + b"\r\n") * 80
        code, text = await to_listener(relay, got.mail_from, big)
        assert (code, text.split(" ")[0]) == (552, "5.3.4")
        assert relay.store is not None
        msg = (await relay.store.lookup("jane@example.com"))[0]
        assert status(msg) == {"jane@example.com": "delivered"}


async def test_an_arf_complaint_complains_and_suppresses(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    qid, _ = await delivered(relay, ["jane@example.com"])
    got = arrived_for(sink, "jane@example.com")
    complaints = counter("relay_complaints_total")
    code, _ = await to_listener(relay, got.mail_from, arf_report(ref_of(got), "jane@example.com"), "fbl@isp.example")
    assert code == 250
    assert counter("relay_complaints_total") == complaints + 1
    (row,) = await relay.store.stats(time.time() - 3600, time.time() + 60, "domain")
    assert (row.group, row.complained, row.delivered) == ("example.com", 1, 1)
    msg = await relay.store.get_message(qid)
    assert msg is not None
    assert status(msg) == {"jane@example.com": "delivered"}
    (complaint,) = events(msg, "complained")
    assert complaint["feedback_type"] == "abuse"
    assert complaint["user_agent"] == "SomeGenerator/1.0"
    assert complaint["source_ip"] == "192.0.2.1"
    entry = await relay.store.suppression_check("jane@example.com")
    assert entry is not None
    assert (entry.reason, entry.origin) == ("complaint", "complaint")


async def test_a_not_spam_report_and_an_auto_reply_are_only_noted(relay: Relay, sink: Sink) -> None:
    assert relay.store is not None
    qid, _ = await delivered(relay, ["jane@example.com"])
    got = arrived_for(sink, "jane@example.com")
    ref = ref_of(got)
    assert (await to_listener(relay, got.mail_from, arf_report(ref, "jane@example.com", "not-spam")))[0] == 250
    ooo = (
        b"From: Jane <jane@example.com>\r\nTo: app@example.com\r\nSubject: Automatic reply: Hi\r\n"
        b"Auto-Submitted: auto-replied\r\nX-Auto-Response-Suppress: All\r\n\r\nI am out of the office until Monday.\r\n"
    )
    assert (await to_listener(relay, got.mail_from, ooo, "jane@example.com"))[0] == 250
    msg = await relay.store.get_message(qid)
    assert msg is not None
    assert status(msg) == {"jane@example.com": "delivered"}
    assert [e.type for e in msg.events] == ["received", "delivered", "noted", "noted"]
    assert await relay.store.suppression_check("jane@example.com") is None


async def test_a_synchronous_hard_bounce_is_classified_and_suppressed(tmp_path: Path, zone: Zone, sink: Sink) -> None:
    sink.behaviour = SinkBehaviour(rcpt={
        "gone@example.com": "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown",
        "full@example.com": "452 4.2.2 Mailbox full",
    })  # fmt: skip
    async with running_relay(bounce_config(tmp_path, zone, sink.port), deliver=True) as relay:
        assert relay.store is not None
        qid = await submit(relay, ["gone@example.com", "full@example.com"])
        msg = await wait_for(lambda: _with_events(relay, qid, {"bounced", "deferred"}))
        (bounce,) = events(msg, "bounced")
        assert (bounce["reason"], bounce["hard"]) == ("userunknown", True)
        deferral = events(msg, "deferred")[0]
        assert (deferral["reason"], deferral["hard"]) == ("mailboxfull", False)
        assert await relay.store.suppression_check("gone@example.com") is not None
        assert await relay.store.suppression_check("full@example.com") is None
        # The next message to the bounced address is accepted and never attempted.
        sink.messages.clear()
        qid2 = await submit(relay, ["Gone@Example.com"])
        msg2 = await final(relay, qid2)
        assert status(msg2) == {"Gone@example.com": "suppressed"}
        (skipped,) = events(msg2, "suppressed")
        assert skipped["entry"]["address"] == "gone@example.com"
        assert skipped["entry"]["reason"] == "hard_bounce"
        assert all(m.rcpts != ["Gone@example.com"] for m in sink.messages)


async def _with_events(relay: Relay, qid: str, kinds: set[str]) -> MessageView | None:
    assert relay.store is not None
    msg = await relay.store.get_message(qid)
    return msg if msg is not None and kinds <= {e.type for e in msg.events} else None


async def test_suppressed_addresses_and_domains_are_never_attempted(relay: Relay, sink: Sink) -> None:
    store = relay.store
    assert store is not None
    now = time.time()
    await _suppress(relay, Suppression("jane@example.com", "manual", "api", None, now, None, "asked to stop"))
    await _suppress(relay, Suppression("*@example.com", "manual", "cli", None, now, now + 3600))
    manual = counter("relay_suppressed_total", reason="manual")
    qid = await submit(relay, ["JANE@example.com", "joe@example.com"])
    msg = await final(relay, qid)
    # counted by the dispatcher once its claim returns, a moment after the commit the test saw
    await wait_for(lambda: counter("relay_suppressed_total", reason="manual") == manual + 2)
    (row,) = await store.stats(now - 60, time.time() + 60, "domain")
    assert (row.suppressed, row.delivered) == (2, 0)
    assert status(msg) == {"JANE@example.com": "suppressed", "joe@example.com": "suppressed"}
    entries = {e["recipient"]: e["entry"]["address"] for e in events(msg, "suppressed")}
    assert entries == {"JANE@example.com": "jane@example.com", "joe@example.com": "*@example.com"}
    assert sink.messages == []


async def test_reject_at_rcpt_refuses_suppressed_recipients(tmp_path: Path, zone: Zone, sink: Sink) -> None:
    config = bounce_config(tmp_path, zone, sink.port, suppression={"reject_at_rcpt": True})
    async with running_relay(config, deliver=True) as relay:
        await _suppress(relay, Suppression("jane@example.com", "complaint", "complaint", None, time.time()))
        from helpers import smtp_client

        async with smtp_client(relay) as client:
            assert (await command(client, "MAIL FROM:<app@example.com>"))[0] == 250
            assert await command(client, "RCPT TO:<Jane@Example.com>") == (550, "5.1.1 Recipient address suppressed")
            assert (await command(client, "RCPT TO:<joe@example.com>"))[0] == 250


async def _suppress(relay: Relay, entry: Suppression) -> None:
    assert relay.store is not None
    await relay.store.suppress(entry, actor="test")


async def test_notify_sender_sends_a_dsn_that_relay_reads_back(tmp_path: Path, zone: Zone) -> None:
    zone.mx("example.com", (10, "mx.example.com"))
    zone.a("mx.example.com", "127.0.0.2")
    zone.mx("app.example", (10, "mx.app.example"))
    zone.a("mx.app.example", "127.0.0.3")
    behaviour = SinkBehaviour(rcpt={"gone@example.com": "550 5.1.1 <gone@example.com>: User unknown",
                                    "gone2@example.com": "550 5.1.1 <gone2@example.com>: User unknown"})  # fmt: skip
    async with sinks("127.0.0.2", "127.0.0.3") as (dest, sender_mx):
        dest.behaviour = behaviour
        sender_mx.behaviour = SinkBehaviour(rcpt={"nobody@app.example": "550 5.1.1 no such user"})
        config = bounce_config(tmp_path, zone, dest.port, bounces={"notify_sender": True})
        async with running_relay(config, deliver=True) as relay:
            assert relay.store is not None
            from helpers import smtp_client

            async with smtp_client(relay) as client:
                code, _text = await send(
                    client, "app@app.example", ["gone@example.com"], b"Subject: Hi\r\n\r\nHello\r\n"
                )
                assert code == 250
                # a DSN that itself bounces must never cause another one
                code, _ = await send(client, "nobody@app.example", ["gone2@example.com"], b"Subject: 2\r\n\r\nx\r\n")
                assert code == 250
            await wait_for(lambda: len(sender_mx.messages) >= 1)
            (got,) = sender_mx.messages
            assert got.mail_from == "<>"
            assert got.rcpts == ["app@app.example"]
            parsed = reports.parse(got.data)
            assert parsed.kind == "dsn"
            (block,) = parsed.recipients
            assert (block.action, block.status, block.final_recipient) == ("failed", "5.1.1", "gone@example.com")
            assert "User unknown" in block.diagnostic
            # the second message's DSN went to nobody@app.example, bounced, and nothing followed
            dsn2 = await wait_for(lambda: _bounced_dsn(relay))
            assert dsn2.mail_from == ""
            await _settled(relay)
            assert len(sender_mx.messages) == 1


async def _bounced_dsn(relay: Relay) -> MessageView | None:
    assert relay.store is not None
    found = await relay.store.lookup("nobody@app.example")
    return next((m for m in found if m.mail_from == "" and status(m) == {"nobody@app.example": "bounced"}), None)


async def _settled(relay: Relay) -> None:
    from helpers import wait_drained

    assert relay.store is not None
    await wait_drained(relay.store, timeout=15)


async def test_a_replayed_report_is_kept_a_bounded_number_of_times(relay: Relay, sink: Sink) -> None:
    """A recipient knows its own token; replaying a report cannot fill the disk."""
    from relay.bounces.inbound import MAX_REPORTS_PER_RECIPIENT

    assert relay.store is not None
    qid, _ = await delivered(relay, ["jane@example.com"])
    got = arrived_for(sink, "jane@example.com")
    dsn = postfix_dsn("jane@example.com", got.mail_from, ref_of(got))
    for _ in range(MAX_REPORTS_PER_RECIPIENT + 3):
        assert (await to_listener(relay, got.mail_from, dsn))[0] == 250
    msg = await relay.store.get_message(qid)
    assert msg is not None
    assert status(msg) == {"jane@example.com": "bounced"}
    reported = [e for e in msg.events if "report_id" in e.details]
    assert len(reported) == MAX_REPORTS_PER_RECIPIENT
    assert [e.type for e in reported] == ["bounced"] + ["noted"] * (MAX_REPORTS_PER_RECIPIENT - 1)


async def test_a_valid_token_of_an_unknown_recipient_is_unmatched(relay: Relay) -> None:
    from helpers import metric

    assert relay.store is not None
    address = ReturnPath(tracking_secret(relay.config), DOMAIN).address(987_654_321)
    code, _ = await to_listener(relay, address, postfix_dsn("ghost@example.com", address, "x"))
    assert code == 250
    from relay import metrics
    from relay.model import QueueSummary

    assert (
        metric(metrics.render(QueueSummary({}, None)).decode(), "relay_bounce_reports_total", result="unmatched") >= 1
    )
    assert await relay.store.bounce_report(1) is None  # nothing kept


async def test_guessing_tokens_ends_the_session(relay: Relay) -> None:
    """Past [smtp] max_junk_commands refused recipients, the session is closed: RSET and MAIL do
    not reset the count."""
    limit = relay.config.smtp.max_junk_commands
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.bounce_addresses[0].port, timeout=10, local_hostname="mx.example.net"
    )
    await client.connect()
    try:
        await client.ehlo()
        replies = []
        for i in range(limit + 5):
            if i % 40 == 0:
                await command(client, "RSET")
                await command(client, "MAIL FROM:<>")
            try:
                replies.append((await command(client, f"RCPT TO:<b+{i:029d}@{DOMAIN}>"))[0])
            except aiosmtplib.SMTPServerDisconnected:
                break
        assert replies[:limit] == [550] * limit
        assert replies[limit] == 421
    finally:
        client.close()
