"""DKIM signing in delivery, against real peers: Relay delivers to an aiosmtpd sink found through
the loopback DNS server, and dkimpy verifies what the sink received, looking the keys up in that
same DNS server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from dkim_support import Keys, dns_lookup, entry, publish, signatures, signed_names
from helpers import running_relay
from helpers.delivery import attempts, delivery_config, final, status, submit
from helpers.peers import Sink, Zone, sinks

from relay.service.lifecycle import Relay

RCPT = "jane@dest.test"
MESSAGE = (
    b"From: App <app@example.com>\r\n"
    b"To: Jane <jane@dest.test>\r\n"
    b"Subject: Your receipt\r\n"
    b"Date: Thu, 03 Dec 2026 17:00:00 +0000\r\n"
    b"Message-ID: <receipt-1@example.com>\r\n"
    b"Bcc: hidden@dest.test\r\n"
    b"List-Unsubscribe: <https://example.com/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Thank you.\r\n"
)
HTML = (
    b"From: App <app@example.com>\r\n"
    b"To: jane@dest.test\r\n"
    b"Subject: News\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b'<html><body><p>Read <a href="https://example.com/article">this</a>.</p></body></html>\r\n'
)


@asynccontextmanager
async def delivering(tmp_path: Path, zone: Zone, dkim: list[dict[str, Any]], **extra: Any) -> AsyncIterator[
    tuple[Relay, Sink]
]:  # fmt: skip
    zone.mx("dest.test", (10, "mx.dest.test"))
    zone.a("mx.dest.test", "127.0.0.2")
    async with sinks("127.0.0.2") as (sink,):
        config = delivery_config(tmp_path, zone, sink.port, dkim=dkim, **extra)
        async with running_relay(config, deliver=True) as relay:
            yield relay, sink


async def deliver(relay: Relay, data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Send one message to RCPT; its attempts, and what the sink received."""
    qid = await submit(relay, [RCPT], data)
    msg = await final(relay, qid)
    assert status(msg) == {RCPT: "delivered"}
    return attempts(msg), msg.queue_id.encode()


def received(sink: Sink) -> bytes:
    (message,) = sink.messages
    return message.data


