"""The node registry, dead nodes' leases, wake-ups across nodes and per_domain across the
cluster, with in-process Relays on one store (a real PostgreSQL database, or a SQLite file)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_config, metric, new_message, running_relay, store_url, stores, wait_for
from helpers.cluster import CountingSink, console_client, scalar, store_reader
from helpers.peers import dns_server
from sqlalchemy import text
from ulid import ULID

from relay.logstore import LogStore
from relay.model import Node, Outcome
from relay.service.lifecycle import Relay

store, url = stores.store, stores.url  # the fixtures, on both backends


def _config(tmp_path: Path, name: str, store_url: str, dns: Any = None, **sections: Any) -> Any:
    base: dict[str, Any] = {
        "dns": {"nameservers": [f"127.0.0.1:{dns.port if dns is not None else 53}"], "timeout": "2s"},
        "server": {"hostname": name, "data_dir": str(tmp_path / name)},
        "store": {"url": store_url},
        "cluster": {"heartbeat": "1s"},
        "delivery": {"lease": "120s", "retry_schedule": ["1h"], "connect_timeout": "5s", "shutdown_grace": "1s"},
    }
    for key, extra in sections.items():
        base[key] = {**base.get(key, {}), **extra}
    return make_config(tmp_path / name, **base)


@asynccontextmanager
async def _relays(configs: list[Any], *, deliver: bool = True) -> AsyncIterator[list[Relay]]:
    async with AsyncExitStack() as stack:
        relays = [await stack.enter_async_context(running_relay(c, deliver=deliver)) for c in configs]
        yield relays


def _node(name: str, heartbeat_at: float, heartbeat: float = 1.0) -> Node:
    return Node(name, "elsewhere", 4242, "0.0.1", heartbeat_at - 60, heartbeat_at, heartbeat, 3, None)


async def _plant_leases(into: LogStore, owner: str, rcpts: tuple[str, ...], *, lease: float = 120) -> list[str]:
    """Messages queued, then claimed by ``owner`` (a node that will not finish them)."""
    return list(await _plant(into, owner, rcpts, lease=lease))


async def _plant(into: LogStore, owner: str, rcpts: tuple[str, ...], *, lease: float = 120) -> dict[str, int]:
    """The same, each queue id with its recipient's id."""
    qids = [str(ULID()) for _ in rcpts]
    for qid, rcpt in zip(qids, rcpts, strict=True):
        await into.enqueue(new_message(qid, (rcpt,)))
    claimed = await into.claim_due(owner, lease=lease, limit=100)
    assert {c.queue_id for c in claimed} == set(qids)
    return {c.queue_id: c.recipient_id for c in claimed}


# -- the registry and dead nodes


async def test_a_dead_nodes_leases_are_freed_at_start_and_delivered(tmp_path: Path, url: str) -> None:
    """A node dead for a while (say this host's previous life, killed -9) holds recipients with
    a long lease: the next node frees them 3 of the dead node's intervals after it starts (it
    cannot tell a silence from before its start from a database outage), not two minutes later."""
    with dns_server() as zone:
        sink = await CountingSink().start("127.0.0.2")
        try:
            zone.mx("example.com", (10, "mx.example.com"))
            zone.a("mx.example.com", "127.0.0.2")
            pre = await LogStore.open(url)
            await pre.upgrade()
            await pre.node_register(_node("gone:1:dead", time.time() - 30))
            qids = await _plant_leases(pre, "gone:1:dead", ("a@example.com", "b@example.com"))
            await pre.close()
            cfg = _config(tmp_path, "n1.test", url, zone, delivery={"port": sink.port})
            async with _relays([cfg]) as (relay,):
                assert relay.store is not None
                store = relay.store

                async def delivered() -> bool:
                    views = [await store.get_message(q) for q in qids]
                    return all(v is not None and v.recipients[0].status == "delivered" for v in views)

                await wait_for(delivered, timeout=10)
                assert len(sink.copies) == 2
                by_name = {n.name: n for n in await relay.store.nodes()}
                assert by_name["gone:1:dead"].to_json(time.time())["state"] == "dead"
                me = by_name[relay.delivery.owner]  # type: ignore[union-attr]
                assert me.alive(time.time())
                assert (me.host, me.version) != ("", "")
                for qid in qids:
                    view = await relay.store.get_message(qid)
                    assert view is not None
                    assert view.recipients[0].status == "delivered"
                    # no event for the release; the attempt names its node
                    assert [e.type for e in view.events] == ["received", "delivered"]
                    assert view.events[-1].details["node"] == relay.delivery.owner  # type: ignore[union-attr]
            assert {c.helo for c in sink.copies} == {"n1.test"}
        finally:
            await sink.close()
    s = await LogStore.open(url)
    try:
        states = {n.name: n.to_json(time.time())["state"] for n in await s.nodes()}
        assert states["gone:1:dead"] == "dead"
        assert list(states.values()).count("stopped") == 1  # the Relay above, shut down cleanly
    finally:
        await s.close()


