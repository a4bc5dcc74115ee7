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


async def test_roles_and_the_audit_of_adding_and_removing(store: LogStore) -> None:
    """A console user's hash is found only for console roles, an SMTP user's only for smtp;
    adding and removing write their audit line in the same transaction, a refused one none."""
    await store.add_user("ann", "scrypt$a", "support", actor="ada", ip="192.0.2.1")
    await store.add_user("app", "scrypt$b")
    assert await store.password_hash("ann") is None  # SMTP AUTH asks for role smtp only
    assert await store.password_hash("ann", ("viewer", "support", "admin")) == "scrypt$a"
    assert await store.password_hash("app", ("viewer", "support", "admin")) is None
    assert {(u.name, u.role) for u in await store.list_users()} == {("ann", "support"), ("app", "smtp")}
    with pytest.raises(Conflict):
        await store.add_user("ann", "scrypt$c", "admin", actor="mallory")
    await store.remove_user("ann", actor="ada", ip="192.0.2.1")
    with pytest.raises(NotFound):
        await store.remove_user("ann", actor="mallory")
    lines, _ = await store.audit_entries(limit=10)
    assert [(e.action, e.actor, e.target, e.details.get("role")) for e in reversed(lines)] == [
        ("user.add", "ada", "ann", "support"),
        ("user.add", "cli", "app", "smtp"),
        ("user.remove", "ada", "ann", "support"),
    ]
    assert (await store.verify_chains()).ok
