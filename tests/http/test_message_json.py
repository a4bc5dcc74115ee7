"""The JSON shape of a message is written once (relay.http.schemas): for a message with every
kind of event, `relay log --json` (a real CLI process) prints the object the API returns, and
the API's own OpenAPI document validates it."""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from helpers import make_config, raw_sql, relay_cli, running_relay, store_url, write_config
from sqlalchemy import text

from relay import tracking
from relay.model import EVENT_TYPES, EventView, Imported, NewMessage

TOKEN = "message-json-token-0123456789"
SECRET = "a-tracking-secret-for-the-tests-0123456789"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
QID = "01JEVERYKIND00000000000000"
JANE, JOE = "jane@example.net", "joe@example.org"


def _attempt(n: int, code: int, enhanced: str | None, reply: str, **more: Any) -> dict[str, Any]:
    """Details as delivery writes them for an attempt."""
    return {
        "attempt": n, "mx_host": "mx1.example.net", "ip": "192.0.2.10", "port": 25, "tls": "TLSv1.3",
        "code": code, "enhanced_code": enhanced, "reply": reply, "duration_ms": 182, **more,
    }  # fmt: skip


def _planted(now: float) -> Imported:
    """The events nothing here produces for real (delivery, bounces, suppression, complaints),
    with the details their writers give them; the message's recipients are left deferred, so
    that the test can retry, cancel and track them for real."""
    t = now - 7200
    events = (
        EventView(t, "received", None, {
            "client_ip": "192.0.2.1", "helo": "app.example", "protocol": "ESMTPSA", "tls": "TLSv1.3",
            "user": "app", "size": 4321,
        }),
        EventView(t + 1, "deferred", JANE, _attempt(
            1, 451, "4.7.1", "greylisted, try again later",
            tried=["mx0.example.net [192.0.2.9]:25: connection refused"], next_attempt_at="2026-01-01T00:05:00.000Z",
        )),
        EventView(t + 2, "delivered", JANE, _attempt(2, 250, "2.0.0", "OK queued as 4Xq1")),
        EventView(t + 3, "bounced", JOE, _attempt(1, 550, "5.1.1", "no such user: «jöe»", tls="none")),
        EventView(t + 4, "expired", JOE, _attempt(9, 421, None, "too many connections")),
        EventView(t + 5, "suppressed", JOE, {"reason": "hard bounce", "since": "2026-01-01T00:00:00.000Z"}),
        EventView(t + 6, "complained", JANE, {
            "feedback_type": "abuse", "source": "arf", "nested": {"a": [1, 2.5, None, True]},
        }),
        EventView(t + 7, "noted", JANE, {"async": True, "report": "auto_reply", "reason": "vacation", "report_id": 1}),
        EventView(t, "held", JANE, {"by": "hold"}),  # hold mode at intake (tests/actions holds for real)
        EventView(t + 0.5, "released", JANE, {"by": "sam", "case_id": 3}),
        EventView(t + 8, "body_purged", None, {"kept": "7d", "bytes": 71}),  # retention (tests/retention purges)
    )  # fmt: skip
    message = NewMessage(
        queue_id=QID,
        message_id="every.kind@app.example",
        mail_from="app@example.com",
        recipients=(JANE, JOE),
        subject="Grüße, and every kind of event ✓",
        tags=("welcome", "eu"),
        user="app",
        client_ip="192.0.2.1",
        received_at=t,
        raw=b"Subject: hi\r\n\r\n<a href='https://example.org/start?a=1&b=2'>start</a>\r\n",
        track="opens,clicks",
        links=("https://example.org/start?a=1&b=2",),
    )
    return Imported(message, "deferred", 3, now + 3600, "451 4.7.1 greylisted, try again later", events)