async def test_the_dead_check_is_timed_by_the_other_nodes_heartbeat(tmp_path: Path) -> None:
    """A node beating every 0.3 s that falls silent is dead 0.9 s after its last beat; a node
    whose own heartbeat is 10 s still frees its leases then, not at its own next beat."""
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        fast = await LogStore.open(url)
        stack.push_async_callback(fast.close)
        await fast.upgrade()
        name = "fast:2:x"
        await fast.node_register(_node(name, time.time(), heartbeat=0.3))
        await _plant_leases(fast, name, ("c@example.com",))

        async def beat_for(seconds: float) -> float:
            until = time.time() + seconds
            while time.time() < until:
                await fast.node_watch(_node(name, time.time(), heartbeat=0.3), name)
                await asyncio.sleep(0.3)
            last = time.time()
            await fast.node_watch(_node(name, last, heartbeat=0.3), name)
            return last

        beating = asyncio.ensure_future(beat_for(3.0))
        cfg = _config(tmp_path, "n1.test", url, cluster={"heartbeat": "10s"}, delivery={"port": 9})
        relay = await stack.enter_async_context(running_relay(cfg, deliver=True))
        assert relay.heartbeat is not None
        last_beat = await beating
        reader = await stack.enter_async_context(store_reader(url))

        async def freed() -> bool:
            n = await scalar(reader, "SELECT count(*) FROM recipients WHERE lease_owner = :o", o=name)
            return n == 0

        await wait_for(freed, timeout=8, interval=0.02)
        took = time.time() - last_beat
        print(f"\nfreed {took:.2f}s after the silent node's last heartbeat (dead after 0.9s)")
        assert took < 5  # well before the Relay's own next heartbeat (10 s after its start)


async def test_a_node_cut_off_and_taken_for_dead_loses_nothing(store: LogStore) -> None:
    """Node A claims, goes silent, is taken for dead: B frees and claims A's recipient. A's late
    record is refused by the lease check (B's outcome stands: at worst a second delivery); A's
    next heartbeat makes it alive again. A record after the release but before anyone claims
    leaves the recipient due, never lost and never 'sending' forever."""
    t0 = time.time()
    await store.node_register(_node("a:1:x", t0))
    await store.node_register(_node("b:2:y", t0))
    (qid,) = await _plant_leases(store, "a:1:x", ("d@example.com",))
    ((qid2, rid2),) = (await _plant(store, "a:1:x", ("e@example.com",))).items()
    later = t0 + 10  # A silent for 10 heartbeat intervals
    watch = await store.node_watch(_node("b:2:y", later), "b:2:y", now=later)
    assert [(f.name, f.recipients) for f in watch.freed] == [("a:1:x", 2)]
    again = await store.node_watch(_node("b:2:y", later + 1), "b:2:y", now=later + 1)
    assert again.freed == ()  # marked: freed once
    # A's late record of qid2 before anyone claims it: not written, the recipient stays due.
    await store.record("a:1:x", [_outcome(rid2, qid2, "e@example.com", later)])
    view = await store.get_message(qid2)
    assert view is not None
    assert view.recipients[0].status == "queued"
    claimed = await store.claim_due("b:2:y", lease=120, now=later + 2)
    assert {c.queue_id for c in claimed} == {qid, qid2}
    rid = {c.queue_id: c.recipient_id for c in claimed}
    await store.record("a:1:x", [_outcome(rid[qid], qid, "d@example.com", later + 2)])  # refused: B holds it
    view = await store.get_message(qid)
    assert view is not None
    assert view.recipients[0].status == "sending"
    await store.record("b:2:y", [_outcome(rid[qid], qid, "d@example.com", later + 3, node="b:2:y")])
    view = await store.get_message(qid)
    assert view is not None
    assert view.recipients[0].status == "delivered"
    assert [e.details["node"] for e in view.events if e.type == "delivered"] == ["a:1:x", "b:2:y"]
    # A comes back: its next heartbeat finds it was taken for dead, and makes it alive again.
    back = await store.node_watch(_node("a:1:x", later + 4), "a:1:x", now=later + 4)
    assert back.revived
    states = {n.name: n.to_json(later + 4)["state"] for n in await store.nodes()}
    assert states == {"a:1:x": "alive", "b:2:y": "alive"}
    # a node stopped cleanly is never taken for dead; a day later its row is gone
    await store.node_stop("b:2:y", now=later + 5)
    watch = await store.node_watch(_node("a:1:x", later + 100), "a:1:x", now=later + 100)
    assert watch.freed == ()
    await store.node_watch(_node("a:1:x", later + 90000), "a:1:x", now=later + 90000)
    assert [n.name for n in await store.nodes()] == ["a:1:x"]


