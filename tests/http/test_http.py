"""The HTTP side over real HTTP: metrics, health, tracking hits, and the JSON API."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_config, metric, running_relay, smtp_client, wait_for
from helpers.delivery import submit
from helpers.peers import Sink, Zone, sinks

from relay import tracking
from relay.http import schemas
from relay.service.lifecycle import Relay

TOKEN = "s3cret-api-token-0123456789"
BROWSER = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15"
)
HTML_MESSAGE = (
    b"From: App <app@example.com>\r\nSubject: Welcome\r\nX-Relay-Tag: welcome\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello, see https://example.org/plain\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><p>Hi <a href="https://example.org/start?a=1&amp;b=2">start</a>'
    b' <a href="mailto:help@example.com">mail</a> <a data-relay-notrack href="https://example.org/raw">raw</a>'
    b"</p></body></html>\r\n--b1--\r\n"
)


@pytest.fixture
async def stack(tmp_path: Path, zone: Zone) -> AsyncIterator[tuple[Relay, Sink, httpx.AsyncClient]]:
    async with sinks("127.0.0.2") as (sink,):
        zone.a("example.net", "127.0.0.2")
        zone.mx("dead.example", (10, "mx.dead.example"))
        zone.a("mx.dead.example", "127.0.0.9")
        config = make_config(
            tmp_path,
            http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN]},
            tracking={"base_url": "http://track.example.test"},
            delivery={"port": sink.port, "retry_schedule": ["1h"], "connect_timeout": "2s"},
            dns={"nameservers": [f"127.0.0.1:{zone.port}"], "timeout": "1s"},  # type: ignore[attr-defined]
        )
        async with running_relay(config, deliver=True) as relay:
            assert relay.http_address is not None
            base = f"http://127.0.0.1:{relay.http_address.port}"
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                yield relay, sink, client


async def scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


async def settled(relay: Relay, qid: str, states: tuple[str, ...] = ("delivered", "bounced", "deferred")) -> Any:
    assert relay.store is not None
    store = relay.store

    async def done() -> Any:
        (m,) = await store.lookup(qid)
        return m if all(r.status in states for r in m.recipients) else None

    return await wait_for(done)


async def test_health(stack: tuple[Relay, Sink, httpx.AsyncClient]) -> None:
    relay, _, client = stack
    assert (await client.get("/healthz")).json() == {"status": "alive"}
    assert (await client.get("/readyz")).status_code == 200
    assert relay.delivery_task is not None
    relay.delivery_task.cancel()
    await asyncio.sleep(0.05)
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert "delivery stopped" in r.json()["problems"]


async def test_metrics_follow_the_mail(stack: tuple[Relay, Sink, httpx.AsyncClient]) -> None:
    relay, _, client = stack
    before = await scrape(client)
    for name in ("relay_smtp_sessions_active", "relay_queue_oldest_age_seconds"):
        assert f"\n{name} " in "\n" + before
    qid = await submit(relay, ["a@example.net"], b"Subject: plain\r\n\r\nhi\r\n")
    await settled(relay, qid)
    after = await scrape(client)
    assert (
        metric(after, "relay_smtp_messages_received_total") == metric(before, "relay_smtp_messages_received_total") + 1
    )
    for name, labels in (
        ("relay_delivery_attempts_total", {"result": "delivered"}),
        ("relay_recipients_final_total", {"status": "delivered"}),
        ("relay_delivery_attempt_duration_seconds_count", {}),
        ("relay_accept_to_delivery_seconds_count", {}),
    ):
        assert metric(after, name, **labels) == metric(before, name, **labels) + 1, name
    assert metric(after, "relay_queue_recipients", state="queued") == 0

    qid = await submit(relay, ["b@dead.example"], b"Subject: stuck\r\n\r\nhi\r\n")
    await settled(relay, qid, ("deferred",))
    now = await scrape(client)
    assert metric(now, "relay_queue_recipients", state="deferred") == 1  # right after the change
    assert (
        metric(now, "relay_delivery_attempts_total", result="deferred")
        == metric(after, "relay_delivery_attempts_total", result="deferred") + 1
    )
    assert metric(now, "relay_queue_oldest_age_seconds") >= 0

    async with smtp_client(relay) as c:
        await c.execute_command(b"RCPT", b"TO:<x@example.net>")  # out of order
    rejected = await scrape(client)
    assert (
        metric(rejected, "relay_smtp_rejections_total", reason="bad_sequence")
        == metric(now, "relay_smtp_rejections_total", reason="bad_sequence") + 1
    )


def _tokens(raw: bytes) -> tuple[str, list[str]]:
    text = raw.decode()
    opens = re.findall(r"http://track\.example\.test/t/o/([A-Za-z0-9_-]+)", text)
    clicks = re.findall(r"http://track\.example\.test/t/c/([A-Za-z0-9_-]+)", text)
    assert len(opens) == 1, text
    return opens[0], clicks


async def test_opens_and_clicks_are_logged(
    stack: tuple[Relay, Sink, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    relay, sink, client = stack
    assert relay.store is not None
    monkeypatch.setattr(tracking, "MACHINE_WINDOW", 0.0)  # hits in a test come faster than any person
    qid = await submit(relay, ["jane@example.net", "joe@example.net"], HTML_MESSAGE)
    await settled(relay, qid, ("delivered",))
    assert len(sink.messages) == 2  # one transaction per recipient: each gets its own tokens
    by_rcpt = {m.rcpts[0]: m.data for m in sink.messages}
    open_token, clicks = _tokens(by_rcpt["jane@example.net"])
    assert len(clicks) == 1  # mailto and data-relay-notrack are left alone
    assert _tokens(by_rcpt["joe@example.net"])[0] != open_token
    parsed = email.message_from_bytes(by_rcpt["jane@example.net"], policy=email.policy.default)
    plain = next(p for p in parsed.walk() if p.get_content_type() == "text/plain")
    assert plain.get_content() == "Hello, see https://example.org/plain\r\n" or "plain" in plain.get_content()
    assert b'href="https://example.org/raw"' in by_rcpt["jane@example.net"]

    pixel = await client.get(f"/t/o/{open_token}", headers={"User-Agent": BROWSER})
    assert pixel.status_code == 200
    assert pixel.headers["content-type"] == "image/gif"
    assert "no-store" in pixel.headers["cache-control"]
    await client.get(f"/t/o/{open_token}", headers={"User-Agent": BROWSER})
    await client.get(
        f"/t/o/{open_token}",
        headers={
            "User-Agent": "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
        },
    )
    await client.head(f"/t/o/{open_token}", headers={"User-Agent": BROWSER})
    go = await client.get(f"/t/c/{clicks[0]}", headers={"User-Agent": BROWSER})
    assert go.status_code == 302
    assert go.headers["location"] == "https://example.org/start?a=1&b=2"

    (m,) = await relay.store.lookup(qid)
    hits = [
        (e.type, e.recipient, e.details["first"], e.details["machine"])
        for e in m.events
        if e.type in ("opened", "clicked")
    ]
    assert hits == [
        ("opened", "jane@example.net", True, False),
        # the repeat and the HEAD (same IP and User-Agent, within 10 s) are coalesced into the first
        ("opened", "jane@example.net", False, True),  # Google's image proxy
        ("clicked", "jane@example.net", True, False),
    ]
    clicked = next(e for e in m.events if e.type == "clicked")
    assert clicked.details["url"] == "https://example.org/start?a=1&b=2"
    assert clicked.details["user_agent"] == BROWSER
    assert clicked.details["ip"] == "127.0.0.1"
    text = await scrape(client)
    assert metric(text, "relay_tracking_events_total", type="open", machine="false") >= 1
    assert metric(text, "relay_tracking_hits_coalesced_total") >= 2
    assert metric(text, "relay_tracking_events_total", type="click", machine="false") >= 1


async def test_machine_window_after_delivery(stack: tuple[Relay, Sink, httpx.AsyncClient]) -> None:
    relay, sink, client = stack
    qid = await submit(relay, ["jane@example.net"], HTML_MESSAGE)
    await settled(relay, qid, ("delivered",))
    open_token, _ = _tokens(sink.messages[0].data)
    await client.get(f"/t/o/{open_token}", headers={"User-Agent": BROWSER})
    (m,) = await relay.store.lookup(qid)  # type: ignore[union-attr]
    (hit,) = [e for e in m.events if e.type == "opened"]
    assert hit.details["machine"] is True  # within seconds of delivery: a scanner, not a person


@pytest.mark.parametrize("mangle", ["tamper", "truncate", "garbage", "unknown", "open-as-click"])
async def test_bad_tokens_get_404_and_log_nothing(stack: tuple[Relay, Sink, httpx.AsyncClient], mangle: str) -> None:
    relay, sink, client = stack
    assert relay.store is not None
    qid = await submit(relay, ["jane@example.net"], HTML_MESSAGE)
    await settled(relay, qid, ("delivered",))
    open_token, clicks = _tokens(sink.messages[0].data)
    signer = tracking.TokenSigner(b"x")  # wrong key
    path = {
        "tamper": f"/t/c/{clicks[0][:-2]}{'A' if clicks[0][-2] != 'A' else 'B'}{clicks[0][-1]}",
        "truncate": f"/t/o/{open_token[:-3]}",
        "garbage": "/t/o/..%2F..%2Fetc%2Fpasswd",
        "unknown": f"/t/o/{signer.open_token(1)}",
        "open-as-click": f"/t/c/{open_token}",
    }[mangle]
    before = len((await relay.store.lookup(qid))[0].events)
    r = await client.get(path, headers={"User-Agent": BROWSER})
    assert r.status_code == 404
    assert "location" not in r.headers
    assert len((await relay.store.lookup(qid))[0].events) == before


async def test_x_relay_track_none_turns_tracking_off(stack: tuple[Relay, Sink, httpx.AsyncClient]) -> None:
    relay, sink, _ = stack
    qid = await submit(relay, ["jane@example.net"], b"X-Relay-Track: none\r\n" + HTML_MESSAGE)
    await settled(relay, qid, ("delivered",))
    data = sink.messages[0].data
    assert b"/t/o/" not in data
    assert b"/t/c/" not in data
    assert b"x-relay-track" not in data.lower()


async def test_api_requires_a_token(stack: tuple[Relay, Sink, httpx.AsyncClient]) -> None:
    _, _, client = stack
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
        r = await client.get("/api/v1/messages", headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/api/openapi.json")).status_code == 200


async def test_api_queries_retry_and_stats(
    stack: tuple[Relay, Sink, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    relay, sink, client = stack
    monkeypatch.setattr(tracking, "MACHINE_WINDOW", 0.0)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    welcome = await submit(relay, ["jane@example.net"], HTML_MESSAGE)
    stuck = await submit(
        relay,
        ["bob@dead.example"],
        b"Message-ID: <stuck.1@app.example>\r\nX-Relay-Tag: reset\r\nSubject: reset\r\n\r\nhi\r\n",
    )
    await settled(relay, welcome, ("delivered",))
    await settled(relay, stuck, ("deferred",))
    open_token, clicks = _tokens(sink.messages[0].data)
    await client.get(f"/t/o/{open_token}", headers={"User-Agent": BROWSER})
    await client.get(f"/t/c/{clicks[0]}", headers={"User-Agent": BROWSER})

    async def ids(**params: Any) -> list[str]:
        r = await client.get("/api/v1/messages", params=params, headers=auth)
        assert r.status_code == 200, r.text
        return [m["id"] for m in r.json()["messages"]]

    assert await ids() == [stuck, welcome]
    assert await ids(recipient="JANE@example.net") == [welcome]
    assert await ids(message_id="<stuck.1@app.example>") == [stuck]
    assert await ids(id=stuck) == [stuck]
    assert await ids(tag="welcome") == [welcome]
    assert await ids(status="deferred") == [stuck]
    assert await ids(status="bounced") == []
    assert await ids(since="2000-01-01T00:00:00Z", until="2000-01-02T00:00:00Z") == []
    page1 = (await client.get("/api/v1/messages", params={"limit": 1}, headers=auth)).json()
    assert [m["id"] for m in page1["messages"]] == [stuck]
    page2 = (
        await client.get("/api/v1/messages", params={"limit": 1, "cursor": page1["next_cursor"]}, headers=auth)
    ).json()
    assert [m["id"] for m in page2["messages"]] == [welcome]
    assert page2["next_cursor"] is None

    one = (await client.get(f"/api/v1/messages/{welcome}", headers=auth)).json()
    assert relay.store is not None
    (view,) = await relay.store.lookup(welcome)
    assert one == schemas.messages_json([view])["messages"][0]  # what `relay log --json` prints
    assert (await client.get("/api/v1/messages/01ZZZZZZZZZZZZZZZZZZZZZZZZ", headers=auth)).status_code == 404

    r = await client.post(f"/api/v1/messages/{stuck}/retry", json={"reason": "MX fixed"}, headers=auth)
    assert r.json() == {"id": stuck, "retried": 1}
    (view,) = await relay.store.lookup(stuck)
    retried = next(e for e in view.events if e.type == "retried")
    assert retried.details["reason"] == "MX fixed"
    assert retried.details["by"].startswith("api:")
    assert (
        await client.post("/api/v1/messages/01ZZZZZZZZZZZZZZZZZZZZZZZZ/retry", json={}, headers=auth)
    ).status_code == 404

    stats = (await client.get("/api/v1/stats", params={"group_by": "tag"}, headers=auth)).json()
    groups = {g["group"]: g for g in stats["groups"]}
    assert groups["welcome"]["received"] == 1
    assert groups["welcome"]["delivered"] == 1
    assert groups["welcome"]["unique_opens"] == {"human": 1, "machine": 0}
    assert groups["welcome"]["unique_clicks"] == {"human": 1, "machine": 0}
    assert groups["welcome"]["delivery_latency_seconds"]["p50"] is not None
    assert groups["reset"]["deferred"] == 1  # recipients: the retry's attempt adds a deferral, not a recipient
    assert groups["reset"]["deferrals"] >= 1
    for group_by in ("domain", "user"):
        assert (await client.get("/api/v1/stats", params={"group_by": group_by}, headers=auth)).status_code == 200


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/api/v1/messages", {"limit": "0"}, "limit"),
        ("/api/v1/messages", {"limit": "101"}, "limit"),
        ("/api/v1/messages", {"limit": "many"}, "limit"),
        ("/api/v1/messages", {"status": "lost"}, "status"),
        ("/api/v1/messages", {"since": "yesterday"}, "since"),
        ("/api/v1/messages", {"cursor": "not-a-cursor!"}, "cursor"),
        ("/api/v1/messages", {"id": "x' OR 1=1 --"}, "id"),
        ("/api/v1/stats", {"group_by": "country"}, "group_by"),
        ("/api/v1/stats", {"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}, "since"),
    ],
)
async def test_bad_parameters_are_422_with_the_field_named(
    stack: tuple[Relay, Sink, httpx.AsyncClient], path: str, params: dict[str, str], field: str
) -> None:
    _, _, client = stack
    r = await client.get(path, params=params, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422, r.text
    assert any(d["loc"][-1] == field for d in r.json()["detail"]), r.text
