"""`relay db copy --to URL`: a SQLite store built through Relay's own paths (SMTP intake,
delivery to a sink, a bounce, tracking, webhooks, users, suppressions, a case, the audit)
moves to PostgreSQL with every row, id and view intact, the hash chains verifying, and the
sequences past the copied ids; every refusal writes nothing."""

from __future__ import annotations

import base64
import json
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import sqlalchemy as sa
from helpers import new_message, pg_database, raw_sql, relay_cli, running_relay, send, store_url
from helpers.delivery import delivery_config, final, status, submit
from helpers.peers import Zone, sinks

from relay.logstore import IdempotencyKey, LogStore
from relay.model import Suppression
from relay.store import copy as store_copy
from relay.store.schema import metadata

HTML = (
    b"From: app@example.com\r\nSubject: Your order\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n"
    b'<html><body><p>Shipped! <a href="https://shop.example.com/orders/1">Track it</a> or '
    b'<a href="https://shop.example.com/help">get help</a>.</p></body></html>\r\n'
)
# Details the chain must read back identically on PostgreSQL (JSONB reorders keys, keeps numbers
# as numerics): unsorted keys, nesting, Unicode, floats that are not integral, big integers.
AWKWARD = {"zeta": 1, "alpha": {"b": [1, 2.5, "é"], "a": None}, "tiny": 1e-7, "big": 2**62, "pi": math.pi}


@dataclass
class Source:
    url: str
    config: Path  # a relay.toml whose [store] url is the source
    queue_ids: list[str]
    bounced: str  # the queue id of the message with a bounce
    case_id: int