def _validate(openapi: dict[str, Any], name: str, instance: Any) -> None:
    """``instance`` against ``components/schemas/<name>`` of the API's OpenAPI document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": openapi["components"]}
    jsonschema_rs.Draft202012Validator(schema).validate(instance)  # raises, naming the path, when invalid


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_relay_log_json_prints_what_the_api_returns(tmp_path: Path, backend: str) -> None:
    async with AsyncExitStack() as stack:
        url = await store_url(backend, tmp_path / "data" / "relay.db", stack)
        config = make_config(
            tmp_path,
            store={"url": url},
            http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN]},
            tracking={"base_url": "http://track.example.test", "secret": SECRET},
        )
        cli_config = write_config(
            tmp_path / "relay.toml", f'[server]\nhostname = "relay.test"\n[store]\nurl = "{url}"\n'
        )
        relay = await stack.enter_async_context(running_relay(config))  # intake only: nothing delivers
        assert relay.store is not None
        assert relay.http_address is not None
        await relay.store.bulk_import([_planted(time.time())])
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}", timeout=10)
        )
        auth = {"Authorization": f"Bearer {TOKEN}"}

        # opened and clicked for real, through the tracking endpoints
        def recipient_ids(conn: Any) -> list[int]:
            query = text("SELECT id FROM recipients WHERE queue_id = :q ORDER BY address")
            return [row[0] for row in conn.execute(query, {"q": QID})]

        jane_id, _ = await raw_sql(url, recipient_ids)
        signer = tracking.TokenSigner(SECRET.encode())
        assert (
            await client.get(f"/t/o/{signer.open_token(jane_id)}", headers={"User-Agent": BROWSER})
        ).status_code == 200
        go = await client.get(f"/t/c/{signer.click_token(jane_id, 0)}", headers={"User-Agent": BROWSER})
        assert go.status_code == 302
        # retried through the API, cancelled by the CLI
        r = await client.post(f"/api/v1/messages/{QID}/retry", json={"reason": "MX fixed, «ça marche»"}, headers=auth)
        assert r.json() == {"id": QID, "retried": 2}
        # support's actions, through the API
        r = await client.post(f"/api/v1/messages/{QID}/notes", json={"text": "Jane called, «merci»"}, headers=auth)
        assert r.status_code == 201, r.text
        r = await client.post(
            f"/api/v1/messages/{QID}/resend", json={"address": JOE, "new_address": "joe@example.com"}, headers=auth
        )
        assert r.status_code == 201, r.text
        assert (await client.post("/api/v1/suppressions", json={"address": JANE}, headers=auth)).status_code == 201
        r = await client.post(
            f"/api/v1/messages/{QID}/unsuppress", json={"address": JANE, "reason": "asked again"}, headers=auth
        )
        assert r.status_code == 200, r.text
        code, out, err = await relay_cli("queue", "delete", QID, "--config", str(cli_config))
        assert code == 0, err

        code, out, err = await relay_cli("log", QID, "--json", "--config", str(cli_config))
        assert code == 0, err
        printed = json.loads(out)
        assert list(printed) == ["messages"]
        (cli,) = printed["messages"]
        assert {e["type"] for e in cli["events"]} == set(EVENT_TYPES)  # every kind of event

        one = await client.get(f"/api/v1/messages/{QID}", headers=auth)
        assert one.status_code == 200
        assert one.json() == cli
        page = (await client.get("/api/v1/messages", params={"id": QID}, headers=auth)).json()
        assert page == {"messages": [cli], "next_cursor": None, "total": None, "total_capped": False}

        openapi = (await client.get("/api/openapi.json")).json()
        _validate(openapi, "Message", cli)
        _validate(openapi, "MessagePage", page)

    # the field names users see, as before the shape moved to relay.http.schemas
    assert list(cli) == [
        "id", "message_id", "mail_from", "subject", "size", "tags", "user", "client_ip", "received_at",
        "recipients", "events",
    ]  # fmt: skip
    assert cli["id"] == QID
    assert cli["message_id"] == "every.kind@app.example"
    assert cli["subject"] == "Grüße, and every kind of event ✓"
    assert cli["received_at"].endswith("Z")
    assert len(cli["received_at"]) == len("2026-01-01T00:00:00.000Z")
    assert [r["status"] for r in cli["recipients"]] == ["cancelled", "cancelled"]
    assert set(cli["recipients"][0]) == {"address", "status", "attempts", "next_attempt_at", "last_response"}
    by_type = {e["type"]: e for e in cli["events"]}
    assert by_type["bounced"] == {
        "at": by_type["bounced"]["at"], "type": "bounced", "recipient": JOE,
        **_attempt(1, 550, "5.1.1", "no such user: «jöe»", tls="none"),
    }  # fmt: skip
    assert by_type["received"]["recipient"] is None
    assert by_type["complained"]["nested"] == {"a": [1, 2.5, None, True]}
    assert by_type["clicked"]["url"] == "https://example.org/start?a=1&b=2"
    assert by_type["retried"]["reason"] == "MX fixed, «ça marche»"
    assert by_type["cancelled"]["by"] == "cli"
