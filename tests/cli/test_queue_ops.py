"""Queue control and reporting through the real `relay` CLI (and the API for the retry rule),
on SQLite and PostgreSQL: queue list, retry, delete, stats."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from helpers import NOWHERE, ServeProcess, raw_sql, relay_cli, store_url, write_config
from sqlalchemy.engine import Connection

from relay.logstore import LogStore
from relay.model import EventView, Imported, MessageView, NewMessage

TOKEN = "queue-ops-test-token-0123456789"
NOW = time.time()
LATER = NOW + 3600  # due times in the future: a running relay leaves these alone until a retry


@dataclass
class Store:
    url: str
    config: Path

    async def cli(self, *args: str) -> tuple[int, str, str]:
        return await relay_cli(*args, "--config", str(self.config))

    async def view(self, qid: str) -> MessageView:
        store = await LogStore.open(self.url)
        try:
            (found,) = await store.lookup(qid)
        finally:
            await store.close()
        return found

    async def load(self, *items: Imported) -> None:
        store = await LogStore.open(self.url)
        try:
            await store.bulk_import(items)
        finally:
            await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with AsyncExitStack() as stack:
        url = await store_url(request.param, tmp_path / "data" / "relay.db", stack)
        s = await LogStore.open(url)
        try:
            await s.upgrade()
        finally:
            await s.close()
        config = write_config(
            tmp_path / "relay.toml",
            f"""[server]
hostname = "relay.test"
data_dir = "{tmp_path / "data"}"
processes = 1
[smtp]
listen = ["127.0.0.1:0"]
[http]
listen = "127.0.0.1:0"
api_tokens = ["{TOKEN}"]
[store]
url = "{url}"
{NOWHERE}""",
        )
        yield Store(url, config)


def qid(short: str) -> str:
    """A queue id of the real length (26), so that the API's pattern takes it."""
    return short.ljust(26, "0")


def recipient(
    short_id: str,
    address: str,
    status: str,
    *,
    attempts: int = 1,
    at: float = NOW - 600,
    next_at: float | None = None,
    last_response: str | None = None,
    events: tuple[tuple[float, str], ...] = (),
    tag: str = "welcome",
) -> Imported:
    """One message with one recipient in a given state (and its history of events)."""
    msg = NewMessage(
        queue_id=qid(short_id), message_id=f"{short_id.lower()}@app.example", mail_from="app@example.com",
        recipients=(address,), subject="Hello", tags=(tag,), user="app", client_ip="127.0.0.1", received_at=at,
        raw=b"Subject: Hello\r\n\r\nbody\r\n",
    )  # fmt: skip
    history = (
        EventView(at, "received", None, {}),
        *(EventView(when, kind, address, {}) for when, kind in events),  # type: ignore[arg-type]
    )
    return Imported(msg, status, attempts, next_at, last_response, history)


# One recipient in every state: (status, attempts, next_attempt_at, last_response).
EVERY_STATE = {
    "q@example.net": ("queued", 0, LATER, None),
    "d@example.net": ("deferred", 1, LATER, "421 4.7.0 later"),
    "e@example.net": ("expired", 5, None, "421 4.7.0 still"),
    "b@example.net": ("bounced", 1, None, "550 5.1.1 no such user"),
    "l@example.net": ("delivered", 1, None, "250 ok"),
    "s@example.net": ("suppressed", 0, None, None),
    "c@example.net": ("cancelled", 0, None, None),
    "n@example.net": ("sending", 1, LATER, None),  # leased
}
RETRIED = {"q@example.net": "queued", "d@example.net": "deferred", "e@example.net": "deferred",
           "b@example.net": "deferred"}  # fmt: skip


# Today's schema; with migration 0004, recipients.message_id is recipients.queue_id.
PLANT_RECIPIENT = sa.text(
    "INSERT INTO recipients (queue_id, address, domain, status, attempts, next_attempt_at, last_response, updated_at)"
    " VALUES (:qid, :address, 'example.net', :status, :attempts, :next_at, :response, :now)"
)


async def load_every_state(store: Store, *short_ids: str) -> None:
    await store.load(*(recipient(short, "x@example.net", "queued") for short in short_ids))
    rows = [
        {"qid": qid(short), "address": address, "status": status, "attempts": attempts, "next_at": next_at,
         "response": response, "now": NOW}
        for short in short_ids
        for address, (status, attempts, next_at, response) in EVERY_STATE.items()
    ]  # fmt: skip

    def plant(conn: Connection) -> None:
        conn.execute(sa.text("DELETE FROM recipients"))
        conn.execute(PLANT_RECIPIENT, rows)

    await raw_sql(store.url, plant, write=True)


