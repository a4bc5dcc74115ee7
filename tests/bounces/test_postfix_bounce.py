"""Bounces as a real MTA writes them: Relay hands a message to a private Postfix instance, which
queues it (Relay logs "delivered"), fails to deliver it onward to an aiosmtpd sink, and sends its
own DSN to the VERP return path, which its transport map routes to Relay's bounce listener."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import running_relay, wait_for
from helpers.delivery import delivery_config, final, status, submit
from helpers.peers import Sink, SinkBehaviour, Zone, sinks
from helpers.postfix import Postfix, free_port, postfix, unavailable

from relay.model import MessageView
from relay.service.lifecycle import Relay

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no private Postfix: {unavailable()}")

DOMAIN = "bounces.example.com"
SINK_IP = "127.0.0.2"  # where Postfix delivers example.com
POSTFIX_IP = "127.0.0.3"  # example.com's MX, as Relay sees it
HOSTNAME = "postfix.relay.test"
GONE = "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"
FULL = "452 4.2.2 <full@example.com>: Mailbox full"


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with sinks(SINK_IP) as (s,):
        s.behaviour = SinkBehaviour(rcpt={"gone@example.com": GONE, "full@example.com": FULL})
        yield s


@pytest.fixture
async def peers(tmp_path: Path, zone: Zone, sink: Sink) -> AsyncIterator[tuple[Relay, Postfix]]:
    """Relay delivering example.com to Postfix, and Postfix sending example.com on to the sink
    and bounces.example.com back to Relay's bounce listener."""
    zone.mx("example.com", (10, "mx.example.com"))
    zone.a("mx.example.com", POSTFIX_IP)
    port = free_port(POSTFIX_IP)  # Relay's [delivery] port is Postfix's smtpd port
    config = delivery_config(tmp_path, zone, port, bounces={"domain": DOMAIN, "listen": ["127.0.0.1:0"]})
    async with running_relay(config, deliver=True) as relay:
        transports = {
            "example.com": f"smtp:[{SINK_IP}]:{sink.port}",
            DOMAIN: f"smtp:[127.0.0.1]:{relay.bounce_addresses[0].port}",
        }
        # a delay notice once a message has waited 1s, sent on the next deferred-queue scan
        async with postfix(POSTFIX_IP, port, transports, hostname=HOSTNAME, delay_warning_time="1s") as pf:
            yield relay, pf


def events(msg: MessageView, kind: str) -> list[dict[str, Any]]:
    return [dict(e.details, recipient=e.recipient) for e in msg.events if e.type == kind]


async def with_event(relay: Relay, qid: str, kind: str) -> MessageView | None:
    assert relay.store is not None
    msg = await relay.store.get_message(qid)
    return msg if msg is not None and any(e.type == kind for e in msg.events) else None


async def bounced_by_postfix(relay: Relay) -> tuple[str, MessageView, dict[str, Any]]:
    """Send to gone@example.com through Postfix; the message, and its "bounced" event, once
    Postfix's DSN has come back."""
    assert relay.store is not None
    qid = await submit(relay, ["gone@example.com"])
    msg = await final(relay, qid)
    assert status(msg) == {"gone@example.com": "delivered"}  # Postfix took it: 250 queued
    (handed,) = events(msg, "delivered")
    assert "queued as" in str(handed), handed
    msg = await wait_for(lambda: with_event(relay, qid, "bounced"), timeout=30)
    (bounce,) = events(msg, "bounced")
    return qid, msg, bounce


async def test_postfix_dsn_comes_back_and_bounces_the_recipient(peers: tuple[Relay, Postfix]) -> None:
    relay, pf = peers
    assert relay.store is not None
    _qid, msg, bounce = await bounced_by_postfix(relay)
    assert status(msg) == {"gone@example.com": "bounced"}
    assert bounce["recipient"] == "gone@example.com"
    assert bounce["async"] is True
    assert bounce["report"] == "dsn"
    assert bounce["action"] == "failed"
    assert bounce["status"] == "5.1.1"
    assert bounce["reply"] == GONE
    assert bounce["remote_mta"] == SINK_IP
    assert bounce["rule"]
    raw = await relay.store.bounce_report(bounce["report_id"])
    assert raw is not None
    # Postfix's own DSN, not one a test wrote
    assert b"\nX-Postfix-Queue-ID: " in raw, raw[:2000]
    assert f"\nReporting-MTA: dns; {HOSTNAME}".encode() in raw, raw[:2000]
    assert "status=bounced" in pf.maillog


# Postfix folds its notice: "... User unknown (in reply to\n    RCPT TO command)"; the report
# parser finds the command across the fold, so "user unknown" is read as a missing mailbox.
async def test_postfix_unknown_user_is_a_hard_bounce_and_suppressed(peers: tuple[Relay, Postfix]) -> None:
    relay, _pf = peers
    assert relay.store is not None
    qid, msg, bounce = await bounced_by_postfix(relay)
    assert status(msg) == {"gone@example.com": "bounced"}
    assert (bounce["reason"], bounce["hard"]) == ("userunknown", True), bounce
    entry = await relay.store.suppression_check("gone@example.com")
    assert entry is not None
    assert entry.reason == "hard_bounce"
    assert entry.source_queue_id == qid


async def test_postfix_delay_notice_is_a_deferral_that_changes_no_state(peers: tuple[Relay, Postfix]) -> None:
    relay, pf = peers
    assert relay.store is not None
    qid = await submit(relay, ["full@example.com"])
    msg = await final(relay, qid)
    assert status(msg) == {"full@example.com": "delivered"}

    msg = await wait_for(lambda: with_event(relay, qid, "deferred"), timeout=30)
    assert status(msg) == {"full@example.com": "delivered"}
    (deferral,) = events(msg, "deferred")
    assert deferral["async"] is True
    assert deferral["hard"] is False
    assert deferral["reason"] == "mailboxfull"
    raw = await relay.store.bounce_report(deferral["report_id"])
    assert raw is not None
    assert b"\nX-Postfix-Queue-ID: " in raw, raw[:2000]
    assert b"Action: delayed" in raw
    assert await relay.store.suppression_check("full@example.com") is None
    assert "sender delay notification" in pf.maillog
