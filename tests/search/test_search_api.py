"""GET /api/v1/messages?q= over real HTTP, and `relay search` as a real process."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import SEED, qid
from helpers import make_config, relay_cli, running_relay, write_config

from relay.logstore import LogStore

TOKEN = "s3cret-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _recent() -> list[object]:
    """The seed, moved to end a minute ago (the API's relative times count from the clock)."""
    from dataclasses import replace

    from conftest import NOW

    shift = time.time() - 60 - NOW
    out = []
    for items in SEED.values():
        for i in items:
            msg = replace(i.message, received_at=i.message.received_at + shift)
            events = tuple(replace(e, at=e.at + shift) for e in i.events)
            out.append(replace(i, message=msg, events=events))
    return out


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = make_config(tmp_path, http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN]})
    async with running_relay(config) as relay:
        assert relay.store is not None
        assert relay.http_address is not None
        await relay.store.bulk_import(_recent())  # type: ignore[arg-type]
        base = f"http://127.0.0.1:{relay.http_address.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10, headers=AUTH) as client:
            yield client


def letters(doc: dict[str, object]) -> str:
    return "".join(m["id"][8].lower() for m in doc["messages"])  # type: ignore[attr-defined,index]


async def test_q_searches_with_counts_and_pages(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/v1/messages", params={"q": "to:jane@example.com"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (letters(doc), doc["total"], doc["total_capped"], doc["next_cursor"]) == ("fa", 2, False, None)
    first = (await api.get("/api/v1/messages", params={"q": "-status:held after:30d", "limit": 4})).json()
    assert (letters(first), first["total"]) == ("fbed", 6)
    rest = (
        await api.get("/api/v1/messages", params={"q": "-status:held after:30d", "cursor": first["next_cursor"]})
    ).json()
    assert (letters(rest), rest["total"], rest["next_cursor"]) == ("ac", 6, None)
    # the message objects are the ones GET /api/v1/messages/{id} returns
    one = (await api.get(f"/api/v1/messages/{qid('a')}")).json()
    assert rest["messages"][0] == one


async def test_without_q_nothing_is_counted(api: httpx.AsyncClient) -> None:
    doc = (await api.get("/api/v1/messages", params={"tag": "invoice"})).json()
    assert (letters(doc), doc["total"], doc["total_capped"]) == ("ac", None, False)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"q": "status:nope"}, "unknown status"),
        ({"q": "foo:bar"}, "unknown operator foo:"),
        ({"q": "a\x00b"}, "NUL"),
        ({"q": " ".join(["w"] * 21)}, "too many terms"),
        ({"q": "x" * 1001}, "1000"),
        ({"q": "to:jane@example.com", "tag": "invoice"}, "cannot be combined"),
        ({"q": "", "status": "bounced"}, "cannot be combined"),
    ],
)
async def test_bad_q_is_422_naming_q(api: httpx.AsyncClient, params: dict[str, str], says: str) -> None:
    r = await api.get("/api/v1/messages", params=params)
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["query", "q"]
    assert says in detail["msg"]


async def test_q_needs_the_token(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/v1/messages", params={"q": "status:bounced"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


# -- relay search


@pytest.fixture
async def config_file(tmp_path: Path) -> Path:
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    store = await LogStore.open(url)
    try:
        await store.upgrade()
        await store.bulk_import(_recent())  # type: ignore[arg-type]
    finally:
        await store.close()
    return write_config(tmp_path / "relay.toml", f'[server]\ndata_dir = "{tmp_path}"\n[store]\nurl = "{url}"\n')


async def test_cli_lines_and_total(config_file: Path) -> None:
    code, out, err = await relay_cli("--config", str(config_file), "search", "to:jane@example.com")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(qid("f"))
    assert "Jane@Example.com (delivered)" in lines[0]
    assert "'Password reset'" in lines[0]
    assert lines[1].startswith(qid("a"))
    assert "jane@example.com (bounced)" in lines[1]
    assert lines[2] == "2 messages"
    # several arguments are one query; --limit cuts the page, not the count
    code, out, _ = await relay_cli("--config", str(config_file), "search", "--limit", "1", "tag:invoice", "after:30d")
    assert (code, out.splitlines()[-1]) == (0, "2 messages (the newest 1 shown)")


async def test_cli_json_is_the_api_shape(config_file: Path) -> None:
    code, out, err = await relay_cli("--config", str(config_file), "search", "--json", "--", "-is:opened tag:welcome")
    assert code == 0, err
    doc = json.loads(out)
    assert (letters(doc), doc["total"], doc["total_capped"]) == ("e", 1, False)
    assert doc["messages"][0]["recipients"][0]["address"] == "frank@example.com"


@pytest.mark.parametrize("query", ["status:nope", "is:read", "after:soon"])
async def test_cli_bad_query_exits_2(config_file: Path, query: str) -> None:
    code, out, err = await relay_cli("--config", str(config_file), "search", query)
    assert (code, out) == (2, "")
    assert err.startswith("relay: unknown") or "is not a time" in err