def _outcome(rid: int, qid: str, address: str, at: float, node: str = "a:1:x") -> Outcome:
    return Outcome(
        recipient_id=rid, queue_id=qid, address=address, status="delivered", attempts=1, next_attempt_at=None,
        last_response="250 ok", event="delivered", details={"node": node}, at=at,
    )  # fmt: skip


# -- wake-ups across nodes


async def test_mail_taken_on_one_node_wakes_delivery_on_another(tmp_path: Path) -> None:
    """Node B polls once an hour: only NOTIFY from node A's intake can start it. When B's
    listening connection is cut, it reconnects and is woken again."""
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        zone = stack.enter_context(dns_server())
        sink = await CountingSink().start("127.0.0.2")
        stack.push_async_callback(sink.close)
        zone.mx("example.com", (10, "mx.example.com"))
        zone.a("mx.example.com", "127.0.0.2")
        intake = await stack.enter_async_context(running_relay(_config(tmp_path, "a.test", url)))
        cfg_b = _config(tmp_path, "b.test", url, zone, delivery={"port": sink.port, "poll_interval": "1h"})
        b = await stack.enter_async_context(running_relay(cfg_b, deliver=True))
        assert intake.store is not None
        assert b.wakeups is not None
        await wait_for(b.wakeups.connected.is_set, timeout=10)
        await asyncio.sleep(0.2)  # B's first look (at start) is over: only a wake-up starts it now
        await intake.store.enqueue(new_message(str(ULID()), ("f@example.com",)))
        await wait_for(lambda: len(sink.copies) == 1, timeout=5)
        assert sink.copies[0].helo == "b.test"

        # Cut B's listening connection (as a PostgreSQL restart would): it listens again.
        reader = await stack.enter_async_context(store_reader(url))
        before = b.wakeups.notifications
        async with reader.connect() as conn:
            cut = await conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
            )
            assert cut.all()
        await wait_for(lambda: not b.wakeups.connected.is_set(), timeout=10)  # type: ignore[union-attr]
        await wait_for(b.wakeups.connected.is_set, timeout=10)
        await intake.store.enqueue(new_message(str(ULID()), ("g@example.com",)))
        await wait_for(lambda: len(sink.copies) == 2, timeout=5)
        assert b.wakeups.notifications > before


# -- per_domain across the cluster


