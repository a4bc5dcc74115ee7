"""Webhooks end to end: Relay receives a message over SMTP, delivers it to a sink through the
test DNS server, and a receiver on loopback gets message.received and message.delivered,
verified with the `standardwebhooks` library; the deliveries API; a `relay serve` killed with
SIGKILL while webhooks are pending loses none of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServeProcess, metric, send_to, serve_config, store_url, wait_for
from helpers.delivery import delivery_config, final, status, submit
from helpers.peers import Sink, Zone, sinks
from webhook_receiver import Receiver, Reply, Request, new_secret, receiver

from relay import metrics
from relay.logstore import LogStore
from relay.service.lifecycle import Relay

TOKEN = "webhook-test-token-0123456789"


@pytest.fixture
async def sink(zone: Zone) -> AsyncIterator[Sink]:
    zone.mx("example.com", (10, "mx.example.com"))
    zone.a("mx.example.com", "127.0.0.2")
    async with sinks("127.0.0.2") as (s,):
        yield s


@pytest.fixture(params=["sqlite", "postgres"])
async def relay_and_receiver(
    request: pytest.FixtureRequest, tmp_path: Path, zone: Zone, sink: Sink
) -> AsyncIterator[tuple[Relay, Receiver, httpx.AsyncClient]]:
    secret = new_secret()
    async with AsyncExitStack() as stack:
        url = await store_url(request.param, tmp_path / "data" / "relay.db", stack)
        r = await stack.enter_async_context(receiver([secret]))
        hooks: list[dict[str, Any]] = [{"url": r.url(), "secret": secret}]
        config = delivery_config(tmp_path, zone, sink.port, store={"url": url}, webhooks=hooks,
                                 http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN]})  # fmt: skip
        relay = Relay(config)
        await relay.startup(deliver=True)
        stack.push_async_callback(relay.shutdown)
        assert relay.http_address is not None
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{relay.http_address.port}",
                timeout=10,
                headers={"authorization": f"Bearer {TOKEN}"},
            )
        )
        yield relay, r, client


def of(r: Receiver, qid: str) -> list[Request]:
    return [q for q in r.ok() if q.payload["data"].get("queue_id") == qid]


async def test_a_delivered_message_sends_received_and_delivered(
    relay_and_receiver: tuple[Relay, Receiver, httpx.AsyncClient],
) -> None:
    relay, r, client = relay_and_receiver
    qid = await submit(relay, ["jane@example.com"])
    msg = await final(relay, qid)
    assert status(msg) == {"jane@example.com": "delivered"}
    await wait_for(lambda: len(of(r, qid)) == 2, timeout=15)
    received, delivered = sorted(of(r, qid), key=lambda q: q.payload["type"] != "message.received")
    assert all(q.verified == [True] for q in r.requests)
    assert received.payload["type"] == "message.received"
    assert delivered.payload["type"] == "message.delivered"
    for q in (received, delivered):
        data = q.payload["data"]
        assert (data["queue_id"], data["mail_from"], data["subject"]) == (qid, "app@example.com", "Hi")
        assert data["message_id"] == msg.message_id
        assert data["tags"] == []
        assert data["user"] is None
    assert delivered.payload["data"]["recipient"] == "jane@example.com"
    assert delivered.payload["data"]["code"] == 250
    assert delivered.payload["data"]["attempt"] == 1
    assert received.payload["data"]["protocol"] in ("SMTP", "ESMTP")

    # The deliveries API: pages, filters, a retry sends the same id again.
    await wait_for(lambda: _count(client, "delivered", 2), timeout=10)
    first = (await client.get("/api/v1/webhooks/deliveries", params={"status": "delivered", "limit": 1})).json()
    assert len(first["deliveries"]) == 1
    assert first["next_cursor"]
    page = {"status": "delivered", "limit": 1, "cursor": first["next_cursor"]}
    second = (await client.get("/api/v1/webhooks/deliveries", params=page)).json()
    assert second["next_cursor"] is None
    newest, oldest = first["deliveries"][0], second["deliveries"][0]
    assert newest["id"] > oldest["id"]
    assert {newest["webhook_id"], oldest["webhook_id"]} == {received.id, delivered.id}
    assert newest["url"] == r.url()
    assert newest["status"] == "delivered"
    assert newest["last_status"] == 200
    other = await client.get("/api/v1/webhooks/deliveries", params={"url": "http://elsewhere.test/"})
    assert other.json() == {"deliveries": [], "next_cursor": None}
    retried = await client.post(f"/api/v1/webhooks/deliveries/{oldest['id']}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"id": oldest["id"], "status": "pending"}
    await wait_for(lambda: sum(q.id == oldest["webhook_id"] for q in r.ok()) == 2, timeout=10)
    assert (await client.post("/api/v1/webhooks/deliveries/999999999/retry")).status_code == 404
    assert (await client.get("/api/v1/webhooks/deliveries", params={"status": "lost"})).status_code == 422
    assert (await client.get("/api/v1/webhooks/deliveries", params={"cursor": "garbage!"})).status_code == 422
    anonymous = await client.get("/api/v1/webhooks/deliveries", headers={"authorization": ""})
    assert anonymous.status_code == 401

    # The counter on /metrics; the gauges as read from the store.
    text = (await client.get("/metrics")).text
    assert metric(text, "relay_webhook_deliveries_total", result="delivered") >= 3
    assert relay.store is not None
    summary = await relay.store.webhook_summary()
    gauges = metrics.render(metrics.QueueSummary({}, None), 0, metrics.WebhookGauges(summary.pending)).decode()
    assert metric(gauges, "relay_webhook_pending") == summary.pending


async def _count(client: httpx.AsyncClient, status: str, n: int) -> bool:
    r = await client.get("/api/v1/webhooks/deliveries", params={"status": status})
    return len(r.json()["deliveries"]) == n


async def test_kill_9_with_pending_webhooks_loses_none(tmp_path: Path) -> None:
    secret = new_secret()
    failing = True
    db = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}"

    def answer(_req: Request) -> Reply:
        return Reply(500) if failing else Reply(200)

    async with receiver([secret], answer) as r:
        config = serve_config(tmp_path, f"""
