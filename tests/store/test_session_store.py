"""Console sessions in the store, on SQLite and PostgreSQL: the token is never stored, idle
sessions end, the user's current role counts, and seen_at moves at most once a minute."""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
import store_fixtures
from helpers import raw_sql

from relay.logstore import LogStore
from relay.store.schema import console_sessions

store, url = store_fixtures.store, store_fixtures.url  # the fixtures, on both backends
IDLE = 3600.0


async def test_sessions(store: LogStore, url: str) -> None:
    await store.add_user("sam", "scrypt$x", "support")
    await store.add_user("app", "scrypt$y", "smtp")
    token, made = await store.session_create("sam", "127.0.0.1", idle=IDLE, now=1000.0)
    assert len(token) >= 43
    assert made.id == hashlib.sha256(token.encode()).hexdigest()
    stored = await raw_sql(url, lambda c: c.execute(sa.select(console_sessions)).all())
    assert [r.id for r in stored] == [made.id]
    assert token not in repr(stored)  # only its hash is kept

    found = await store.session_get(token, idle=IDLE, now=1000.0 + IDLE - 1)
    assert found is not None
    assert (found.username, found.role, found.csrf) == ("sam", "support", made.csrf)
    assert await store.session_get(token, idle=IDLE, now=1000.0 + IDLE) is None  # idle too long
    assert await store.session_get(token + "x", idle=IDLE, now=1000.0) is None
    assert await store.session_get("", idle=IDLE, now=1000.0) is None

    assert not await store.session_touch(made.id, now=1030.0)  # less than a minute: no write
    assert await store.session_touch(made.id, now=1061.0)
    again = await store.session_get(token, idle=IDLE, now=1061.0 + IDLE - 1)
    assert again is not None
    assert again.seen_at == 1061.0

    # an SMTP user has no session, whatever the table says; a removed user neither
    smtp_token, _ = await store.session_create("app", "127.0.0.1", idle=IDLE, now=1100.0)
    assert await store.session_get(smtp_token, idle=IDLE, now=1100.0) is None
    await store.remove_user("sam")
    assert await store.session_get(token, idle=IDLE, now=1100.0) is None


async def test_delete_and_idle_cleanup(store: LogStore) -> None:
    await store.add_user("ada", "scrypt$x", "admin")
    old, first = await store.session_create("ada", "10.0.0.1", idle=IDLE, now=1000.0)
    other, second = await store.session_create("ada", "10.0.0.2", idle=IDLE, now=1001.0)
    assert await store.session_delete(first.id)
    assert not await store.session_delete(first.id)
    assert await store.session_get(old, idle=IDLE, now=1002.0) is None
    assert await store.session_get(other, idle=IDLE, now=1002.0) is not None
    # a new sign-in long after removes sessions idle past the limit
    fresh, _ = await store.session_create("ada", "10.0.0.3", idle=IDLE, now=1001.0 + 2 * IDLE)
    assert await store.session_delete(second.id) is False
    assert await store.session_delete_user("ada") == 1
    assert await store.session_get(fresh, idle=IDLE, now=1001.0 + 2 * IDLE) is None