@pytest.mark.parametrize(("scope", "most"), [("cluster", 2), ("node", 6)])
async def test_per_domain_counts_every_nodes_transactions(tmp_path: Path, scope: str, most: int) -> None:
    """Three nodes, per_domain = 2, a slow sink that counts transactions open at once per
    domain: "cluster" never has more than 2 open to one domain; "node" lets each node have 2."""
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        zone = stack.enter_context(dns_server())
        sink = await CountingSink(data_delay=0.3).start("127.0.0.2")
        stack.push_async_callback(sink.close)
        for d in ("slow.test", "other.test"):
            zone.mx(d, (10, "mx.sink.test"))
        zone.a("mx.sink.test", "127.0.0.2")
        delivery = {"port": sink.port, "per_domain": 2, "per_domain_scope": scope, "concurrency": 10}
        configs = [_config(tmp_path, f"n{i}.test", url, zone, delivery=delivery) for i in range(3)]
        relays = await stack.enter_async_context(_relays(configs))
        stores = [r.store for r in relays if r.store is not None]
        assert len(stores) == 3
        # taken on every node in turn (each node's intake wakes it at once): single-recipient
        # messages, and one with three at slow.test (one transaction)
        for i in range(24):
            await stores[i % 3].enqueue(new_message(str(ULID()), (f"u{i}@slow.test",)))
        await stores[0].enqueue(new_message(str(ULID()), ("x@slow.test", "y@slow.test", "z@slow.test")))
        for i in range(6):
            await stores[i % 3].enqueue(new_message(str(ULID()), (f"v{i}@other.test",)))
        await wait_for(lambda: sum(len(c.rcpts) for c in sink.copies) == 33, timeout=40)
        print(f"\nper_domain_scope={scope}: at most {dict(sink.most_open)} transactions open at once")
        assert sink.most_open["slow.test"] <= 2 if scope == "cluster" else sink.most_open["slow.test"] > 2
        assert sink.most_open["slow.test"] <= most
        assert len({c.helo for c in sink.copies}) > 1  # the nodes shared the work
        assert sorted(len(c.rcpts) for c in sink.copies)[-1] == 3


# -- gauges, counters, the dashboard


