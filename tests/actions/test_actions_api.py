"""The API's side of support: GET /api/v1/messages/{id}/raw (audited, never for read-only
tokens), read-only tokens ([http] api_tokens_readonly), and the action endpoints, against a
running Relay; with full, read-only, absent, forged and foreign tokens."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers import make_config, running_relay
from helpers.delivery import submit

from relay.logstore import LogStore
from relay.model import Suppression
from relay.service.lifecycle import Relay

FULL = "actions-full-token-0123456789"
READ = "actions-read-token-0123456789"
BOTH = "actions-both-token-0123456789"  # listed twice: read-only wins
MSG = b"From: app@example.com\r\nSubject: Invoice 42\r\n\r\nPlease pay\r\n"


def label(token: str) -> str:
    return "api:" + hashlib.sha256(token.encode()).hexdigest()[:12]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Relay, httpx.AsyncClient]]:
    config = make_config(
        tmp_path,
        http={"listen": "127.0.0.1:0", "api_tokens": [FULL, BOTH], "api_tokens_readonly": [READ, BOTH]},
        delivery={"retry_schedule": ["1h"]},
        routes=[{"domains": ["*"], "host": "127.0.0.1", "port": 9}],
    )
    async with running_relay(config) as relay:  # intake only: what is queued stays queued
        assert relay.http_address is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}", timeout=10) as c:
            yield relay, c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def store_of(relay: Relay) -> LogStore:
    assert relay.store is not None
    return relay.store


async def downloads(store: LogStore) -> list[tuple[str, str, str]]:
    lines, _ = await store.audit_entries(action="download")
    return [(x.actor, x.ip, x.target) for x in lines]


async def test_raw_source_for_full_tokens_only_and_audited(api: tuple[Relay, httpx.AsyncClient]) -> None:
    relay, client = api
    store = store_of(relay)
    qid = await submit(relay, ["jane@example.com"], MSG)
    r = await client.get(f"/api/v1/messages/{qid.lower()}/raw", headers=auth(FULL))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "message/rfc822"
    assert r.headers["content-disposition"] == f'attachment; filename="{qid}.eml"'
    assert r.content == await store.raw_message(qid)
    assert r.content.endswith(b"Please pay\r\n")
    assert await downloads(store) == [(label(FULL), "127.0.0.1", qid)]

    for token in (READ, BOTH):
        r = await client.get(f"/api/v1/messages/{qid}/raw", headers=auth(token))
        assert r.status_code == 403
        assert "read-only" in r.json()["detail"]
    for headers in (
        {},
        auth("forged-token-0123456789"),
        auth(FULL + "x"),
        auth(FULL[:-1]),
        {"Authorization": f"Basic {FULL}"},
        {"Authorization": FULL},
        auth("schemathesis-token-0123456789"),  # another relay's token
    ):
        r = await client.get(f"/api/v1/messages/{qid}/raw", headers=headers)
        assert r.status_code == 401, headers
    assert len(await downloads(store)) == 1  # refusals download nothing and audit no download

    assert (await client.get("/api/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV/raw", headers=auth(FULL))).status_code == 404
    assert (await client.get("/api/v1/messages/not-an-id/raw", headers=auth(FULL))).status_code == 422
    assert len(await downloads(store)) == 1


async def test_read_only_tokens_read_and_change_nothing(api: tuple[Relay, httpx.AsyncClient]) -> None:
    relay, client = api
    store = store_of(relay)
    qid = await submit(relay, ["jane@example.com"], MSG)
    for path in (f"/api/v1/messages/{qid}", f"/api/v1/messages?id={qid}", "/api/v1/stats", "/api/v1/suppressions",
                 "/api/v1/webhooks/deliveries", "/api/openapi.json"):  # fmt: skip
        assert (await client.get(path, headers=auth(READ))).status_code == 200, path
    before = await store.get_message(qid)
    attempts = [
        ("POST", f"/api/v1/messages/{qid}/retry", {}),
        ("POST", f"/api/v1/messages/{qid}/cancel", {}),
        ("POST", f"/api/v1/messages/{qid}/notes", {"text": "hi"}),
        ("POST", f"/api/v1/messages/{qid}/release", {}),
        ("POST", f"/api/v1/messages/{qid}/discard", {}),
        ("POST", f"/api/v1/messages/{qid}/resend", {"address": "jane@example.com", "new_address": "a@example.org"}),
        ("POST", "/api/v1/messages", {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}),
        ("POST", "/api/v1/suppressions", {"address": "x@example.com"}),
        ("DELETE", "/api/v1/suppressions/x@example.com", None),
        ("POST", "/api/v1/webhooks/deliveries/1/retry", None),
        ("POST", "/api/v1/cases", {"title": "t", "queue_ids": [qid]}),
    ]
    for method, path, body in attempts:
        for token in (READ, BOTH):
            r = await client.request(method, path, json=body, headers=auth(token))
            assert r.status_code == 403, (method, path, r.text)
            assert r.json() == {"detail": "read-only token"}
    assert await store.get_message(qid) == before
    assert (await store.audit_entries())[0] == []
    # a bounce report may quote a whole message: a body, so not for read-only tokens either
    assert (await client.get("/api/v1/bounce-reports/1", headers=auth(READ))).status_code == 403
    assert (await client.get("/api/v1/bounce-reports/1", headers=auth(FULL))).status_code == 404


async def test_action_endpoints(api: tuple[Relay, httpx.AsyncClient]) -> None:
    relay, client = api
    store = store_of(relay)
    qid = await submit(relay, ["jane@example.com", "joe@example.com"], MSG)
    h = auth(FULL)

    r = await client.post(f"/api/v1/messages/{qid}/notes", json={"text": "Jane called"}, headers=h)
    assert r.status_code == 201, r.text
    assert r.json() == {"id": qid, "action": "note", "count": 0}
    for bad in ({"text": ""}, {"text": "x\u0000y"}, {"text": "x" * 10_001}, {}, {"text": "ok", "extra": 1}):
        assert (await client.post(f"/api/v1/messages/{qid}/notes", json=bad, headers=h)).status_code == 422, bad

    case = await store.open_case(title="Jane", queue_ids=[qid], actor="sam")
    r = await client.post(f"/api/v1/messages/{qid}/retry", json={"reason": "go", "case_id": case.id}, headers=h)
    assert r.status_code == 200, r.text
    r = await client.post(f"/api/v1/messages/{qid}/retry", json={"case_id": case.id + 99}, headers=h)
    assert r.status_code == 404
    await store.close_case(case.id, "customer left", actor="sam")
    r = await client.post(f"/api/v1/messages/{qid}/notes", json={"text": "late", "case_id": case.id}, headers=h)
    assert r.status_code == 409
    r = await client.post(f"/api/v1/messages/{qid}/retry", json={"case_id": case.id}, headers=h)
    assert r.status_code == 409
    for bad_case in (0, -1, 2**63, "x"):
        r = await client.post(f"/api/v1/messages/{qid}/retry", json={"case_id": bad_case}, headers=h)
        assert r.status_code == 422, bad_case

    await store.suppress(Suppression("blocked@example.org", "manual", "api", None, time.time()), actor="t")
    resend = f"/api/v1/messages/{qid}/resend"
    r = await client.post(resend, json={"address": "jane@example.com", "new_address": "blocked@example.org"}, headers=h)
    assert r.status_code == 409
    assert "suppressed" in r.json()["detail"]
    r = await client.post(resend, json={"address": "nobody@example.com", "new_address": "a@example.org"}, headers=h)
    assert r.status_code == 404
    for new_address in ("not an address", "a@[127.0.0.1]", "a\u0000@example.org", "a@example.org\r\nX: y"):
        r = await client.post(resend, json={"address": "jane@example.com", "new_address": new_address}, headers=h)
        assert r.status_code == 422, new_address
    r = await client.post(resend, json={"address": "jane@example.com", "new_address": "jane@example.org"}, headers=h)
    assert r.status_code == 201, r.text
    new_id = r.json()["new_id"]
    new = await store.get_message(new_id)
    assert new is not None
    assert [x.address for x in new.recipients] == ["jane@example.org"]

    assert (await client.post(f"/api/v1/messages/{qid}/release", headers=h)).json()["count"] == 0  # nothing held
    assert (await client.post(f"/api/v1/messages/{qid}/discard", headers=h)).json()["count"] == 0
    r = await client.post(f"/api/v1/messages/{qid}/cancel", json={"reason": "asked"}, headers=h)
    assert r.json() == {"id": qid, "action": "cancel", "count": 2}
    r = await client.post("/api/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV/cancel", headers=h)
    assert r.status_code == 404

    r = await client.post(
        f"/api/v1/messages/{qid}/unsuppress", json={"address": "jane@example.com", "reason": "x"}, headers=h
    )
    assert r.status_code == 404  # not suppressed
    lines, _ = await store.audit_entries(limit=100)
    actions = [x.action for x in lines if x.actor == label(FULL)]
    assert set(actions) >= {"action.note", "action.retry", "action.resend", "action.release", "action.cancel"}


async def test_openapi_lists_the_new_routes(api: tuple[Relay, httpx.AsyncClient]) -> None:
    _, client = api
    doc = (await client.get("/api/openapi.json")).json()
    for path in ("raw", "resend", "notes", "release", "discard", "cancel", "unsuppress"):
        assert f"/api/v1/messages/{{id}}/{path}" in doc["paths"], path
    raw = doc["paths"]["/api/v1/messages/{id}/raw"]["get"]["responses"]
    assert "message/rfc822" in raw["200"]["content"]
    assert "403" in raw
