"""Three `relay serve` nodes on one PostgreSQL database: 3,000 messages spread over them, one
node SIGKILLed mid-run. Every message is delivered; the only duplicates are messages the killed
node held leases for; the survivors free its leases within 3 heartbeat intervals of the kill
(the lease itself is 120 s: the takeover comes from the node registry, not lease expiry). Then
`relay nodes --json`: the killed node is dead, a node stopped with SIGTERM is stopped."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from pathlib import Path

from helpers import ServeProcess, relay_cli, store_url, wait_for
from helpers.cluster import CountingSink, leased_by, node_config, node_name, rows, send_many, store_reader, until_zero
from helpers.peers import dns_server

HEARTBEAT = 1.0  # seconds ([cluster] heartbeat)
# The dead check runs 0.05 s after the silent node's deadline (relay.service.heartbeat.SLACK),
# then one write transaction frees its leases; this test polls the store every 20 ms, on a
# machine of 2 cores that runs three nodes, the sink and 12 clients: 0.5 s covers all of it.
SLACK = 0.5
MESSAGES = 3000
CLIENTS_PER_NODE = 4
DOMAINS = ("d0.test", "d1.test", "d2.test")


async def test_three_nodes_one_killed_mid_run(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "unused.db", stack)
        zone = stack.enter_context(dns_server())
        sink = await CountingSink(data_delay=0.2).start("127.0.0.2")
        stack.push_async_callback(sink.close)
        for d in DOMAINS:
            zone.mx(d, (10, "mx.sink.test"))
        zone.a("mx.sink.test", "127.0.0.2")
        names = ("node0.test", "node1.test", "node2.test")
        configs = [
            node_config(tmp_path, n, url, dns_port=zone.port, sink_port=sink.port, extra='lease = "120s"')
            for n in names
        ]
        servers: list[ServeProcess] = []
        for cfg in configs:  # one at a time: the first creates the schema
            server = await ServeProcess(cfg).start()
            servers.append(server)
        stack.push_async_callback(_stop_all, servers)
        owners = [await node_name(s) for s in servers]
        reader = await stack.enter_async_context(store_reader(url))

        # 3,000 messages, a quarter of each node's clients sending a batch over one session.
        mids = [f"m{i}@cluster.test" for i in range(MESSAGES)]
        batches = [
            [(mids[i], f"u{i}@{DOMAINS[i % len(DOMAINS)]}") for i in range(c, MESSAGES, 3 * CLIENTS_PER_NODE)]
            for c in range(3 * CLIENTS_PER_NODE)
        ]
        started = time.monotonic()
        queued = await asyncio.gather(*(send_many(servers[c % 3].smtp_port, batch) for c, batch in enumerate(batches)))
        assert sum(map(len, queued)) == MESSAGES
        print(f"\n3 nodes took {MESSAGES} messages in {time.monotonic() - started:.1f}s; "
              f"{len(sink.copies)} delivered by then")  # fmt: skip

        # Kill node 1 while it holds several leases (it has about 10 of the 30 slots in flight).
        victim, survivors = servers[1], [servers[0], servers[2]]

        async def holding() -> bool:
            return await leased_by(reader, owners[1]) >= 5

        await wait_for(holding, timeout=20, interval=0.01)
        victim.kill()
        killed = time.monotonic()
        held = await rows(
            reader,
            "SELECT m.message_id FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
            "WHERE r.status = 'sending' AND r.lease_owner = :o",
            o=owners[1],
        )
        assert await victim.wait() != 0
        took = await until_zero(reader, owners[1], since=killed, timeout=3 * HEARTBEAT + 10)
        print(f"node1 killed holding {len(held)} leases; freed {took:.2f}s after the kill "
              f"(bound {3 * HEARTBEAT + SLACK:.2f}s)")  # fmt: skip
        assert held
        assert took <= 3 * HEARTBEAT + SLACK

        async def all_delivered() -> bool:
            left = await rows(reader, "SELECT status, count(*) FROM recipients GROUP BY status")
            return dict(left) == {"delivered": MESSAGES}

        await wait_for(all_delivered, timeout=90, interval=0.2)
        print(f"all {MESSAGES} delivered {time.monotonic() - started:.1f}s after the first was sent")

        copies = sink.by_message_id()
        assert set(copies) == set(mids)  # every message, at least once
        twice = {mid for mid, n in copies.items() if n > 1}
        assert twice <= {r.message_id for r in held}, "a duplicate that the killed node did not hold"
        for mid in twice:
            helos = [c.helo for c in sink.copies if c.message_id == mid]
            assert "node1.test" in helos, (mid, helos)
            assert set(helos) - {"node1.test"}, (mid, helos)
        print(f"{len(twice)} messages delivered twice, all of them leased by the killed node")
        # Every attempt's event names the node that made it (the killed one too, before it died).
        nodes_seen = await rows(reader, "SELECT DISTINCT details->>'node' FROM events WHERE type = 'delivered'")
        assert {n for (n,) in nodes_seen} == set(owners)
        assert max(sink.most_open.values()) <= 10  # [delivery] per_domain, across the cluster

        # `relay nodes --json`: the killed node is dead; one stopped cleanly is stopped.
        survivors[1].terminate()
        assert await survivors[1].wait() == 0
        code, out, err = await relay_cli("nodes", "--json", "--config", str(configs[0]))
        assert code == 0, err
        states = {n["name"]: n["state"] for n in json.loads(out)}
        assert states == {owners[0]: "alive", owners[1]: "dead", owners[2]: "stopped"}
        code, out, _ = await relay_cli("nodes", "--config", str(configs[0]))
        assert code == 0
        assert "LAST HEARTBEAT" in out
        assert "dead" in out
        print(out)


async def _stop_all(servers: list[ServeProcess]) -> None:
    for s in servers:
        if s.proc is not None and s.proc.returncode is None:
            s.terminate()
            await s.wait()