def _toml(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "copy.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[store]\nurl = "{url}"\n')
    return path


async def _report_to_listener(port: int, return_path: str) -> None:
    """An auto-reply to a delivered message's return path: stored as a report."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, local_hostname="mx.example.net")
    await client.connect()
    try:
        await client.ehlo()
        reply = b"Subject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nbye\r\n"
        code, text = await send(client, "", [return_path], reply)
        assert code == 250, text
    finally:
        client.close()


async def build_source(tmp_path: Path, zone: Zone) -> Source:
    """A SQLite store that has seen a bit of everything, written by a Relay that delivered."""
    zone.mx("example.com", (10, "mx.example.com"))
    zone.a("mx.example.com", "127.0.0.2")
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}"
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    async with sinks("127.0.0.2") as (sink,):
        sink.behaviour.rcpt["bad@example.com"] = "550 5.1.1 no such user"
        config = delivery_config(
            tmp_path, zone, sink.port, store={"url": url},
            tracking={"base_url": "https://t.example.com"},
            bounces={"domain": "bounces.example.com", "listen": ["127.0.0.1:0"]},
            webhooks=[{"url": "http://127.0.0.1:9/hook", "secret": [secret]}],  # nothing listens: rows stay
        )  # fmt: skip
        async with running_relay(config, deliver=True) as relay:
            store = relay.store
            assert store is not None
            qids = [await submit(relay, [f"user{i}@example.com", "ann@example.com"]) for i in range(4)]
            qids.append(await submit(relay, ["bob@example.com"], HTML))
            bounced = await submit(relay, ["bad@example.com", "joe@example.com"])
            qids.append(bounced)
            for qid in qids:
                await final(relay, qid)
            assert status(await final(relay, bounced)) == {"bad@example.com": "bounced", "joe@example.com": "delivered"}
            idem = new_message("01KIDEMPOTENT0000000000000", ("late@example.org",), raw=b"Subject: x\r\n\r\nx\r\n")
            await store.enqueue(idem, IdempotencyKey("api:0123456789ab", "order-1", "0" * 64))
            qids.append(idem.queue_id)
            await store.record_engagement(qids[4], "bob@example.com", "opened", {"ip": "192.0.2.9", "machine": False})
            await store.record_engagement(
                qids[4], "bob@example.com", "clicked",
                {"ip": "192.0.2.9", "url": "https://shop.example.com/orders/1", "machine": False},
            )  # fmt: skip
            await store.add_user("alice", "scrypt$x", "admin")
            await store.add_user("sam", "scrypt$y", "support")
            await store.add_user("app", "scrypt$z")
            await store.suppress(Suppression("spam@example.net", "manual", "cli", None, 1.0, None, "asked"), "cli")
            await store.suppress(Suppression("*@gone.example", "manual", "api", None, 2.0, None), "api:x")
            await store.unsuppress("*@gone.example", "came back", "cli", "cli")
            case = await store.open_case(title="Bounce for bad@", customer_ref="T-1", queue_ids=[bounced], actor="sam")
            await store.add_case_entry(case.id, "interaction", {"channel": "email", "summary": "asked"}, actor="sam")
            await store.comment(bounced, "customer says the address is right", by="sam", case_id=case.id)
            await store.audit(actor="alice", ip="192.0.2.1", action="view_body", target=qids[0], details=AWKWARD)
            (joe,) = [m for m in sink.messages if m.rcpts == ["joe@example.com"]]
            await _report_to_listener(relay.bounce_addresses[0].port, joe.mail_from)
    return Source(url, _toml(tmp_path, url), qids, bounced, case.id)


@pytest.fixture
async def source(tmp_path: Path, zone: Zone) -> Source:
    return await build_source(tmp_path, zone)


@pytest.fixture
async def target() -> AsyncIterator[str]:
    async with pg_database() as url:
        yield url


async def copy_cli(src: Source, to: str) -> tuple[int, str, str]:
    return await relay_cli("db", "copy", "--config", str(src.config), "--to", to)


def _rows(conn: sa.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every copied table, row by row in key order, JSON parsed (key order is not content)."""
    out = {}
    for table in store_copy.tables():
        order = list(table.primary_key.columns)
        out[table.name] = [dict(r) for r in conn.execute(sa.select(table).order_by(*order)).mappings()]
    return out


async def _views(store: LogStore, src: Source) -> dict[str, Any]:
    """What the API, console and CLI show, read through the store."""
    views: dict[str, Any] = {}
    views["messages"] = [await store.get_message(qid) for qid in src.queue_ids]
    views["raw"] = [await store.raw_message(qid) for qid in src.queue_ids]
    views["webhooks"] = [await store.message_webhooks(qid) for qid in src.queue_ids]
    views["users"] = await store.list_users()
    views["roles"] = [await store.password_hash(n, ("admin", "support", "smtp")) for n in ("alice", "sam", "app")]
    views["suppressions"] = await store.suppressions(now=2e9)
    views["suppression_audit"] = await store.suppression_audit()
    views["cases"] = await store.cases(sla=3600, now=2e9)
    views["case"] = await store.case(src.case_id, sla=3600, now=2e9)
    views["case_messages"] = await store.case_messages(views["case"])
    views["audit"] = await store.audit_entries(limit=1000)
    views["idempotency"] = await store.idempotency_key("api:0123456789ab", "order-1")
    views["summary"] = await store.queue_summary()
    views["webhook_summary"] = await store.webhook_summary()
    for query in ("to:bad@example.com", "status:bounced", "is:clicked", "tag:welcome", "shipped", "user:app"):
        views[f"search {query}"] = await store.search_messages(query, now=2e9)
    views["stats"] = await store.stats(0, 2e9, "domain")
    return views


async def test_copy_to_postgres_keeps_every_row_view_and_chain(source: Source, target: str, tmp_path: Path) -> None:
    code, out, err = await copy_cli(source, target)
    assert code == 0, out + err
    assert "Stop Relay before copying" in out
    assert "audit verify on the target: ok:" in out
    assert "not copied: nodes" in out
    for name in ("messages", "events", "users", "suppressions", "cases", "audit_log", "link_chunks"):
        assert any(line.split()[:1] == [name] for line in out.splitlines()), (name, out)

    # Row for row, ids included: every copied table holds what the source holds.
    before, after = await raw_sql(source.url, _rows), await raw_sql(target, _rows)
    assert {n for n, rows in before.items() if rows} >= {
        "messages", "bodies", "message_tags", "recipients", "events", "link_chunks", "users", "suppressions",
        "suppression_audit", "bounce_reports", "idempotency_keys", "webhook_deliveries", "cases", "case_messages",
        "case_entries", "audit_log", "chain_heads",
    }  # fmt: skip
    assert after == before

    src, dst = await LogStore.open(source.url), await LogStore.open(target)
    try:
        assert await dst.schema_state() == "current"
        assert await _views(dst, source) == await _views(src, source)
        report = await dst.verify_chains()
        assert report.ok, report.text()
        assert report.heads == (await src.verify_chains()).heads
    finally:
        await src.close()
        await dst.close()

    env = {**os.environ, "RELAY_STORE_URL": target}
    code, out, _ = await _cli_env(env, "audit", "verify")
    assert code == 0
    assert out.startswith("ok:"), out


async def _cli_env(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_new_mail_on_the_copy_gets_fresh_ids_and_is_delivered(
    source: Source, target: str, tmp_path: Path, zone: Zone
) -> None:
    code, out, err = await copy_cli(source, target)
    assert code == 0, out + err
    maxima = await raw_sql(target, _max_ids)
    async with sinks("127.0.0.2") as (sink,):
        config = delivery_config(tmp_path / "pg", zone, sink.port, store={"url": target})
        async with running_relay(config, deliver=True) as relay:
            store = relay.store
            assert store is not None
            qid = await submit(relay, ["new@example.com"])
            msg = await final(relay, qid)
            assert status(msg) == {"new@example.com": "delivered"}
            assert [m.rcpts for m in sink.messages] == [["new@example.com"]]
            case = await store.open_case(title="after the move", queue_ids=[qid], actor="alice")
            await store.add_case_entry(case.id, "interaction", {"channel": "chat", "summary": "hi"}, actor="sam")
            await store.suppress(Suppression("x@example.net", "manual", "cli", None, 3.0, None), "cli")
            assert (await store.verify_chains()).ok  # the chains go on from the copied heads
    fresh = await raw_sql(target, _new_ids(qid, case.id))
    for table, new_id in fresh.items():
        assert new_id > maxima[table], (table, new_id, maxima[table])


def _max_ids(conn: sa.Connection) -> dict[str, int]:
    names = ("recipients", "events", "cases", "case_entries", "audit_log", "suppression_audit")
    return {n: int(conn.scalar(sa.text(f"SELECT max(id) FROM {n}"))) for n in names}


def _new_ids(qid: str, case_id: int) -> Any:
    def read(conn: sa.Connection) -> dict[str, int]:
        one = {
            "recipients": "SELECT min(id) FROM recipients WHERE queue_id = :q",
            "events": "SELECT min(id) FROM events WHERE queue_id = :q",
            "case_entries": "SELECT min(id) FROM case_entries WHERE case_id = :c",
            "audit_log": "SELECT max(id) FROM audit_log",
            "suppression_audit": "SELECT max(id) FROM suppression_audit",
        }
        out = {n: int(conn.scalar(sa.text(sql), {"q": qid, "c": case_id})) for n, sql in one.items()}
        out["cases"] = case_id
        return out

    return read


async def test_copy_to_sqlite_too(source: Source, tmp_path: Path) -> None:
    dest = tmp_path / "moved" / "relay.db"
    dest.parent.mkdir()
    code, out, err = await copy_cli(source, f"sqlite:///{dest}")
    assert code == 0, out + err
    target = f"sqlite+aiosqlite:///{dest}"
    assert await raw_sql(target, _rows) == await raw_sql(source.url, _rows)
    store = await LogStore.open(target)
    try:
        assert (await store.verify_chains()).ok
    finally:
        await store.close()


# -- refusals: one line, exit 2, nothing written


async def _state(url: str) -> tuple[str, dict[str, int]]:
    store = await LogStore.open(url)
    try:
        flight = await store.copy_preflight()
        return flight.state, dict(flight.rows)
    finally:
        await store.close()


async def test_a_target_holding_rows_is_refused_and_left_alone(source: Source, target: str) -> None:
    assert (await copy_cli(source, target))[0] == 0
    before = await raw_sql(target, _rows)
    code, out, err = await copy_cli(source, target)
    assert code == 2
    assert out == ""
    assert "holds rows already" in err
    assert f"messages: {len(source.queue_ids)}" in err
    assert len(err.strip().splitlines()) == 1
    assert await raw_sql(target, _rows) == before


async def test_one_user_in_an_otherwise_empty_target_is_refused(source: Source, target: str) -> None:
    store = await LogStore.open(target)
    try:
        await store.upgrade()
        await store.add_user("early", "scrypt$e", "admin")
    finally:
        await store.close()
    code, _, err = await copy_cli(source, target)
    assert code == 2
    assert "users: 1" in err
    assert (await _state(target))[1] == {"users": 1, "audit_log": 1, "chain_heads": 1}


async def test_the_store_itself_is_refused(source: Source, tmp_path: Path) -> None:
    path = tmp_path / "data" / "relay.db"
    link = tmp_path / "same.db"
    link.symlink_to(path)
    before = await raw_sql(source.url, _rows)
    for to in (source.url, f"sqlite:///{path}", f"sqlite:///{link}"):
        code, _, err = await copy_cli(source, to)
        assert code == 2, err
        assert "names the store itself" in err
    assert await raw_sql(source.url, _rows) == before


@pytest.mark.parametrize(
    ("to", "why"),
    [
        ("mysql://root@127.0.0.1/relay", "expected a postgresql+asyncpg:// or sqlite+aiosqlite:// URL"),
        ("not a url", "expected a postgresql+asyncpg:// or sqlite+aiosqlite:// URL"),
        ("sqlite://", "an in-memory store would keep nothing"),
        ("postgresql+asyncpg://relay:s3cret-pw@127.0.0.1:1/relay", "cannot read the store"),
    ],
)
async def test_bad_target_urls_are_refused(source: Source, to: str, why: str) -> None:
    code, out, err = await copy_cli(source, to)
    assert code == 2, out + err
    assert why in err
    assert len(err.strip().splitlines()) == 1
    assert "s3cret" not in out + err  # a password is never printed


async def test_a_missing_database_is_refused_and_not_created(source: Source) -> None:
    async with pg_database() as existing:
        missing = existing.rsplit("/", 1)[0].replace("postgres@", "postgres:pw-x9@") + "/relay_copy_missing_db"
        code, _, err = await copy_cli(source, missing)
        assert code == 2
        assert "does not exist" in err
        assert "createdb relay_copy_missing_db" in err
        assert "pw-x9" not in err

        def databases(conn: sa.Connection) -> list[str]:
            return list(conn.scalars(sa.text("SELECT datname FROM pg_database")))

        assert "relay_copy_missing_db" not in await raw_sql(existing, databases)


async def test_a_source_behind_the_code_is_refused(source: Source, target: str) -> None:
    older = sa.text("UPDATE alembic_version SET version_num = '0009'")
    await raw_sql(source.url, lambda c: c.execute(older), write=True)
    code, _, err = await copy_cli(source, target)
    assert code == 2
    assert 'relay db upgrade" first' in err
    assert await _state(target) == ("missing", {})


async def test_a_missing_source_is_refused(tmp_path: Path, target: str) -> None:
    config = _toml(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'nothing.db'}")
    code, _, err = await relay_cli("db", "copy", "--config", str(config), "--to", target)
    assert code == 2
    assert "no store at" in err
    assert not (tmp_path / "nothing.db").exists()


async def test_a_row_postgres_cannot_hold_rolls_back_everything(source: Source, target: str) -> None:
    """SQLite keeps a NUL in text, PostgreSQL refuses it: the copy fails naming the table and
    the row, and the target is left as it was, without even the schema."""
    await raw_sql(
        source.url,
        lambda c: c.execute(sa.text("UPDATE users SET password_hash = 'a' || char(0) || 'b' WHERE name = 'sam'")),
        write=True,
    )
    code, _, err = await copy_cli(source, target)
    assert code == 1
    assert "cannot copy users (name 'sam')" in err, err
    assert await _state(target) == ("missing", {})


def test_every_table_is_copied_or_skipped_for_a_reason() -> None:
    copied = {t.name for t in store_copy.tables()}
    assert copied | set(store_copy.SKIPPED) == set(metadata.tables)
    assert not copied & set(store_copy.SKIPPED)
    assert json.dumps(store_copy.SKIPPED)  # each skip says why (printed by the command)


async def test_postgres_source_is_refused(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        url = await store_url("postgres", tmp_path / "x.db", stack)
        code, _, err = await relay_cli("db", "copy", "--config", str(_toml(tmp_path, url)), "--to", "sqlite:///x.db")
        assert code == 2
        assert "only a SQLite store is copied" in err


async def test_a_database_of_another_application_is_refused(source: Source, target: str) -> None:
    await raw_sql(target, lambda c: c.execute(sa.text("CREATE TABLE users (id int)")), write=True)
    code, _, err = await copy_cli(source, target)
    assert code == 2
    assert "holds other tables (users)" in err

    def tables(conn: sa.Connection) -> list[str]:
        return sa.inspect(conn).get_table_names()

    assert await raw_sql(target, tables) == ["users"]


async def test_the_copy_reads_one_snapshot_while_the_source_is_written(source: Source, target: str) -> None:
    """Relay may go on writing while the copy runs: the target gets the snapshot taken when the
    copy started, never a mix (a user added and an event deleted meanwhile are not seen)."""
    import sqlite3

    path = source.url.removeprefix("sqlite+aiosqlite:///")
    written: list[str] = []

    def progress(table: str, done: int, total: int) -> None:
        if table == "messages" and not written:  # users and events are copied after messages
            db = sqlite3.connect(path)
            try:
                with db:
                    db.execute("INSERT INTO users VALUES ('late', 'scrypt$l', 5.0, 'smtp')")
                    db.execute("DELETE FROM events WHERE id = (SELECT max(id) FROM events)")
            finally:
                db.close()
            written.append(table)

    before = await raw_sql(source.url, _rows)
    store = await LogStore.open(target)
    try:
        copied = await store.copy_from(source.url, progress)
        assert written
        assert await store.copy_counts() == copied.source == copied.written
        assert "late" not in {u.name for u in await store.list_users()}
    finally:
        await store.close()
    assert await raw_sql(target, _rows) == before
    assert len((await raw_sql(source.url, _rows))["events"]) == len(before["events"]) - 1  # it did change
