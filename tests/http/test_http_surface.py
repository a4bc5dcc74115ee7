"""What each HTTP listener serves (public tracking vs. private metrics/health/API), the metrics
token, the offline API docs, and tracking floods coalesced in the store across processes."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from helpers import (
    ServeProcess,
    make_config,
    metric,
    running_relay,
    send,
    send_to,
    serve_config,
    smtp_client,
    store_url,
)
from helpers.peers import dns_server

from relay import tracking
from relay.logstore import LogStore
from relay.model import NewMessage

SECRET = "a-tracking-secret-for-the-tests-0123456789"
METRICS_TOKEN = "metrics-token-abc"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
PRIVATE_PATHS = ("/metrics", "/healthz", "/readyz", "/api/openapi.json", "/api/docs", "/docs", "/api/v1/messages")


def _recipient_ids(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM recipients ORDER BY id")]


def _opened_events(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT details FROM events WHERE type = 'opened' ORDER BY id")]


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_tracking_has_its_own_listener_and_the_private_side_stays_private(tmp_path: Path, processes: str) -> None:
    with dns_server() as zone:  # no records: delivery fails fast, the recipient stays known
        cfg = serve_config(
            tmp_path,
            f"""[http]
listen = "127.0.0.1:0"
metrics_token = "{METRICS_TOKEN}"
api_tokens = ["api-token-0123456789abcdef"]
[tracking]
base_url = "https://track.example.com"
listen = "127.0.0.1:0"
secret = "{SECRET}"
[dns]
nameservers = ["127.0.0.1:{zone.port}"]
timeout = "1s"
""",  # type: ignore[attr-defined]
        )
        server = await ServeProcess(cfg, "--processes", processes).start()
        try:
            assert {"smtp", "http", "tracking"} <= set(server.ports)
            await send_to(server.smtp_port, "jane@example.com", b"Subject: hi\r\n\r\nhi\r\n")
            (rid,) = _recipient_ids(tmp_path / "data" / "relay.db")
            token = tracking.TokenSigner(SECRET.encode()).open_token(rid)
            private = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports['http']}", timeout=10)
            public = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports['tracking']}", timeout=10)
            async with private, public:
                pixel = await public.get(f"/t/o/{token}", headers={"User-Agent": BROWSER})
                assert pixel.status_code == 200
                assert pixel.headers["content-type"] == "image/gif"
                # the same valid token is unknown on the private side
                assert (await private.get(f"/t/o/{token}", headers={"User-Agent": BROWSER})).status_code == 404
                assert (await private.get(f"/t/c/{token}")).status_code == 404
                for path in PRIVATE_PATHS:
                    assert (await public.get(path)).status_code == 404, path
                assert (await private.get("/healthz")).status_code == 200
                assert (await private.get("/readyz")).status_code == 200
                assert (await private.get("/api/openapi.json")).status_code == 200
                assert (await private.get("/api/docs")).status_code == 200

                assert (await private.get("/metrics")).status_code == 401
                wrong = await private.get("/metrics", headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
                basic = await private.get("/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"})
                assert basic.status_code == 401
                ok = await private.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
                assert ok.status_code == 200
                assert metric(ok.text, "relay_tracking_events_total", type="open", machine="false") == 1

                # a flood of the same hit: one event, the rest counted (whichever worker answered)
                for _ in range(5):
                    assert (await public.get(f"/t/o/{token}", headers={"User-Agent": BROWSER})).status_code == 200
                text = (await private.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})).text
                assert metric(text, "relay_tracking_hits_coalesced_total") == 5
                assert metric(text, "relay_tracking_events_total", type="open", machine="false") == 1
            assert len(_opened_events(tmp_path / "data" / "relay.db")) == 1
        finally:
            server.terminate()
            assert await server.wait() == 0


async def test_without_a_tracking_listener_everything_is_on_the_http_listener(tmp_path: Path) -> None:
    config = make_config(tmp_path, tracking={"base_url": "https://track.example.com", "secret": SECRET})
    async with running_relay(config) as relay:
        assert relay.http_address is not None
        assert relay.tracking_address is None
        async with smtp_client(relay) as c:
            code, _ = await send(c, "app@example.com", ["jane@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
        assert code == 250
        (rid,) = _recipient_ids(tmp_path / "data" / "relay.db")
        token = tracking.TokenSigner(SECRET.encode()).open_token(rid)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}") as client:
            assert (await client.get(f"/t/o/{token}", headers={"User-Agent": BROWSER})).status_code == 200
            assert (await client.get("/metrics")).status_code == 200  # no metrics_token: open
            assert (await client.get("/healthz")).status_code == 200


async def test_the_api_docs_load_everything_from_relay(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        assert relay.http_address is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}") as client:
            for page in ("/api/docs", "/docs"):
                r = await client.get(page)
                assert r.status_code == 200
                assert "swagger" in r.text.lower()
                refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", r.text)
                refs += re.findall(r"""url\s*:\s*['"]([^'"]+)['"]""", r.text)
                assert refs
                for ref in refs:
                    assert ref.startswith("/"), ref  # nothing from a CDN or any other host
                    assert (await client.get(ref)).status_code == 200, ref
                assert any(ref.endswith(".js") for ref in refs)
                assert any(ref.endswith(".css") for ref in refs)


# -- coalescing and `first`, in the store, with two stores (two processes or nodes) at once


@pytest.fixture(params=["sqlite", "postgres"])
async def two_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[LogStore, LogStore]]:
    async with AsyncExitStack() as stack:
        url = await store_url(request.param, tmp_path / "relay.db", stack)
        first = await LogStore.open(url)
        stack.push_async_callback(first.close)
        await first.upgrade()
        second = await LogStore.open(url)
        stack.push_async_callback(second.close)
        await first.enqueue(
            NewMessage(
                queue_id="01JTRACKTEST0000000000000A",
                message_id="t@app.example",
                mail_from="app@example.com",
                recipients=("jane@example.com",),
                subject="Hi",
                tags=(),
                user=None,
                client_ip="127.0.0.1",
                received_at=time.time(),
                raw=b"Subject: Hi\r\n\r\nhi\r\n",
                details={},
            )
        )
        yield first, second


def _details(ip: str, agent: str, machine: bool, url: str | None = None) -> dict[str, object]:
    details: dict[str, object] = {"ip": ip, "user_agent": agent, "machine": machine}
    if url is not None:
        details["url"] = url
    return details


async def _hits(store: LogStore, kind: str) -> list[dict[str, object]]:
    (m,) = await store.lookup("01JTRACKTEST0000000000000A")
    return [dict(e.details) for e in m.events if e.type == kind]


async def test_a_flood_from_two_nodes_writes_one_event(two_stores: tuple[LogStore, LogStore]) -> None:
    a, b = two_stores
    hit = _details("192.0.2.1", BROWSER, False)
    results = await asyncio.gather(
        *(
            store.record_engagement("01JTRACKTEST0000000000000A", "jane@example.com", "opened", dict(hit), window=10)
            for store in (a, b) * 10
        )
    )
    assert sorted(map(str, results)) == ["None"] * 19 + ["True"]  # one event, and it is the first
    (event,) = await _hits(a, "opened")
    assert event["first"] is True
    # another reader (another IP) is a new event, not a first one
    other = await b.record_engagement(
        "01JTRACKTEST0000000000000A", "jane@example.com", "opened", _details("192.0.2.2", BROWSER, False), window=10
    )
    assert other is False
    assert len(await _hits(a, "opened")) == 2


async def test_clicks_coalesce_per_url_and_machines_are_never_first(two_stores: tuple[LogStore, LogStore]) -> None:
    a, b = two_stores
    qid, rcpt = "01JTRACKTEST0000000000000A", "jane@example.com"
    scanner = _details("198.51.100.7", "Mozilla/5.0", True, "https://example.org/a")
    assert await a.record_engagement(qid, rcpt, "clicked", dict(scanner), window=10) is False
    assert await b.record_engagement(qid, rcpt, "clicked", dict(scanner), window=10) is None
    person = _details("192.0.2.1", BROWSER, False, "https://example.org/a")
    other_link = _details("192.0.2.1", BROWSER, False, "https://example.org/b")
    results = await asyncio.gather(
        b.record_engagement(qid, rcpt, "clicked", dict(person), window=10),
        a.record_engagement(qid, rcpt, "clicked", dict(other_link), window=10),
    )
    assert sorted(results) == [False, True]  # two links: two events, one of them first
    assert await a.record_engagement(qid, rcpt, "clicked", dict(person), window=10) is None
    assert await a.record_engagement(qid, rcpt, "clicked", dict(person), window=0) is False  # the window has passed
    events = await _hits(a, "clicked")
    assert [e["first"] for e in events].count(True) == 1
    assert all(e["first"] is False for e in events if e["machine"])
    # opens have their own first
    assert await a.record_engagement(qid, rcpt, "opened", _details("192.0.2.1", BROWSER, False), window=10) is True
