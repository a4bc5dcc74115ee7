"""Delivery against hostile and broken peers: every accepted recipient ends exactly once, and the
log says why. Garbage and oversized replies, a store that fails while recording, a stall past the
lease, an address the client library refuses, a destination that is Relay itself, credentials
offered without TLS, a slow domain beside a fast one, and two worker processes racing."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import ServeProcess, running_relay, send_to, serve_config, smtp_client, wait_drained, wait_for
from helpers.delivery import attempts, delivery_config, final, first_attempt, status, submit
from helpers.hostile import ScriptedPeer
from helpers.peers import Zone, dns_server, sinks

from relay.config import Listen
from relay.logstore import LogStore
from relay.model import NewMessage
from relay.net import bind
from relay.service.lifecycle import Relay

MSG = b"From: app@example.com\r\nSubject: Hi\r\n\r\nHello\r\n"


@pytest.fixture
async def peer(zone: Zone) -> AsyncIterator[ScriptedPeer]:
    p = await ScriptedPeer("127.0.0.2").start()
    zone.a("hostile.example", "127.0.0.2")
    try:
        yield p
    finally:
        await p.close()


@asynccontextmanager
async def _relay(tmp_path: Path, zone: Zone, port: int, **extra: Any) -> AsyncIterator[Relay]:
    """A delivering Relay whose DNS is the test's zone and whose destination port is ``port``."""
    async with running_relay(delivery_config(tmp_path, zone, port, **extra), deliver=True) as relay:
        yield relay


# -- 1. no stranded recipient


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"this is not an SMTP reply\r\n", "malformed reply: this is not an SMTP reply"),
        (b"250 " + b"x" * 9000 + b"\r\n", "malformed reply: Response too long"),
    ],
    ids=["garbage-line", "9000-byte-line"],
)
async def test_a_reply_the_library_cannot_parse_defers_then_delivers(
    tmp_path: Path, zone: Zone, peer: ScriptedPeer, reply: bytes, why: str
) -> None:
    peer.replies["MAIL"] = reply
    async with _relay(tmp_path, zone, peer.port) as relay:
        qid = await submit(relay, ["jane@hostile.example"])
        msg = await first_attempt(relay, qid)
        assert status(msg) == {"jane@hostile.example": "deferred"}  # never left "sending"
        (first,) = attempts(msg)
        assert first["enhanced_code"] == "4.5.0"
        assert why in first["reply"]
        await wait_for(lambda: peer.open_connections == 0)  # the broken connection was closed
        peer.heal()
        msg = await final(relay, qid)
    assert status(msg) == {"jane@hostile.example": "delivered"}
    assert peer.rcpts == ["jane@hostile.example"]


async def test_a_peer_that_never_heals_expires_the_recipient(tmp_path: Path, zone: Zone, peer: ScriptedPeer) -> None:
    peer.replies["MAIL"] = b"\x00\xff garbage\r\n"
    async with _relay(tmp_path, zone, peer.port, delivery={"max_age": "1s"}) as relay:
        msg = await final(relay, await submit(relay, ["jane@hostile.example"]))
    assert status(msg) == {"jane@hostile.example": "expired"}
    assert attempts(msg)[-1]["enhanced_code"] == "4.5.0"
    assert peer.messages == []


async def test_a_stall_is_cut_before_the_lease_runs_out(tmp_path: Path, zone: Zone, peer: ScriptedPeer) -> None:
    peer.stall.add("MAIL")
    async with _relay(tmp_path, zone, peer.port, delivery={"lease": "2s", "command_timeout": "1m"}) as relay:
        qid = await submit(relay, ["jane@hostile.example"])
        msg = await first_attempt(relay, qid)
        assert status(msg) == {"jane@hostile.example": "deferred"}
        assert attempts(msg)[0]["enhanced_code"] == "4.4.7"  # gave up at 80 % of the lease, from the claim
        peer.heal()
        msg = await final(relay, qid)
    assert status(msg) == {"jane@hostile.example": "delivered"}
    assert peer.rcpts == ["jane@hostile.example"]


async def test_an_address_the_client_library_refuses_is_deferred_not_injected(
    tmp_path: Path, zone: Zone, peer: ScriptedPeer
) -> None:
    """Intake never accepts such an address; one that reaches the queue anyway (an older
    version, a hand-edited store) must not smuggle a command, nor strand the recipient."""
    async with _relay(tmp_path, zone, peer.port, delivery={"max_age": "1s"}) as relay:
        assert relay.store is not None
        evil = "x\r\nRSET\r\nMAIL FROM:<evil@hostile.example>@hostile.example"
        await relay.store.enqueue(
            NewMessage(queue_id="01JAAAAAAAAAAAAAAAAAAAAAAA", message_id="evil@test", mail_from="app@example.com",
                       recipients=(evil,), subject="", tags=(), user=None, client_ip="127.0.0.1",
                       received_at=time.time(), raw=MSG)
        )  # fmt: skip
        msg = await final(relay, "01JAAAAAAAAAAAAAAAAAAAAAAA")
    assert status(msg) == {evil: "expired"}
    assert "ValueError" in attempts(msg)[0]["reply"]
    assert not any("evil@" in c for c in peer.commands)
    assert peer.messages == []