def retried(view: MessageView) -> dict[str, Any]:
    return {e.recipient: e.details["by"] for e in view.events if e.type == "retried"}


def states(view: MessageView) -> dict[str, str]:
    return {r.address: r.status for r in view.recipients}


# -- retry: one rule for the CLI and the API


async def test_queue_retry_id_and_all(store: Store) -> None:
    await load_every_state(store, "01R1", "01R2")

    # --all: queued and deferred only, never the bounces and expiries of every message ever
    assert await store.cli("queue", "retry", "--all") == (0, "4 recipient(s) due now\n", "")
    for short in ("01R1", "01R2"):
        view = await store.view(qid(short))
        assert set(retried(view)) == {"q@example.net", "d@example.net"}
        assert states(view) == {address: status for address, (status, *_) in EVERY_STATE.items()}

    # one message: its queued, deferred, expired and bounced recipients are due now
    assert await store.cli("queue", "retry", qid("01R2")) == (0, "4 recipient(s) due now\n", "")
    view = await store.view(qid("01R2"))
    retries = sorted(str(e.recipient) for e in view.events if e.type == "retried")
    assert retries == sorted(["q@example.net", "d@example.net", *RETRIED])  # the --all ones, then these
    for r in view.recipients:
        if r.address in RETRIED:
            assert (r.status, r.next_attempt_at) == (RETRIED[r.address], pytest.approx(time.time(), abs=60))
            assert r.last_response == EVERY_STATE[r.address][3]
        else:
            assert r.status == EVERY_STATE[r.address][0]
    code, _, err = await store.cli("queue", "retry", qid("01NOSUCH"))
    assert (code, err) == (1, f"relay: no message {qid('01NOSUCH')}\n")


async def test_api_retry_follows_the_same_rule_as_the_cli(store: Store) -> None:
    await load_every_state(store, "01A1", "01A2")
    server = await ServeProcess(store.config).start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.ports['http']}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            assert await store.cli("queue", "retry", qid("01A1")) == (0, "4 recipient(s) due now\n", "")
            r = await api.post(f"/api/v1/messages/{qid('01A2')}/retry", json={"reason": "same rule"})
            assert r.json() == {"id": qid("01A2"), "retried": 4}
            stats = (await api.get("/api/v1/stats", params={"group_by": "domain"})).json()
            assert {"deferred", "deferrals", "bounced"} <= set(stats["groups"][0])
    finally:
        server.terminate()
        assert await server.wait() == 0
    by_cli, by_api = retried(await store.view(qid("01A1"))), retried(await store.view(qid("01A2")))
    assert set(by_cli) == set(by_api) == set(RETRIED)
    assert set(by_cli.values()) == {"cli"}
    assert all(by.startswith("api:") for by in by_api.values())


# -- delete


async def test_queue_delete_keeps_the_last_response(store: Store) -> None:
    await store.load(
        recipient("01X1", "d@example.net", "deferred", next_at=LATER, last_response="421 4.7.0 greylisted"),
        recipient("01X2", "q@example.net", "queued", attempts=0, next_at=LATER),
    )
    assert await store.cli("queue", "delete", qid("01X1")) == (0, "1 recipient(s) cancelled\n", "")
    assert await store.cli("queue", "delete", qid("01X2")) == (0, "1 recipient(s) cancelled\n", "")
    for short, last_response in (("01X1", "421 4.7.0 greylisted"), ("01X2", None)):
        view = await store.view(qid(short))
        (r,) = view.recipients
        assert (r.status, r.last_response, r.next_attempt_at) == ("cancelled", last_response, None)
        assert (view.events[-1].type, view.events[-1].details["by"]) == ("cancelled", "cli")
    code, out, _ = await store.cli("log", qid("01X1"))
    assert code == 0
    assert "last reply: 421 4.7.0 greylisted" in out
    assert await store.cli("queue", "delete", qid("01X1")) == (
        0, "nothing to cancel: every recipient is final already\n", "",
    )  # fmt: skip


# -- queue list


