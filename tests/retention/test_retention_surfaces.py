"""What people see of retention, against a running Relay (SQLite): a purged body is "expired by
retention" in the console's timeline and body views (410 for the .eml and the HTML frame), in
the API (410 Gone for the raw message) and in `relay log`; a purged message's old tracking link
answers 404 cleanly (never another message's link); a closed case names its purged message; the
service task purges, counts relay_retention_deleted_total{kind} and survives a broken store;
`relay retention run [--dry-run] [--json]`."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from helpers import make_config, raw_sql, relay_cli, wait_for, write_config
from helpers.console import Console, console_with
from helpers.retention_seed import DAY, NOW, counts, qid, seed
from prometheus_client import REGISTRY
from sqlalchemy.engine import Connection

from relay.config import RetentionConfig
from relay.logstore import LogStore
from relay.service.lifecycle import tracking_secret
from relay.service.retention import RetentionService
from relay.tracking import TokenSigner

TOKEN = "retention-token-0123456789abcdef"
KEEP = RetentionConfig()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    sections = {
        "http": {"listen": "127.0.0.1:0", "api_tokens": [TOKEN]},
        "tracking": {"base_url": "http://t.example.test"},
    }
    async with console_with(tmp_path, **sections) as c:
        yield c


async def _recipient_id(console: Console, queue_id: str) -> int:
    def read(conn: Connection) -> int:
        return int(conn.execute(sa.text("SELECT id FROM recipients WHERE queue_id = :q"), {"q": queue_id}).scalar_one())

    return await raw_sql(console.relay.config.store.url, read)


async def test_an_expired_body_says_so_everywhere(console: Console) -> None:
    store = console.store
    await seed(store, qid(1), "delivered", age=8 * DAY)
    await seed(
        store, qid(2), "delivered", age=DAY, raw=b"Subject: kept\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n"
    )
    await store.retention_run(KEEP, now=NOW)
    api = {"Authorization": f"Bearer {TOKEN}"}
    async with console.signed_in("sam") as client:
        page = await client.get(f"/ui/messages/{qid(1)}")
        assert page.status_code == 200
        assert "The message body expired by retention on 2030-03-17" in page.text  # NOW, in UTC
        assert "Body expired" in page.text  # the timeline's line
        assert "The message body expired by retention ([retention] bodies = 7d)" in page.text
        for view in ("eml", "html"):
            r = await client.get(f"/ui/messages/{qid(1)}/{view}")
            assert r.status_code == 410, view
            assert "expired by retention on 2030-03-17" in r.text
        kept = await client.get(f"/ui/messages/{qid(2)}")
        assert "expired by retention" not in kept.text
        assert (await client.get(f"/ui/messages/{qid(2)}/html")).status_code == 200
        raw = await client.get(f"/api/v1/messages/{qid(1)}/raw", headers=api)
        assert raw.status_code == 410
        assert raw.json()["detail"] == "the message body expired by retention on 2030-03-17T17:46:40.000Z"
        assert (await client.get(f"/api/v1/messages/{qid(2)}/raw", headers=api)).status_code == 200
        assert (await client.get(f"/api/v1/messages/{'9' * 26}/raw", headers=api)).status_code == 404
        events = (await client.get(f"/api/v1/messages/{qid(1)}", headers=api)).json()["events"]
        assert events[-1]["type"] == "body_purged"


async def test_old_tracking_links_answer_cleanly_after_the_purge(console: Console) -> None:
    store = console.store
    signer = TokenSigner(tracking_secret(console.relay.config))
    await seed(store, qid(1), "delivered", age=100 * DAY, links=("https://example.org/reset?token=old",))
    await seed(store, qid(2), "delivered", age=DAY, links=("https://example.org/other",))
    old, kept = await _recipient_id(console, qid(1)), await _recipient_id(console, qid(2))
    async with console.client() as client:
        r = await client.get(f"/t/c/{signer.click_token(old, 0)}")
        assert r.status_code == 302
        assert r.headers["location"] == "https://example.org/reset?token=old"
        result = await store.retention_run(KEEP, now=NOW)
        assert result is not None
        assert result[0].rows == 1
        assert (await counts(console.relay.config.store.url, [qid(1)]))["link_chunks"] == 0
        await seed(store, qid(3), "delivered", age=0, links=("https://example.org/new-secret",))
        for path in (f"/t/c/{signer.click_token(old, 0)}", f"/t/o/{signer.open_token(old)}"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert "example.org" not in r.headers.get("location", "")
        r = await client.get(f"/t/c/{signer.click_token(kept, 0)}")
        assert r.headers["location"] == "https://example.org/other"


async def test_a_closed_case_names_its_purged_message(console: Console) -> None:
    store = console.store
    await seed(store, qid(1), "bounced", age=100 * DAY)
    await seed(store, qid(2), "delivered", age=DAY)
    case = await store.open_case(title="Gone", queue_ids=[qid(1)], actor="sam", incident="bounced")
    await store.close_case(case.id, "no answer", actor="sam")
    await store.retention_run(KEEP, now=NOW)
    async with console.signed_in("sam") as client:
        page = await client.get(f"/ui/cases/{case.id}")
        assert page.status_code == 200
        assert "purged by retention" in page.text
        assert qid(1) in page.text
        gone = await client.get(f"/ui/messages/{qid(1)}")
        assert gone.status_code == 404
        assert "purged by retention" in gone.text


async def test_the_service_purges_counts_and_survives_a_broken_store(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    store = await LogStore.open(url)
    await store.upgrade()
    config = make_config(tmp_path, store={"url": url}, retention={"messages": "1d", "bodies": "0s"})
    try:
        for i in range(3):
            await seed(store, qid(i), "delivered", age=5 * 365 * DAY)  # NOW - 5 years: long before time.time()
        await seed(store, qid(9), "queued", age=0)

        def deleted() -> float:
            return REGISTRY.get_sample_value("relay_retention_deleted_total", {"kind": "messages"}) or 0.0

        before = deleted()
        service = RetentionService(store, config, interval=0.05, first=0.01, pause=0)
        task = asyncio.create_task(service.run())
        await wait_for(lambda: deleted() == before + 3, timeout=20)
        assert (await counts(url))["messages"] == 1
        await store.close()  # every later pass fails: logged, and the task goes on
        await asyncio.sleep(0.3)
        assert not task.done()
        assert await service.once() is None
        await service.shutdown()
        await asyncio.wait_for(task, 10)
    finally:
        await store.close()


async def test_relay_retention_run(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    config = write_config(
        tmp_path / "relay.toml",
        f'[server]\nhostname = "relay.test"\ndata_dir = "{tmp_path / "data"}"\n[store]\nurl = "{url}"\n'
        '[retention]\nbodies = "7d"\nmessages = "90d"\nwebhook_deliveries = 0\naudit = "400d"\n',
    )
    store = await LogStore.open(url)
    await store.upgrade()
    try:
        sizes = [len(await seed(store, qid(i), "delivered", age=5 * 365 * DAY)) for i in range(3)]
        await seed(store, qid(9), "queued", age=0)
        await store.audit(actor="ann", ip="", action="signin", now=1.0)  # 1970
        before = await counts(url)
        code, out, err = await relay_cli("--config", str(config), "retention", "run", "--dry-run")
        assert code == 0, err
        lines = out.splitlines()
        assert re.fullmatch(rf"messages +3 rows +{sum(sizes)} bytes \({sum(sizes)} B\)  older than 90d", lines[0])
        assert re.fullmatch(r"bodies +0 rows +0 bytes \(0 B\)  older than 7d", lines[1])
        assert re.fullmatch(r"webhook_deliveries +0 rows +0 bytes \(0 B\)  kept forever", lines[2])
        assert re.fullmatch(r"audit +1 rows +0 bytes \(0 B\)  older than 400d", lines[3])
        assert lines[4] == "dry run: nothing deleted"
        assert await counts(url) == before
        code, out, err = await relay_cli("--config", str(config), "retention", "run", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["dry_run"] is False
        assert doc["kinds"][0] == {"kind": "messages", "rows": 3, "bytes": sum(sizes), "keep": "90d"}
        assert doc["kinds"][2]["keep"] is None
        assert (await counts(url))["messages"] == 1
        code, out, _ = await relay_cli("--config", str(config), "audit", "verify")
        assert code == 0
        assert "purged by retention" in out
        code, out, _ = await relay_cli("--config", str(config), "retention", "run")
        assert code == 0
        assert "dry run" not in out
        assert out.splitlines()[0].split()[:3] == ["messages", "0", "rows"]
    finally:
        await store.close()


def test_human_sizes() -> None:
    from relay.retention_cli import size

    assert [size(n) for n in (0, 812, 3 * 1024 + 400, 5 * 1024**3)] == ["0 B", "812 B", "3.4 KiB", "5.0 GiB"]


async def _cli_store(tmp_path: Path) -> tuple[str, Path, LogStore]:
    """The URL of a SQLite store, migrated and open, and a config file that points the CLI at it."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    config = write_config(
        tmp_path / "relay.toml",
        f'[server]\nhostname = "relay.test"\ndata_dir = "{tmp_path / "data"}"\n[store]\nurl = "{url}"\n',
    )
    store = await LogStore.open(url)
    await store.upgrade()
    return url, config, store


