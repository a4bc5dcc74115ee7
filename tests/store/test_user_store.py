"""SMTP AUTH users in the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import store_fixtures

from relay.errors import Conflict, NotFound
from relay.logstore import LogStore

store, url = store_fixtures.store, store_fixtures.url  # the fixtures, on both backends


async def test_users(store: LogStore) -> None:
    await store.add_user("app", "scrypt$hash")
    with pytest.raises(Conflict):
        await store.add_user("app", "other")
    assert [u.name for u in await store.list_users()] == ["app"]
    assert await store.password_hash("app") == "scrypt$hash"
    await store.remove_user("app")
    with pytest.raises(NotFound):
        await store.remove_user("app")
    assert await store.password_hash("app") is None