async def test_queue_list(store: Store) -> None:
    now = time.time()
    await store.load(
        recipient("01L1", "old@a.example", "queued", attempts=0, at=now - 7200, next_at=now - 7200),
        recipient("01L2", "slow@b.example", "deferred", attempts=2, at=now - 3600, next_at=now + 3600,
                  last_response="421 4.7.0 try again later"),
        recipient("01L3", "busy@A.example", "sending", at=now - 60, next_at=now + 300),
        recipient("01L4", "done@a.example", "delivered", at=now - 30, last_response="250 ok"),
        recipient("01L5", "gone@b.example", "bounced", at=now - 20, last_response="550 5.1.1 unknown"),
    )  # fmt: skip
    code, out, err = await store.cli("queue", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [qid("01L1"), qid("01L2"), qid("01L3")]  # oldest first
    first, second, third = (line.split() for line in lines)
    assert first[1].startswith("2h0")  # age: 2h00m, or a little more on a slow machine
    assert first[2:6] == ["old@a.example", "queued", "0", "due"]
    assert second[1].startswith("1h0")
    assert second[2:6] == ["slow@b.example", "deferred", "2", "in"]
    assert second[6].endswith("m")  # 59m, less on a slow machine
    assert lines[1].endswith("  421 4.7.0 try again later")
    assert third[2:6] == ["busy@A.example", "sending", "1", "in"]

    code, out, _ = await store.cli("queue", "list", "--state", "deferred")
    assert [line.split()[0] for line in out.splitlines()] == [qid("01L2")]
    code, out, _ = await store.cli("queue", "list", "--domain", "A.EXAMPLE")
    assert [line.split()[0] for line in out.splitlines()] == [qid("01L1"), qid("01L3")]
    assert await store.cli("queue", "list", "--domain", "nowhere.example") == (0, "", "")
    code, out, err = await store.cli("queue", "list", "--limit", "1")
    assert (code, len(out.splitlines())) == (0, 1)
    assert err == "relay: showing the first 1 recipients; use --limit for more\n"
    code, _, err = await store.cli("queue", "list", "--state", "delivered")
    assert code == 2
    assert "invalid choice" in err

    code, out, _ = await store.cli("queue", "list", "--json", "--state", "deferred")
    assert code == 0
    (entry,) = json.loads(out)
    assert entry == {
        "queue_id": qid("01L2"),
        "received_at": entry["received_at"],
        "age_seconds": pytest.approx(3600, abs=120),
        "recipient": "slow@b.example",
        "state": "deferred",
        "attempts": 2,
        "next_attempt_at": entry["next_attempt_at"],
        "last_response": "421 4.7.0 try again later",
    }
    assert entry["received_at"].endswith("Z")
    assert entry["next_attempt_at"].endswith("Z")
    assert json.loads((await store.cli("queue", "list", "--json", "--domain", "nowhere.example"))[1]) == []


# -- stats


async def test_stats_count_recipients_not_attempts(store: Store) -> None:
    t0 = 1_800_000_000.0
    await store.load(
        # deferred twice, bounced, retried, deferred, bounced again: one bounced recipient, 3 deferrals
        recipient("01S1", "r1@example.net", "bounced", at=t0, attempts=5, events=(
            (t0 + 1, "deferred"), (t0 + 2, "deferred"), (t0 + 3, "bounced"), (t0 + 4, "retried"),
            (t0 + 5, "deferred"), (t0 + 6, "bounced"),
        )),
        # bounced, retried, delivered: its outcome is delivered
        recipient("01S2", "r2@example.net", "delivered", at=t0, attempts=2, events=(
            (t0 + 1, "bounced"), (t0 + 2, "retried"), (t0 + 3, "delivered"),
        )),
        recipient("01S3", "r3@example.net", "delivered", at=t0, events=((t0 + 1, "delivered"),)),
        recipient("01S4", "r4@example.net", "expired", at=t0, attempts=2, events=(
            (t0 + 1, "deferred"), (t0 + 9, "expired"),
        )),
    )  # fmt: skip
    window = ("--since", str(t0 - 10), "--until", "2027-01-16T00:00:00Z")  # t0 is 2027-01-15T08:00Z
    for group_by in ("tag", "domain", "user"):
        code, out, err = await store.cli("stats", "--json", "--group-by", group_by, *window)
        assert (code, err) == (0, "")
        doc = json.loads(out)
        assert doc["group_by"] == group_by
        (group,) = doc["groups"]
        counts = {k: group[k] for k in ("received", "delivered", "deferred", "deferrals", "bounced", "expired")}
        assert counts == {"received": 4, "delivered": 2, "deferred": 2, "deferrals": 4, "bounced": 1, "expired": 1}
    code, out, _ = await store.cli("stats", *window)
    assert code == 0
    head, row = out.splitlines()[1:]
    assert head.split()[:7] == ["group", "received", "delivered", "deferred", "deferrals", "bounced", "expired"]
    assert row.split()[:7] == ["welcome", "4", "2", "2", "4", "1", "1"]
    code, _, err = await store.cli("stats", "--since", "2027-01-02T00:00:00Z", "--until", "2027-01-01T00:00:00Z")
    assert (code, err) == (2, "relay: --since must not be after --until\n")
