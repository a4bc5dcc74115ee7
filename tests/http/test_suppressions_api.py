"""The suppression list's API over real HTTP, against a running Relay on SQLite and PostgreSQL:
add (201, then 200), check, remove with its reason (404, 422), pages, the audit trail, and bad
input that leaves the store untouched."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_config, running_relay, store_url
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http import schemas
from relay.logstore import LogStore
from relay.model import Suppression, iso

TOKEN = "suppression-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgres"])
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, LogStore]]:
    async with AsyncExitStack() as stack:
        url = await store_url(request.param, tmp_path / "data" / "relay.db", stack)
        config = make_config(tmp_path, http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN]}, store={"url": url})
        relay = await stack.enter_async_context(running_relay(config))
        assert relay.http_address is not None
        assert relay.store is not None
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}", headers=AUTH, timeout=10)
        )
        yield client, relay.store


def entry(address: str, reason: str = "manual", *, at: float = T0, **kw: Any) -> Suppression:
    origin = {"hard_bounce": "bounce", "complaint": "complaint", "manual": "cli"}[reason]
    fields: dict[str, Any] = {"source_queue_id": None, "expires_at": None, "note": ""} | kw
    return Suppression(address, reason, origin, created_at=at, **fields)  # type: ignore[arg-type]


async def test_add_then_add_again(api: tuple[httpx.AsyncClient, LogStore]) -> None:
    client, store = api
    before = time.time()
    r = await client.post(
        "/api/v1/suppressions",
        json={"address": " Jane@Example.COM ", "note": "asked by phone", "expires_at": "2099-01-01T00:00:00Z"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    created = body.pop("created_at")
    assert before - 1 <= _epoch(created) <= time.time() + 1
    assert body == {
        "address": "jane@example.com",
        "reason": "manual",
        "origin": "api",
        "source_queue_id": None,
        "expires_at": "2099-01-01T00:00:00.000Z",
        "note": "asked by phone",
    }
    # the same address again, in any case: the entry in force, unchanged, with 200
    again = await client.post("/api/v1/suppressions", json={"address": "JANE@example.com", "note": "other"})
    assert again.status_code == 200, again.text
    assert again.json() == {**body, "created_at": created}
    assert (await client.get("/api/v1/suppressions/Jane@example.com")).json() == again.json()
    changes = (await client.get("/api/v1/suppressions/audit")).json()["changes"]
    assert len(changes) == 1
    assert changes[0]["actor"].startswith("api:")
    assert TOKEN not in changes[0]["actor"]
    assert (changes[0]["action"], changes[0]["origin"], changes[0]["reason"]) == ("added", "api", "manual")
    assert await store.suppression_count() == 1


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


BAD_BODIES: list[tuple[Any, str]] = [
    ({"address": "not-an-address"}, "address"),
    ({"address": "two@@example.com"}, "address"),
    ({"address": "*@"}, "address"),
    ({"address": "*@bad_domain!.example"}, "address"),
    ({"address": "nul\u0000@example.com"}, "address"),
    ({"address": "a" * 65 + "@example.com"}, "address"),
    ({"address": "x@" + "a" * 400}, "address"),
    ({"address": '"\\\u0000"@example.com'}, "address"),
    ({}, "address"),
    ({"address": "ok@example.com", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"address": "ok@example.com", "expires_at": "tomorrow"}, "expires_at"),
    ({"address": "ok@example.com", "expires_at": "9999-12-31T23:59:59Z"}, "expires_at"),
    ({"address": "ok@example.com", "note": "x" * 1001}, "note"),
    ({"address": "ok@example.com", "note": "nul\u0000"}, "note"),
    ({"address": "ok@example.com", "reason": "complaint"}, "reason"),  # not a field: reason is manual
]


async def test_bad_input_is_422_naming_the_field_and_writes_nothing(api: tuple[httpx.AsyncClient, LogStore]) -> None:
    client, store = api
    for body, field in BAD_BODIES:
        r = await client.post("/api/v1/suppressions", json=body)
        assert r.status_code == 422, (body, r.text)
        assert any(d["loc"][-1] == field for d in r.json()["detail"]), (body, r.text)
    r = await client.post("/api/v1/suppressions", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert await store.suppression_count() == 0
    assert (await store.suppression_audit())[0] == []


async def test_check_says_exactly_what_applies(api: tuple[httpx.AsyncClient, LogStore]) -> None:
    client, store = api
    now = time.time()
    await store.import_suppressions(
        [
            entry("*@blocked.example", note="whole domain"),
            entry("bob@example.com", "hard_bounce", source_queue_id="01BOUNCE"),
            entry("gone@example.com", at=now - 100, expires_at=now - 10),  # expired: does not count
        ],
        "tester",
        now=now - 100,
    )

    async def check(address: str) -> Any:
        r = await client.get("/api/v1/suppressions/check", params={"address": address})
        assert r.status_code == 200, r.text
        return r.json()

    bob = {
        "address": "bob@example.com",
        "reason": "hard_bounce",
        "origin": "bounce",
        "source_queue_id": "01BOUNCE",
        "created_at": iso(T0),
        "expires_at": None,
        "note": "",
    }
    assert await check("Bob@EXAMPLE.com") == {"address": "Bob@EXAMPLE.com", "suppressed": True, "entry": bob}
    assert await check("anyone@Blocked.Example") == {
        "address": "anyone@Blocked.Example",
        "suppressed": True,
        "entry": {**bob, "address": "*@blocked.example", "reason": "manual", "origin": "cli",
                  "source_queue_id": None, "note": "whole domain"},
    }  # fmt: skip
    assert await check("gone@example.com") == {"address": "gone@example.com", "suppressed": False, "entry": None}
    assert await check("alice@example.com") == {"address": "alice@example.com", "suppressed": False, "entry": None}
    for bad in ({"address": "nope"}, {}):
        r = await client.get("/api/v1/suppressions/check", params=bad)
        assert r.status_code == 422, r.text  # not taken for GET /suppressions/{address}
        assert r.json()["detail"][0]["loc"][-1] == "address"
    assert (await client.get("/api/v1/suppressions/gone@example.com")).status_code == 404
    # a domain's entry goes by its key, *@domain
    r = await client.request("DELETE", "/api/v1/suppressions/*@BLOCKED.example", json={"reason": "new owner"})
    assert r.status_code == 200, r.text
    assert r.json()["address"] == "*@blocked.example"
    assert (await check("anyone@blocked.example"))["suppressed"] is False


async def test_remove_needs_a_reason_for_a_complaint_and_is_logged(
    api: tuple[httpx.AsyncClient, LogStore], caplog: pytest.LogCaptureFixture
) -> None:
    client, store = api
    caplog.set_level(logging.INFO, logger="relay.logstore")
    await store.suppress(entry("angry@example.com", "complaint", source_queue_id="01ARF", note="abuse"), "bounces")
    await store.suppress(entry("a/b@example.com"), "tester")  # a "/" in the local part: still one path segment

    r = await client.request("DELETE", "/api/v1/suppressions/nobody@example.com", json={"reason": "x"})
    assert r.status_code == 404, r.text
    for body in (None, {}, {"reason": ""}, {"reason": "  "}):
        r = await client.request("DELETE", "/api/v1/suppressions/angry@example.com", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "reason"]
    assert await store.suppression_check("angry@example.com") is not None
    r = await client.request("DELETE", "/api/v1/suppressions/a%2Fb@example.com")  # manual: no reason needed
    assert r.status_code == 200, r.text
    assert r.json()["address"] == "a/b@example.com"

    r = await client.request(
        "DELETE", "/api/v1/suppressions/ANGRY@example.com", json={"reason": "customer re-subscribed, ticket 4411"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "address": "angry@example.com",
        "reason": "complaint",
        "origin": "complaint",
        "source_queue_id": "01ARF",
        "created_at": iso(T0),
        "expires_at": None,
        "note": "abuse",
    }
    assert await store.suppression_check("angry@example.com") is None
    assert (await client.request("DELETE", "/api/v1/suppressions/angry@example.com", json={})).status_code == 404
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "relay.logstore"]
    assert any("unsuppressed angry@example.com" in m and "customer re-subscribed, ticket 4411" in m for m in logged), (
        logged
    )

    audit = (await client.get("/api/v1/suppressions/audit", params={"address": "Angry@example.com"})).json()
    removed, added = audit["changes"]
    assert audit["next_cursor"] is None
    assert (removed["action"], removed["reason"], removed["origin"]) == (
        "removed",
        "customer re-subscribed, ticket 4411",
        "api",
    )
    assert removed["actor"].startswith("api:")
    assert (added["action"], added["reason"], added["actor"]) == ("added", "complaint", "bounces")


async def test_pages_newest_first_with_filters(api: tuple[httpx.AsyncClient, LogStore]) -> None:
    client, store = api
    items = [entry(f"u{i}@example.com", "complaint" if i % 2 else "manual", at=T0 + i // 2) for i in range(7)]
    await store.import_suppressions(items, "tester")
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/v1/suppressions", params=params)).json()
        assert len(page["suppressions"]) <= 3
        seen += [e["address"] for e in page["suppressions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"u{i}@example.com" for i in (6, 5, 4, 3, 2, 1, 0)]
    complaints = (await client.get("/api/v1/suppressions", params={"reason": "complaint"})).json()
    assert [e["address"] for e in complaints["suppressions"]] == ["u5@example.com", "u3@example.com", "u1@example.com"]
    one = (await client.get("/api/v1/suppressions", params={"address": "U4@EXAMPLE.COM"})).json()
    assert [e["address"] for e in one["suppressions"]] == ["u4@example.com"]
    nul = base64.urlsafe_b64encode(b"1800000000.0|a\x00@example.com").decode()  # PostgreSQL text holds no NUL
    for params, field in (
        ({"cursor": nul}, "cursor"),
        ({"cursor": "not-a-cursor!"}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"reason": "spam"}, "reason"),
        ({"address": "nope"}, "address"),
    ):
        r = await client.get("/api/v1/suppressions", params=params)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][-1] == field

    audit = (await client.get("/api/v1/suppressions/audit", params={"limit": 4})).json()
    assert len(audit["changes"]) == 4
    rest = (await client.get("/api/v1/suppressions/audit", params={"limit": 4, "cursor": audit["next_cursor"]})).json()
    assert len(rest["changes"]) == 3
    assert rest["next_cursor"] is None
    assert {c["address"] for c in audit["changes"] + rest["changes"]} == {f"u{i}@example.com" for i in range(7)}
    for cursor in ("%%%", "OTk5OTk5OTk5OTk5OTk5OTk5OQ"):  # the second: 9999999999999999999, past a BIGINT
        bad = await client.get("/api/v1/suppressions/audit", params={"cursor": cursor})
        assert bad.status_code == 422, bad.text


async def test_every_endpoint_needs_a_token_and_is_documented(api: tuple[httpx.AsyncClient, LogStore]) -> None:
    client, store = api
    for method, path in (
        ("GET", "/api/v1/suppressions"),
        ("POST", "/api/v1/suppressions"),
        ("GET", "/api/v1/suppressions/check?address=a@example.com"),
        ("GET", "/api/v1/suppressions/audit"),
        ("GET", "/api/v1/suppressions/a@example.com"),
        ("DELETE", "/api/v1/suppressions/a@example.com"),
    ):
        r = await client.request(method, path, headers={"Authorization": "Bearer wrong-token-wrong-token"})
        assert r.status_code == 401, (method, path)
    paths = (await client.get("/api/openapi.json")).json()["paths"]
    assert set(paths["/api/v1/suppressions"]) == {"get", "post"}
    assert set(paths["/api/v1/suppressions/{address}"]) == {"get", "delete"}
    assert "/api/v1/suppressions/check" in paths
    assert "/api/v1/suppressions/audit" in paths
    assert await store.suppression_count() == 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_an_address_is_a_key_or_a_value_error(text: str) -> None:
    try:
        key = schemas.suppression_address(text)
    except ValueError:
        return
    assert key == key.strip().lower()
    assert "@" in key
    key.encode()  # storable: UTF-8, no lone surrogates


def test_hostile_addresses_are_refused_at_once() -> None:
    for text in ("a" * 2_000_000 + "@example.com", '"' + "\\a" * 1_000_000 + '"@example.com', "*@" + "a." * 1_000_000):
        with pytest.raises(ValueError, match="not a mailbox"):
            schemas.suppression_address(text)


async def test_a_nul_in_a_message_search_is_422_on_every_store(api: tuple[httpx.AsyncClient, LogStore]) -> None:
    """PostgreSQL text cannot hold NUL: the API refuses it instead of answering 500."""
    client, _ = api
    for name in ("recipient", "message_id", "tag"):
        r = await client.get("/api/v1/messages", params={name: "a\x00b@example.com"})
        assert r.status_code == 422, (name, r.text)
        assert r.json()["detail"][0]["loc"] == ["query", name]