[delivery]
retry_schedule = ["1h"]
[[routes]]
domains = ["*"]
host = "127.0.0.1"
port = 9
[[webhooks]]
url = "{r.url()}"
secret = "{secret}"
events = ["message.received"]
""")  # fmt: skip
        proc = await ServeProcess(config).start()
        try:
            qids = [await send_to(proc.smtp_port, f"user{i}@example.com") for i in range(3)]
            # every webhook tried once, refused, and that written down: pending, due again in about 5 s
            await wait_for(lambda: {q.payload["data"]["queue_id"] for q in r.requests} == set(qids), timeout=15)
            await wait_for(lambda: _attempted_once(db, 3), timeout=15)
        finally:
            proc.kill()
            await proc.wait()
        failing = False
        proc = await ServeProcess(config).start()
        try:
            await wait_for(lambda: {q.payload["data"]["queue_id"] for q in r.ok()} == set(qids), timeout=30)
        finally:
            proc.terminate()
            assert await proc.wait() == 0
    ids = {q.id for q in r.requests}
    assert len(ids) == 3  # one id per event, kept across the crash
    assert all(q.verified == [True] for q in r.requests)
    store = await LogStore.open(db)
    try:
        found, _ = await store.webhook_deliveries()
    finally:
        await store.close()
    assert sorted(d.status for d in found) == ["delivered"] * 3


async def _attempted_once(db: str, n: int) -> bool:
    store = await LogStore.open(db)
    try:
        found, _ = await store.webhook_deliveries()
    finally:
        await store.close()
    return len(found) == n and all(d.attempts == 1 and d.status == "pending" for d in found)
