"""Delivery against real peers: a DNS server on loopback and aiosmtpd sinks on 127.0.0.x."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from helpers import running_relay, wait_for
from helpers.delivery import attempts, delivery_config, final, first_attempt, status, submit
from helpers.peers import Greeter, Sink, Zone, sinks

from relay.service.lifecycle import Relay


@pytest.fixture
async def relay_and_sinks(tmp_path: Path, zone: Zone) -> AsyncIterator[tuple[Relay, list[Sink]]]:
    async with sinks("127.0.0.2", "127.0.0.3") as (s2, s3):
        async with running_relay(delivery_config(tmp_path, zone, s2.port), deliver=True) as relay:
            yield relay, [s2, s3]


async def test_delivers_to_the_preferred_mx(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, (best, backup) = relay_and_sinks
    zone.mx("example.com", (20, "mx2.example.com"), (10, "mx1.example.com"))
    zone.a("mx1.example.com", "127.0.0.2")
    zone.a("mx2.example.com", "127.0.0.3")
    qid = await submit(relay, ["jane@example.com"])
    msg = await final(relay, qid)
    assert status(msg) == {"jane@example.com": "delivered"}
    assert best.rcpts == ["jane@example.com"]
    assert backup.messages == []
    (attempt,) = attempts(msg)
    assert attempt["type"] == "delivered"
    assert attempt["attempt"] == 1
    assert attempt["mx_host"] == "mx1.example.com"
    assert attempt["ip"] == "127.0.0.2"
    assert attempt["port"] == best.port
    assert attempt["tls"] == "none"
    assert attempt["code"] == 250
    assert attempt["enhanced_code"] == "2.0.0"
    assert attempt["reply"] == "OK: queued as SINK"
    assert isinstance(attempt["duration_ms"], int)
    assert msg.recipients[0].last_response == "250 2.0.0 OK: queued as SINK"
    assert msg.recipients[0].next_attempt_at is None
    # what arrived is what was stored
    assert best.messages[0].data.replace(b"\r\n", b"\n") == (await relay.store.load_bodies([qid]))[qid].replace(
        b"\r\n", b"\n"
    )  # type: ignore[union-attr]


async def test_falls_back_when_the_first_mx_refuses_connections(
    relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone
) -> None:
    relay, (_, backup) = relay_and_sinks
    zone.mx("example.com", (10, "dead.example.com"), (20, "mx2.example.com"))
    zone.a("dead.example.com", "127.0.0.9")  # nothing listens there
    zone.a("mx2.example.com", "127.0.0.3")
    msg = await final(relay, await submit(relay, ["jane@example.com"]))
    assert status(msg) == {"jane@example.com": "delivered"}
    assert backup.rcpts == ["jane@example.com"]
    (attempt,) = attempts(msg)
    assert attempt["mx_host"] == "mx2.example.com"
    assert "dead.example.com [127.0.0.9]" in attempt["tried"][0]
    assert "refused" in attempt["tried"][0].lower()


async def test_falls_back_when_the_first_mx_greets_with_5xx(tmp_path: Path, zone: Zone) -> None:
    async with sinks("127.0.0.3") as (backup,):
        greeter = await Greeter("127.0.0.4", backup.port, b"554 5.7.1 go away\r\n").start()
        try:
            async with running_relay(delivery_config(tmp_path, zone, backup.port), deliver=True) as relay:
                zone.mx("example.com", (10, "grumpy.example.com"), (20, "mx2.example.com"))
                zone.a("grumpy.example.com", "127.0.0.4")
                zone.a("mx2.example.com", "127.0.0.3")
                msg = await final(relay, await submit(relay, ["jane@example.com"]))
        finally:
            await greeter.close()
    assert status(msg) == {"jane@example.com": "delivered"}
    assert greeter.connections == 1
    assert "554" in attempts(msg)[0]["tried"][0]


async def test_every_mx_failing_defers(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, _ = relay_and_sinks
    zone.mx("example.com", (10, "dead.example.com"))
    zone.a("dead.example.com", "127.0.0.9")
    qid = await submit(relay, ["jane@example.com"])
    assert relay.store is not None

    msg = await first_attempt(relay, qid)
    assert msg.recipients[0].status == "deferred"
    (attempt, *_) = attempts(msg)
    assert attempt["type"] == "deferred"
    assert attempt["enhanced_code"] == "4.4.1"
    assert attempt["code"] is None
    assert "next_attempt_at" in attempt


async def test_implicit_mx(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, (best, _) = relay_and_sinks
    zone.a("plain.example", "127.0.0.2")  # no MX: the domain's own address
    msg = await final(relay, await submit(relay, ["bob@plain.example"]))
    assert status(msg) == {"bob@plain.example": "delivered"}
    assert best.rcpts == ["bob@plain.example"]
    assert attempts(msg)[0]["mx_host"] == "plain.example"


async def test_null_mx_bounces(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, _ = relay_and_sinks
    zone.mx("nomail.example", (0, "."))
    msg = await final(relay, await submit(relay, ["x@nomail.example"]))
    assert status(msg) == {"x@nomail.example": "bounced"}
    (attempt,) = attempts(msg)
    assert attempt["enhanced_code"] == "5.1.10"
    assert msg.recipients[0].attempts == 1


async def test_nxdomain_bounces(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, _ = relay_and_sinks
    msg = await final(relay, await submit(relay, ["x@does-not-exist.example"]))
    assert status(msg) == {"x@does-not-exist.example": "bounced"}
    assert attempts(msg)[0]["enhanced_code"] == "5.1.2"
    assert "NXDOMAIN" in msg.recipients[0].last_response  # type: ignore[operator]


async def test_servfail_defers_then_delivers_once_dns_heals(
    relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone
) -> None:
    relay, (best, _) = relay_and_sinks
    zone.mx("flaky.example", (10, "mx1.flaky.example"))
    zone.a("mx1.flaky.example", "127.0.0.2")
    zone.servfail("flaky.example")
    qid = await submit(relay, ["x@flaky.example"])
    assert relay.store is not None

    assert attempts(await first_attempt(relay, qid))[0]["type"] == "deferred"
    zone.heal("flaky.example")
    msg = await final(relay, qid)
    assert status(msg) == {"x@flaky.example": "delivered"}
    kinds = [a["type"] for a in attempts(msg)]
    assert kinds[0] == "deferred"
    assert kinds[-1] == "delivered"
    assert attempts(msg)[0]["enhanced_code"] == "4.4.3"
    assert best.rcpts == ["x@flaky.example"]


async def test_4xx_then_success_on_retry(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, (best, _) = relay_and_sinks
    best.behaviour.data = ["451 4.3.0 try later", "452 4.3.1 still busy"]
    zone.a("retry.example", "127.0.0.2")
    msg = await final(relay, await submit(relay, ["x@retry.example"]))
    assert status(msg) == {"x@retry.example": "delivered"}
    history = attempts(msg)
    assert [(a["type"], a["attempt"], a["code"]) for a in history] == [
        ("deferred", 1, 451),
        ("deferred", 2, 452),
        ("delivered", 3, 250),
    ]
    assert history[0]["reply"] == "try later"
    assert msg.recipients[0].attempts == 3
    assert len(best.messages) == 1


async def test_5xx_bounces_without_retry(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, (best, _) = relay_and_sinks
    best.behaviour.rcpt["gone@example.org"] = "550 5.1.1 <gone@example.org>: user unknown"
    zone.a("example.org", "127.0.0.2")
    msg = await final(relay, await submit(relay, ["gone@example.org"]))
    assert status(msg) == {"gone@example.org": "bounced"}
    (attempt,) = attempts(msg)
    assert (attempt["code"], attempt["enhanced_code"], attempt["reply"]) == (
        550,
        "5.1.1",
        "<gone@example.org>: user unknown",
    )
    assert best.messages == []


async def test_5xx_to_data_bounces_every_recipient(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, (best, _) = relay_and_sinks
    best.behaviour.data = ["554 5.6.0 content rejected"]
    zone.a("example.org", "127.0.0.2")
    msg = await final(relay, await submit(relay, ["a@example.org", "b@example.org"]))
    assert status(msg) == {"a@example.org": "bounced", "b@example.org": "bounced"}
    assert {a["reply"] for a in attempts(msg)} == {"content rejected"}


async def test_expires_after_max_age(tmp_path: Path, zone: Zone) -> None:
    async with sinks("127.0.0.2") as (sink,):
        sink.behaviour.data = ["451 4.3.0 busy"] * 1000
        config = delivery_config(tmp_path, zone, sink.port, delivery={"max_age": "1s", "retry_schedule": ["300ms"]})
        async with running_relay(config, deliver=True) as relay:
            zone.a("slow.example", "127.0.0.2")
            msg = await final(relay, await submit(relay, ["x@slow.example"]))
    assert status(msg) == {"x@slow.example": "expired"}
    history = attempts(msg)
    assert history[-1]["type"] == "expired"
    assert all(a["type"] == "deferred" for a in history[:-1])
    assert msg.recipients[0].next_attempt_at is None


async def test_several_domains_in_one_message(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, (s2, s3) = relay_and_sinks
    zone.mx("one.example", (10, "mx.one.example"))
    zone.a("mx.one.example", "127.0.0.2")
    zone.mx("two.example", (10, "mx.two.example"))
    zone.a("mx.two.example", "127.0.0.3")
    rcpts = ["a@one.example", "b@one.example", "c@two.example"]
    msg = await final(relay, await submit(relay, rcpts))
    assert set(status(msg).values()) == {"delivered"}
    assert len(s2.messages) == 1  # one transaction for both one.example recipients
    assert sorted(s2.messages[0].rcpts) == ["a@one.example", "b@one.example"]
    assert s3.rcpts == ["c@two.example"]


async def test_per_recipient_results_in_one_transaction(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, (best, _) = relay_and_sinks
    best.behaviour.rcpt["nope@example.org"] = "550 5.1.1 no such user"
    zone.a("example.org", "127.0.0.2")
    msg = await final(relay, await submit(relay, ["yes@example.org", "nope@example.org"]))
    assert status(msg) == {"yes@example.org": "delivered", "nope@example.org": "bounced"}
    assert len(best.messages) == 1
    assert best.messages[0].rcpts == ["yes@example.org"]
    assert attempts(msg, "nope@example.org")[0]["code"] == 550
    assert attempts(msg, "yes@example.org")[0]["code"] == 250


async def test_smarthost_route_with_auth(tmp_path: Path, zone: Zone, self_signed: ssl.SSLContext) -> None:
    async with sinks("127.0.0.5", users={"relayuser": "relaypass"}, tls=self_signed) as (smarthost,):
        config = delivery_config(
            tmp_path, zone, 25,
            routes=[{"domains": ["*"], "host": "127.0.0.5", "port": smarthost.port, "username": "relayuser",
                     "password": "relaypass", "tls": "opportunistic"}],
        )  # fmt: skip
        async with running_relay(config, deliver=True) as relay:
            msg = await final(relay, await submit(relay, ["someone@anywhere.example"]))
    assert status(msg) == {"someone@anywhere.example": "delivered"}
    assert smarthost.messages[0].login == "relayuser"
    assert attempts(msg)[0]["mx_host"] == "127.0.0.5"
    assert zone.queries == []  # a route needs no MX lookup


async def test_smarthost_with_wrong_credentials_defers(tmp_path: Path, zone: Zone, self_signed: ssl.SSLContext) -> None:
    async with sinks("127.0.0.5", users={"relayuser": "relaypass"}, tls=self_signed) as (smarthost,):
        config = delivery_config(
            tmp_path, zone, 25,
            routes=[{"domains": ["anywhere.example"], "host": "127.0.0.5", "port": smarthost.port,
                     "username": "relayuser", "password": "wrong", "tls": "opportunistic"}],
        )  # fmt: skip
        async with running_relay(config, deliver=True) as relay:
            qid = await submit(relay, ["someone@anywhere.example"])

            msg = await first_attempt(relay, qid)
    (attempt, *_) = attempts(msg)
    assert attempt["type"] == "deferred"
    assert attempt["code"] == 535
    assert attempt["enhanced_code"] == "4.7.8"


@pytest.fixture(scope="module")
def self_signed() -> ssl.SSLContext:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.tls.example").configure_cert(ctx)
    return ctx


async def test_starttls_to_a_self_signed_sink(tmp_path: Path, zone: Zone, self_signed: ssl.SSLContext) -> None:
    async with sinks("127.0.0.6", tls=self_signed) as (sink,):
        async with running_relay(delivery_config(tmp_path, zone, sink.port), deliver=True) as relay:
            zone.mx("tls.example", (10, "mx.tls.example"))
            zone.a("mx.tls.example", "127.0.0.6")
            msg = await final(relay, await submit(relay, ["x@tls.example"]))
    assert status(msg) == {"x@tls.example": "delivered"}
    assert sink.messages[0].tls
    assert attempts(msg)[0]["tls"].startswith("TLSv1.")


async def test_required_tls_refuses_an_unverifiable_certificate(
    tmp_path: Path, zone: Zone, self_signed: ssl.SSLContext
) -> None:
    async with sinks("127.0.0.6", tls=self_signed) as (sink,):
        config = delivery_config(tmp_path, zone, sink.port, delivery={"tls": "required"})
        async with running_relay(config, deliver=True) as relay:
            zone.mx("tls.example", (10, "mx.tls.example"))
            zone.a("mx.tls.example", "127.0.0.6")
            qid = await submit(relay, ["x@tls.example"])

            msg = await first_attempt(relay, qid)
    (attempt, *_) = attempts(msg)
    assert attempt["type"] == "deferred"
    assert attempt["enhanced_code"] == "4.7.5"
    assert sink.messages == []


async def test_required_tls_without_starttls_defers(
    relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone, tmp_path: Path
) -> None:
    _, (sink, _) = relay_and_sinks
    config = delivery_config(tmp_path / "other", zone, sink.port, delivery={"tls": "required"})
    async with running_relay(config, deliver=True) as relay:
        zone.a("plain.example", "127.0.0.2")
        qid = await submit(relay, ["x@plain.example"])

        msg = await first_attempt(relay, qid)
    assert attempts(msg)[0]["enhanced_code"] == "4.7.4"
    assert sink.messages == []


async def test_reuses_connections_and_respects_per_domain(tmp_path: Path, zone: Zone) -> None:
    async with sinks("127.0.0.2") as (sink,):
        sink.behaviour.data_delay = 0.05
        config = delivery_config(tmp_path, zone, sink.port, delivery={"per_domain": 2})
        async with running_relay(config, deliver=True) as relay:
            zone.a("busy.example", "127.0.0.2")
            qids = [await submit(relay, [f"u{i}@busy.example"]) for i in range(12)]
            for qid in qids:
                await final(relay, qid)
    assert len(sink.messages) == 12
    assert sink.max_active <= 2
    assert sink.connections <= 4  # connections are reused, not one per message


async def test_queue_retry_and_delete(relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone) -> None:
    relay, _ = relay_and_sinks
    zone.mx("example.net", (10, "dead.example.net"))
    zone.a("dead.example.net", "127.0.0.9")
    qid = await submit(relay, ["a@example.net"])
    assert relay.store is not None
    store = relay.store

    async def deferred() -> bool:
        (m,) = await store.lookup(qid)
        return m.recipients[0].status == "deferred"

    await wait_for(deferred)
    assert await store.cancel(qid, by="test") == 1
    (m,) = await store.lookup(qid)
    assert status(m) == {"a@example.net": "cancelled"}
    assert m.events[-1].type == "cancelled"


async def test_shutdown_records_the_attempts_it_cancels(tmp_path: Path, zone: Zone) -> None:
    async with sinks("127.0.0.2") as (sink,):
        sink.behaviour.data_delay = 5  # longer than the grace period
        config = delivery_config(tmp_path, zone, sink.port, delivery={"shutdown_grace": "300ms"})
        relay = Relay(config)
        await relay.startup(deliver=True)
        zone.a("slow.example", "127.0.0.2")
        qid = await submit(relay, ["x@slow.example"])
        assert relay.store is not None
        store = relay.store

        async def sending() -> bool:
            return sink.active > 0 and (await store.lookup(qid))[0].recipients[0].status == "sending"

        await wait_for(sending)
        await relay.shutdown()
    async with running_relay(config) as again:
        (m,) = await again.store.lookup(qid)  # type: ignore[union-attr]
    # the cancelled attempt is an attempt like any other: recorded, deferred, the lease let go
    assert (m.recipients[0].status, m.recipients[0].attempts) == ("deferred", 1)
    assert m.recipients[0].last_response == "4.4.2 delivery attempt interrupted: Relay is shutting down"
    assert [e.type for e in m.events] == ["received", "deferred"]


async def test_a_new_message_is_delivered_without_waiting_for_a_poll(
    relay_and_sinks: tuple[Relay, list[Sink]], zone: Zone
) -> None:
    relay, _ = relay_and_sinks
    assert relay.delivery is not None
    relay.delivery.poll_interval = 3600  # only the wake-up on enqueue can start it
    zone.a("fast.example", "127.0.0.2")
    await asyncio.sleep(0.1)
    qid = await submit(relay, ["x@fast.example"])
    msg = await final(relay, qid, timeout=10)
    assert status(msg) == {"x@fast.example": "delivered"}
