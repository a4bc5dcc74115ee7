"""The cases API over real HTTP against a running Relay (SQLite and PostgreSQL): tokens, open,
list with filters, read with the trail and live states, entries (422 for bad details, NUL,
actions; 404; 409 once closed), close; and relay_cases in /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_config, metric, running_relay, store_url
from test_case_store import bounced_message

from relay.logstore import LogStore

TOKEN = "cases-api-token-0123456789abcdef"
READONLY = "cases-readonly-token-0123456789ab"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Api = tuple[httpx.AsyncClient, LogStore]


@pytest.fixture(params=["sqlite", "postgres"])
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    async with AsyncExitStack() as stack:
        url = await store_url(request.param, tmp_path / "data" / "relay.db", stack)
        config = make_config(
            tmp_path,
            http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN], "api_tokens_readonly": [READONLY]},
            store={"url": url},
        )
        relay = await stack.enter_async_context(running_relay(config))
        assert relay.http_address is not None
        assert relay.store is not None
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}", headers=AUTH, timeout=10)
        )
        yield client, relay.store


async def test_every_endpoint_needs_a_token(api: Api) -> None:
    client, store = api
    for method, path in (
        ("GET", "/api/v1/cases"),
        ("POST", "/api/v1/cases"),
        ("GET", "/api/v1/cases/1"),
        ("POST", "/api/v1/cases/1/entries"),
        ("POST", "/api/v1/cases/1/close"),
    ):
        for headers in ({"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": ""}):
            r = await client.request(method, path, headers=headers, json={"title": "x", "kind": "resolution"})
            assert r.status_code == 401, (method, path)
    paths = (await client.get("/api/openapi.json")).json()["paths"]
    assert set(paths["/api/v1/cases"]) == {"get", "post"}
    assert "/api/v1/cases/{case_id}/entries" in paths
    assert (await store.case_counts())["open"] == 0
    assert (await store.verify_chains()).counts == {"audit": 0, "cases": 0}


async def test_open_read_add_close(api: Api) -> None:
    client, store = api
    await bounced_message(store, "01HZZZZZZZZZZZZZZZZZZZZZZ1")
    r = await client.post("/api/v1/cases", json={"title": "Invoice", "customer_ref": "T-9", "owner": "sam",
                                                 "queue_ids": ["01hzzzzzzzzzzzzzzzzzzzzzz1"]})  # fmt: skip
    assert r.status_code == 201, r.text
    case = r.json()
    assert case["state"] == "open"
    assert case["queue_ids"] == ["01HZZZZZZZZZZZZZZZZZZZZZZ1"]
    assert case["entries"][0]["kind"] == "incident"
    assert "bounced" in case["entries"][0]["details"]["summary"]
    assert case["messages"][0]["recipients"][0]["status"] == "bounced"
    assert case["opened_by"].startswith("api:")
    path = f"/api/v1/cases/{case['id']}"

    r = await client.post(f"{path}/entries", json={"kind": "interaction", "channel": "phone", "summary": "called"})
    assert r.status_code == 201, r.text
    assert r.json()["details"] == {"channel": "phone", "summary": "called"}
    r = await client.post(f"{path}/entries", json={"kind": "escalation", "to": "postmaster", "why": "blocked"})
    assert r.status_code == 201
    listed = (await client.get("/api/v1/cases", params={"escalated": "true"})).json()
    assert [c["id"] for c in listed["cases"]] == [case["id"]]
    assert listed["next_cursor"] is None
    assert (await client.get("/api/v1/cases", params={"state": "open"})).json()["cases"] == []
    assert len((await client.get("/api/v1/cases", params={"owner": "sam"})).json()["cases"]) == 1
    assert len((await client.get("/api/v1/cases", params={"queue_id": "01HZZZZZZZZZZZZZZZZZZZZZZ1"})).json()["cases"])

    r = await client.post(f"{path}/close", json={"reason": "customer gone"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "closed_unresolved"
    r = await client.post(f"{path}/close", json={"reason": "again"})
    assert r.status_code == 409
    r = await client.post(f"{path}/entries", json={"kind": "resolution", "summary": "x"})
    assert r.status_code == 409
    assert "detail" in r.json()
    r = await client.post(f"{path}/entries", json={"kind": "feedback", "score": 2, "comment": "slow"})
    assert r.status_code == 201

    got = (await client.get(path)).json()
    assert [e["kind"] for e in got["entries"]] == ["incident", "interaction", "escalation", "feedback"]
    assert got["closed_reason"] == "customer gone"
    audit, _ = await store.audit_entries(limit=100)
    assert {a.action for a in audit} == {"case.open", "case.entry", "case.close"}
    assert all(a.ip == "127.0.0.1" for a in audit)
    assert (await store.verify_chains()).ok


BAD_ENTRIES: list[Any] = [
    {"kind": "interaction", "channel": "fax", "summary": "x"},
    {"kind": "interaction", "channel": "phone", "summary": "a\u0000b"},
    {"kind": "interaction", "channel": "phone"},
    {"kind": "feedback", "score": 0},
    {"kind": "feedback", "score": True},
    {"kind": "feedback", "score": "9" * 5000},
    {"kind": "resolution", "summary": "x" * 5000},
    {"kind": "resolution", "summary": "x", "extra": {"deep": [1] * 10}},
    {"kind": "action", "action": "retry", "queue_id": "Q"},
    {"kind": "close", "reason": "x"},
    {"kind": "nope\u0000"},
    {"summary": "no kind"},
    [],
]


async def test_bad_entries_are_422_and_write_nothing(api: Api) -> None:
    client, _ = api
    case = (await client.post("/api/v1/cases", json={"title": "t", "incident": "x"})).json()
    for body in BAD_ENTRIES:
        r = await client.post(f"/api/v1/cases/{case['id']}/entries", json=body)
        assert r.status_code == 422, (body, r.text)
        assert "detail" in r.json()
    assert len((await client.get(f"/api/v1/cases/{case['id']}")).json()["entries"]) == 1


async def test_bad_cases_and_unknown_ids(api: Api) -> None:
    client, store = api
    for body in ({"title": ""}, {"title": "a\u0000"}, {"title": "x" * 201}, {"title": "t", "queue_ids": ["NOPE"]},
                 {"title": "t", "queue_ids": "abc"}, {"title": "t", "surprise": 1}):  # fmt: skip
        r = await client.post("/api/v1/cases", json=body)
        assert r.status_code == 422, (body, r.text)
    for path in ("/api/v1/cases/999999", "/api/v1/cases/999999/entries", "/api/v1/cases/999999/close"):
        method = "GET" if path.endswith("999") else "POST"
        r = await client.request(method, path, json={"kind": "resolution", "summary": "x", "reason": "r"})
        assert r.status_code in (404, 422), r.text
    r = await client.get("/api/v1/cases/999999")
    assert r.status_code == 404
    r = await client.post("/api/v1/cases/999999/entries", json={"kind": "resolution", "summary": "x"})
    assert r.status_code == 404
    r = await client.post("/api/v1/cases/999999/close", json={"reason": "x"})
    assert r.status_code == 404
    for bad in ("0", "-1", "99999999999999999999", "abc"):
        assert (await client.get(f"/api/v1/cases/{bad}")).status_code == 422
    for params in ({"state": "nope"}, {"cursor": "%%%"}, {"owner": "a\u0000"}, {"limit": "0"}):
        assert (await client.get("/api/v1/cases", params=params)).status_code == 422, params
    assert (await store.cases(sla=1.0))[0] == []


async def test_pages_and_the_gauge(api: Api) -> None:
    client, _ = api
    ids = [(await client.post("/api/v1/cases", json={"title": f"c{i}"})).json()["id"] for i in range(5)]
    page = (await client.get("/api/v1/cases", params={"limit": 2})).json()
    seen = [c["id"] for c in page["cases"]]
    while page["next_cursor"]:
        page = (await client.get("/api/v1/cases", params={"limit": 2, "cursor": page["next_cursor"]})).json()
        seen += [c["id"] for c in page["cases"]]
    assert seen == ids[::-1]
    text = (await client.get("/metrics")).text
    assert metric(text, "relay_cases", state="open") == 5
    assert metric(text, "relay_cases", state="confirmed") == 0
    assert "relay_case_time_to_confirmation_seconds" in text


async def test_a_read_only_token_reads_and_writes_nothing(api: Api) -> None:
    client, store = api
    case = (await client.post("/api/v1/cases", json={"title": "t"})).json()
    ro = {"Authorization": f"Bearer {READONLY}"}
    assert (await client.get("/api/v1/cases", headers=ro)).status_code == 200
    assert (await client.get(f"/api/v1/cases/{case['id']}", headers=ro)).status_code == 200
    for path, body in (
        ("/api/v1/cases", {"title": "x"}),
        (f"/api/v1/cases/{case['id']}/entries", {"kind": "resolution", "summary": "x"}),
        (f"/api/v1/cases/{case['id']}/close", {"reason": "x"}),
    ):
        r = await client.post(path, json=body, headers=ro)
        assert r.status_code == 403, (path, r.text)
    assert (await store.case(case["id"], sla=1.0)).state == "open"  # type: ignore[union-attr]
    assert (await store.verify_chains()).counts == {"audit": 1, "cases": 0}