async def test_gauges_are_the_stores_and_counters_carry_no_node_label(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        configs = [_config(tmp_path, f"n{i}.test", url) for i in range(2)]
        relays = await stack.enter_async_context(_relays(configs, deliver=False))
        assert relays[0].store is not None
        for i in range(3):
            await relays[0].store.enqueue(new_message(str(ULID()), (f"h{i}@example.com",)))
        texts = []
        for r in relays:
            assert r.http_address is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{r.http_address.port}") as http:
                texts.append((await http.get("/metrics")).text)
        for t in texts:
            assert metric(t, "relay_queue_recipients", state="queued") == 3.0
            assert metric(t, "relay_queue_oldest_age_seconds") > 0
            samples = [line for line in t.splitlines() if line and not line.startswith("#")]
            assert not [s for s in samples if any(k in s for k in ("node=", "owner=", "host=", "instance="))]


async def test_the_dashboard_shows_a_panel_per_node(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        cfg = _config(tmp_path, "n1.test", url, delivery={"port": 9})
        relay = await stack.enter_async_context(running_relay(cfg, deliver=True))
        assert relay.store is not None
        assert relay.delivery is not None
        assert relay.http_address is not None
        await relay.store.node_register(_node("gone:9:dead", time.time() - 60))
        client = await stack.enter_async_context(console_client(relay.store, relay.http_address.port))
        page = (await client.get("/ui/dashboard")).text
        assert "<h2>Nodes</h2>" in page
        assert page.count('class="figure node node-') == 2
        assert relay.delivery.owner in page
        assert 'node-alive"' in page
        assert 'node-dead"' in page
        assert "gone:9:dead" in page
        assert "elsewhere" in page
        assert "last heartbeat" in page


async def test_the_heartbeat_outlives_a_store_that_goes_away(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The database refuses every connection for longer than 3 heartbeats: the heartbeat and
    the listener log it and keep trying (a crashed background task would stop the process);
    once it is back the node beats again, alive, and listens again."""
    caplog.set_level(logging.INFO, logger="relay")
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        database = url.rsplit("/", 1)[1]
        cfg = _config(tmp_path, "n1.test", url, cluster={"heartbeat": "300ms"}, delivery={"port": 9})
        relay = await stack.enter_async_context(running_relay(cfg, deliver=True))
        assert relay.store is not None
        assert relay.wakeups is not None
        assert relay.heartbeat is not None
        await wait_for(relay.wakeups.connected.is_set, timeout=10)
        admin = await stack.enter_async_context(store_reader(url.rsplit("/", 1)[0] + "/postgres"))

        async def admin_sql(sql: str) -> None:
            async with admin.connect() as conn:
                await conn.execute(text(sql))
                await conn.commit()

        await admin_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        looks = relay.heartbeat.looks
        await asyncio.sleep(1.5)  # 5 heartbeats without the store
        assert relay.heartbeat.looks == looks
        assert not relay.failed.is_set()
        assert not relay.wakeups.connected.is_set()
        await admin_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await wait_for(lambda: relay.heartbeat.looks > looks + 1, timeout=15)  # type: ignore[union-attr]
        await wait_for(relay.wakeups.connected.is_set, timeout=15)
        (me,) = await relay.store.nodes()
        assert me.alive(time.time())
        assert not relay.failed.is_set()
        assert any("heartbeat failed" in r.getMessage() for r in caplog.records)
        assert any("heartbeat written again" in r.getMessage() for r in caplog.records)


async def test_a_dead_nodes_webhook_deliveries_are_freed_too(url: str) -> None:
    """The webhook dispatcher leases under its node's name: a dead node's deliveries are due again
    with its recipients, in the same transaction; a live node's are left alone."""
    from helpers import raw_sql
    from sqlalchemy.engine import Connection

    from relay.store.schema import webhook_deliveries

    s = await LogStore.open(url)
    try:
        await s.upgrade()
        t0 = time.time()
        await s.node_register(_node("dead:1:w", t0))
        await s.node_register(_node("live:2:w", t0 + 9.5))
        row = {"webhook_id": "msg_x", "url": "http://hooks.test/", "type": "message.delivered", "event_at": t0,
               "body": b"{}", "status": "pending", "attempts": 1, "next_attempt_at": t0 + 600, "created_at": t0,
               "updated_at": t0}  # fmt: skip

        def plant(conn: Connection) -> None:
            conn.execute(webhook_deliveries.insert(), [{**row, "lease_owner": "dead:1:w"},
                                                       {**row, "lease_owner": "live:2:w"}])  # fmt: skip

        await raw_sql(url, plant, write=True)
        watch = await s.node_watch(None, "me:3:w", now=t0 + 10)
        assert [(f.name, f.recipients, f.webhook_deliveries) for f in watch.freed] == [("dead:1:w", 0, 1)]

        def leases(conn: Connection) -> list[tuple[str | None, float]]:
            stmt = webhook_deliveries.select().order_by(webhook_deliveries.c.id)
            return [(r.lease_owner, r.next_attempt_at) for r in conn.execute(stmt)]

        assert await raw_sql(url, leases) == [(None, t0 + 10), ("live:2:w", t0 + 600)]
        assert watch.next_death == t0 + 9.5 + 3  # the live node's deadline: the next look
    finally:
        await s.close()


@pytest.mark.parametrize(("alone", "per_domain", "gets_e"), [(False, 3, True), (True, 3, False), (False, 2, False)])
async def test_the_claim_counts_every_nodes_transactions(
    store: LogStore, alone: bool, per_domain: int, gets_e: bool
) -> None:
    """Node X has two transactions in flight to d.test (a message with two recipients there,
    one transaction; and one more); node Y's claim counts them: with per_domain 3 it may start
    one more, with 2 none; with VERP (``alone``: a transaction per recipient) X has three."""
    from relay.delivery import Planner

    t0 = time.time()
    m1, m2, m3, m4 = (str(ULID()) for _ in range(4))
    await store.enqueue(new_message(m1, ("a@d.test", "b@d.test"), at=t0 - 4))
    await store.enqueue(new_message(m2, ("c@d.test",), at=t0 - 3))
    await store.enqueue(new_message(m3, ("e@d.test",), at=t0 - 2))
    await store.enqueue(new_message(m4, ("f@other.test",), at=t0 - 1))
    held = await store.claim_due("x:1:x", lease=60, pick=lambda cs: [c for c in cs if c.queue_id in (m1, m2)], now=t0)
    assert len(held) == 3
    planner = Planner(jobs=10, per_domain=per_domain, running={}, window=64, alone=alone)
    got = await store.claim_due(
        "y:2:y", lease=60, pick=planner, cluster=planner.cluster_running, alone=alone, now=t0 + 1
    )
    assert planner.running == {"d.test": 3 if alone else 2}
    assert {c.address for c in got} == ({"e@d.test", "f@other.test"} if gets_e else {"f@other.test"})
    # Leases that ran out are not in flight any more (the recipients are due again).
    later = Planner(jobs=10, per_domain=per_domain, running={}, window=64, alone=alone)
    await store.claim_due("z:3:z", lease=60, pick=lambda cs: [], cluster=later.cluster_running, now=t0 + 120)
    assert later.running == {}