async def test_rsa_and_ed25519_sign_side_by_side_and_verify_through_dns(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    publish(zone, keys.rsa, keys.ed25519)
    async with delivering(tmp_path, zone, [entry(keys.rsa), entry(keys.ed25519)]) as (relay, sink):
        (attempt,), _ = await deliver(relay, MESSAGE)
    data = received(sink)
    rsa, ed = signatures(data)
    assert (rsa["a"], rsa["d"], rsa["s"], rsa["c"]) == ("rsa-sha256", "example.com", "rsa1", "relaxed/relaxed")
    assert (ed["a"], ed["d"], ed["s"], ed["c"]) == ("ed25519-sha256", "example.com", "ed1", "relaxed/relaxed")
    lookup = dns_lookup(zone)
    verifier = dkimpy.DKIM(data)
    assert verifier.verify(idx=0, dnsfunc=lookup)
    assert verifier.verify(idx=1, dnsfunc=lookup)
    assert attempt["type"] == "delivered"
    assert attempt["dkim"] == [
        {"d": "example.com", "s": "rsa1", "a": "rsa-sha256"},
        {"d": "example.com", "s": "ed1", "a": "ed25519-sha256"},
    ]


async def test_what_is_signed_and_oversigned(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    publish(zone, keys.rsa)
    async with delivering(tmp_path, zone, [entry(keys.rsa)]) as (relay, sink):
        await deliver(relay, MESSAGE)
    data = received(sink)
    assert b"\r\nReceived: " in data  # Relay's own trace field is there, and not signed
    (sig,) = signatures(data)
    names = signed_names(sig)
    for once in ("from", "to", "subject", "date", "message-id"):
        assert names.count(once) == 2, (once, names)  # present once, listed twice
    assert {"list-unsubscribe", "list-unsubscribe-post", "mime-version", "content-type"} <= set(names)
    assert not {"received", "return-path", "bcc", "x-relay-ref", "dkim-signature"} & set(names)

    lookup = dns_lookup(zone)
    assert dkimpy.verify(data, dnsfunc=lookup)
    # A second From: (or To:, Subject:...) added after signing breaks the signature.
    head, _, body = data.partition(b"\r\n\r\n")
    for added in (b"From: ceo@example.com", b"Subject: Urgent: wire transfer", b"To: other@dest.test"):
        assert not dkimpy.verify(head + b"\r\n" + added + b"\r\n\r\n" + body, dnsfunc=lookup), added
    # Fields it does not sign may be added in transit: the signature still verifies.
    assert dkimpy.verify(b"Received: from mx.dest.test\r\nReturn-Path: <x@y.test>\r\n" + data, dnsfunc=lookup)


async def test_signed_after_the_tracking_rewrite_and_with_verp(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    publish(zone, keys.rsa, keys.ed25519)
    extra = {"tracking": {"base_url": "https://t.example.com"}, "bounces": {"domain": "bounces.example.com"}}
    async with delivering(tmp_path, zone, [entry(keys.rsa), entry(keys.ed25519)], **extra) as (relay, sink):
        (attempt,), _ = await deliver(relay, HTML)
    message = sink.messages[0]
    assert message.mail_from.endswith("@bounces.example.com")  # VERP on
    data = message.data
    assert b"https://t.example.com/t/" in data  # the body went out rewritten
    assert b"\r\nX-Relay-Ref: " in data
    assert data.startswith(b"DKIM-Signature: ")  # signed last: in front of X-Relay-Ref
    lookup = dns_lookup(zone)
    verifier = dkimpy.DKIM(data)
    assert verifier.verify(idx=0, dnsfunc=lookup)
    assert verifier.verify(idx=1, dnsfunc=lookup)
    assert all("x-relay-ref" not in signed_names(s) for s in signatures(data))
    assert [d["s"] for d in attempt["dkim"]] == ["rsa1", "ed1"]


async def test_a_from_domain_without_an_entry_goes_out_unsigned(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    other = MESSAGE.replace(b"app@example.com", b"app@other.test")
    sub = MESSAGE.replace(b"app@example.com", b"app@news.example.com")
    async with delivering(tmp_path, zone, [entry(keys.rsa)]) as (relay, sink):
        (attempt,), _ = await deliver(relay, other)
        (sub_attempt,), _ = await deliver(relay, sub)  # subdomains = false
    assert [signatures(m.data) for m in sink.messages] == [[], []]
    assert "dkim" not in attempt
    assert "dkim" not in sub_attempt


async def test_a_long_from_is_signed(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    publish(zone, keys.rsa)
    long = MESSAGE.replace(b"App <app@example.com>", b'"' + b"a" * 900 + b'" <' + b"b" * 60 + b"@EXAMPLE.com.>")
    async with delivering(tmp_path, zone, [entry(keys.rsa)]) as (relay, sink):
        (attempt,), _ = await deliver(relay, long)
    assert attempt["dkim"] == [{"d": "example.com", "s": "rsa1", "a": "rsa-sha256"}]
    assert dkimpy.verify(received(sink), dnsfunc=dns_lookup(zone))


async def test_subdomains_are_signed_with_the_parent_entry(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    publish(zone, keys.ed25519)
    sub = MESSAGE.replace(b"app@example.com", b"app@news.example.com")
    async with delivering(tmp_path, zone, [entry(keys.ed25519, subdomains=True)]) as (relay, sink):
        (attempt,), _ = await deliver(relay, sub)
    assert attempt["dkim"] == [{"d": "example.com", "s": "ed1", "a": "ed25519-sha256"}]
    assert dkimpy.verify(received(sink), dnsfunc=dns_lookup(zone))


HOSTILE = {
    "no From": MESSAGE.replace(b"From: App <app@example.com>\r\n", b""),
    "two From": b"From: app@example.com\r\n" + MESSAGE,
    "two addresses": MESSAGE.replace(b"App <app@example.com>", b"app@example.com, boss@example.com"),
    "garbage From": MESSAGE.replace(b"App <app@example.com>", b"<<<@@@>>> \xff\xfe ;;"),
    "empty From": MESSAGE.replace(b"App <app@example.com>", b""),
    "bad domain": MESSAGE.replace(b"App <app@example.com>", b"app@exa mple..com"),
    "a group": MESSAGE.replace(b"App <app@example.com>", b"undisclosed-recipients:;"),
    "folded garbage": MESSAGE.replace(b"App <app@example.com>", b"=?utf-8?q?\xff?=\r\n\t(\r\n \x01)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_missing_or_hostile_from_is_delivered_unsigned_and_logged(
    tmp_path: Path, zone: Zone, keys: Keys, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    async with delivering(tmp_path, zone, [entry(keys.rsa)]) as (relay, sink):
        (attempt,), _ = await deliver(relay, HOSTILE[case])
    assert signatures(received(sink)) == []
    assert "dkim" not in attempt
    assert any(r.getMessage().startswith("not signed with DKIM: ") for r in caplog.records), caplog.text