async def test_a_store_failure_while_recording_is_retried_and_delivers_once(
    tmp_path: Path, zone: Zone, peer: ScriptedPeer, caplog: pytest.LogCaptureFixture
) -> None:
    async with _relay(tmp_path, zone, peer.port) as relay:
        # A real failure inside SQLite: recording "delivered" aborts until the trigger is dropped.
        db = sqlite3.connect(tmp_path / "data" / "relay.db")
        db.execute(
            "CREATE TRIGGER fail_record BEFORE UPDATE OF status ON recipients WHEN NEW.status = 'delivered' "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        db.commit()
        qid = await submit(relay, ["jane@hostile.example"])
        await wait_for(lambda: peer.messages)
        await wait_for(lambda: "could not record the attempt" in caplog.text)
        db.execute("DROP TRIGGER fail_record")
        db.commit()
        db.close()
        msg = await final(relay, qid)
    assert status(msg) == {"jane@hostile.example": "delivered"}
    assert [e.type for e in msg.events] == ["received", "delivered"]
    assert peer.rcpts == ["jane@hostile.example"]  # delivered once, recorded once


# -- 2. no mail loop


async def test_an_mx_pointing_at_relay_itself_bounces_with_5_4_6(tmp_path: Path, zone: Zone) -> None:
    sock = bind(Listen("127.0.0.1", 0))
    port = sock.getsockname()[1]
    relay = Relay(delivery_config(tmp_path, zone, port))
    await relay.startup(smtp_sockets=[sock], deliver=True)
    try:
        zone.mx("loop.example", (10, "mx.loop.example"))
        zone.a("mx.loop.example", "127.0.0.1")
        msg = await final(relay, await submit(relay, ["jane@loop.example"]))
        assert relay.store is not None
        summary = await relay.store.queue_summary()
    finally:
        await relay.shutdown()
    assert status(msg) == {"jane@loop.example": "bounced"}
    (attempt,) = attempts(msg)
    assert attempt["enhanced_code"] == "5.4.6"
    assert attempt["reply"] == "mail for loop.example loops back to myself"
    assert sum(summary.counts.values()) == 1  # one message with one recipient, not hundreds


async def test_an_ehlo_reply_with_our_name_is_a_loop(tmp_path: Path, zone: Zone, peer: ScriptedPeer) -> None:
    peer.ehlo_name = "RELAY.TEST"  # greets as someone else, but answers EHLO as Relay
    async with _relay(tmp_path, zone, peer.port) as relay:
        msg = await final(relay, await submit(relay, ["jane@hostile.example"]))
    assert status(msg) == {"jane@hostile.example": "bounced"}
    assert msg.recipients[0].last_response == "5.4.6 mail for hostile.example loops back to myself"
    assert peer.messages == []


# -- 5. credentials only over TLS


@pytest.mark.parametrize("tls", ["opportunistic", "none"])
async def test_credentials_are_never_sent_without_tls(tmp_path: Path, zone: Zone, tls: str) -> None:
    peer = await ScriptedPeer("127.0.0.5", extensions=("AUTH PLAIN LOGIN", "8BITMIME")).start()
    try:
        routes = [{"domains": ["*"], "host": "127.0.0.5", "port": peer.port, "username": "u", "password": "p",
                   "tls": tls}]  # fmt: skip
        async with _relay(tmp_path, zone, 25, routes=routes) as relay:
            msg = await first_attempt(relay, await submit(relay, ["jane@anywhere.example"]))
    finally:
        await peer.close()
    assert status(msg) == {"jane@anywhere.example": "deferred"}
    assert msg.recipients[0].last_response == "4.7.0 refusing to send credentials without TLS"
    assert peer.commands  # it was reached
    assert not any(c.upper().startswith("AUTH") for c in peer.commands)
    assert not any(c.upper().startswith("MAIL") for c in peer.commands)


# -- 4. no head-of-line blocking


async def test_a_stalled_domain_does_not_hold_mail_for_another(tmp_path: Path, zone: Zone) -> None:
    async with sinks("127.0.0.2", "127.0.0.3") as (slow, fast):
        slow.behaviour.data_delay = 5
        zone.a("slow.example", "127.0.0.2")
        zone.a("fast.example", "127.0.0.3")
        config = delivery_config(
            tmp_path, zone, slow.port, delivery={"concurrency": 4, "per_domain": 2, "shutdown_grace": "0s"}
        )
        async with running_relay(config, deliver=True) as relay:
            assert relay.store is not None
            store = relay.store
            async with smtp_client(relay) as client:
                for i in range(40):
                    await client.sendmail("app@example.com", [f"u{i}@slow.example"], MSG)
            await wait_for(lambda: slow.active >= 2)
            qid = await submit(relay, ["jane@fast.example"])
            msg = await final(relay, qid)
            assert status(msg) == {"jane@fast.example": "delivered"}
            waiting = await store.queue_summary(active_only=True)
            assert sum(waiting.counts.values()) > 30  # all of them for slow.example
            assert slow.max_active <= 2
            assert fast.rcpts == ["jane@fast.example"]


async def test_large_messages_in_flight_stay_within_the_budget(tmp_path: Path, zone: Zone) -> None:
    """Each large message in flight holds its body and copies of it: past the budget they wait
    (one always goes), and small mail goes past them."""
    big = b"From: app@example.com\r\nSubject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 6000  # 600 KB
    async with sinks("127.0.0.2", "127.0.0.3") as (large, small):
        large.behaviour.data_delay = 1.0
        zone.a("large.example", "127.0.0.2")
        zone.a("small.example", "127.0.0.3")
        async with running_relay(delivery_config(tmp_path, zone, large.port), deliver=True) as relay:
            assert relay.delivery is not None
            assert relay.store is not None
            store = relay.store
            relay.delivery.large_budget = 1_000_000  # 600 KB messages: one at a time
            bigs = [await submit(relay, [f"u{i}@large.example"], big) for i in range(4)]
            await wait_for(lambda: large.active >= 1)
            msg = await final(relay, await submit(relay, ["jane@small.example"]))
            assert status(msg) == {"jane@small.example": "delivered"}
            pending = [q for q in bigs if [r.status for r in (await store.lookup(q))[0].recipients] != ["delivered"]]
            assert pending  # the small message went past the large ones
            for qid in bigs:
                assert list(status(await final(relay, qid, timeout=30)).values()) == ["delivered"]
    assert large.max_active == 1  # connections: never a second large transaction at once
    assert len(large.messages) == 4
    assert small.rcpts == ["jane@small.example"]


# -- 3. no double delivery while a lease holds, with two worker processes


async def test_two_workers_with_one_slot_per_domain_deliver_each_recipient_once(tmp_path: Path) -> None:
    with dns_server() as zone:
        async with sinks("127.0.0.2") as (sink,):
            sink.behaviour.data_delay = 1.0  # 1 s per message, 20 messages, a 3 s lease
            zone.mx("example.com", (10, "mx.example.com"))
            zone.a("mx.example.com", "127.0.0.2")
            cfg = serve_config(
                tmp_path,
                f"""[delivery]
port = {sink.port}
per_domain = 1
lease = "3s"
retry_schedule = ["200ms"]
connect_timeout = "2s"
command_timeout = "5s"
[dns]
nameservers = ["127.0.0.1:{zone.port}"]
timeout = "1s"
""",  # type: ignore[attr-defined]
            )
            server = await ServeProcess(cfg, "--processes", "2").start()
            try:
                rcpts = [f"user{i}@example.com" for i in range(20)]
                await asyncio.gather(*(send_to(server.smtp_port, r) for r in rcpts))
                store = await LogStore.open(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}")
                try:
                    await wait_drained(store)
                    assert (await store.queue_summary()).counts["delivered"] == 20
                finally:
                    await store.close()
            finally:
                server.terminate()
                assert await server.wait() == 0
    assert sorted(sink.rcpts) == sorted(rcpts)  # each exactly once
    assert sink.max_active <= 2  # one per domain in each of the two processes


async def test_two_nodes_on_one_postgres_deliver_each_recipient_once(
    tmp_path: Path, zone: Zone, postgres_url: str
) -> None:
    async with sinks("127.0.0.2") as (sink,):
        sink.behaviour.data_delay = 0.5
        zone.a("example.org", "127.0.0.2")
        nodes = []
        for name in ("a", "b"):
            config = delivery_config(
                tmp_path / name, zone, sink.port, store={"url": postgres_url},
                delivery={"per_domain": 1, "lease": "2s"},
            )  # fmt: skip
            nodes.append(running_relay(config, deliver=True))
        async with nodes[0] as a, nodes[1] as b:
            rcpts = [f"user{i}@example.org" for i in range(12)]
            for i, rcpt in enumerate(rcpts):
                await submit(a if i % 2 else b, [rcpt])
            assert a.store is not None
            store = a.store

            async def drained() -> bool:
                return sum((await store.queue_summary(active_only=True)).counts.values()) == 0

            await wait_for(drained, timeout=30)
    assert sorted(sink.rcpts) == sorted(rcpts)  # each exactly once, shared between the nodes
    assert sink.max_active <= 2


async def test_a_domain_with_many_dead_mx_costs_few_lookups(tmp_path: Path, zone: Zone) -> None:
    zone.mx("many.example", *((i, f"mx{i}.many.example") for i in range(200)))  # none has an address
    async with _relay(tmp_path, zone, 25, delivery={"retry_schedule": ["1h"]}) as relay:  # one attempt only
        msg = await first_attempt(relay, await submit(relay, ["jane@many.example"]))
    assert status(msg) == {"jane@many.example": "deferred"}
    assert attempts(msg)[0]["enhanced_code"] == "4.4.3"
    lookups = [q for q in zone.queries if q[0].startswith("mx")]
    assert len(lookups) <= 2 * 10  # A and AAAA of the first ten, as Postfix's smtp_mx_address_limit bounds it