async def test_relay_log_says_the_body_expired(tmp_path: Path) -> None:
    _, config, store = await _cli_store(tmp_path)
    try:
        await seed(store, qid(1), "delivered", age=8 * DAY)
        await store.retention_run(KEEP, now=NOW)
    finally:
        await store.close()
    code, out, err = await relay_cli("--config", str(config), "log", qid(1))
    assert code == 0, err
    assert "body_purged" in out
    assert "the body expired by retention (kept 7d;" in out


async def test_raw_route_without_a_token_is_refused_first(console: Console) -> None:
    """The 410 tells nothing to a caller without a token."""
    await seed(console.store, qid(1), "delivered", age=8 * DAY)
    await console.store.retention_run(KEEP, now=NOW)
    async with httpx.AsyncClient(base_url=console.base) as client:
        assert (await client.get(f"/api/v1/messages/{qid(1)}/raw")).status_code == 401


async def test_relay_retention_run_while_another_process_purges(tmp_path: Path) -> None:
    """The lock another process holds (here: the SQLite store's flock, as `relay serve` takes it)
    makes the command say so and exit 1, deleting nothing; a dry run needs no lock."""
    import fcntl
    import os

    url, config, store = await _cli_store(tmp_path)
    try:
        await seed(store, qid(1), "delivered", age=5 * 365 * DAY)
        await seed(store, qid(2), "delivered", age=0)
    finally:
        await store.close()
    fd = os.open(tmp_path / "relay.db-retentionlock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, out, err = await relay_cli("--config", str(config), "retention", "run")
        assert code == 1
        assert err == "relay: another Relay process is purging now; try again in a while\n"
        assert out == ""
        code, out, _ = await relay_cli("--config", str(config), "retention", "run", "--dry-run")
        assert code == 0
        assert out.split()[:2] == ["messages", "1"]
    finally:
        os.close(fd)
    assert (await counts(url))["messages"] == 2
    code, out, _ = await relay_cli("--config", str(config), "retention", "run")
    assert code == 0
    assert (await counts(url))["messages"] == 1
