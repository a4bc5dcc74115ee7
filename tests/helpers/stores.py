"""The two fixtures most store tests share: a fresh store's URL on each backend (SQLite and
PostgreSQL), and a store there migrated to the newest schema. A test module takes them with
``from helpers.stores import store, url``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from helpers import store_url
from relay.logstore import LogStore


@pytest.fixture(params=["sqlite", "postgres"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty store's URL, on each backend."""
    async with AsyncExitStack() as stack:
        yield await store_url(request.param, tmp_path / "relay.db", stack)


@pytest.fixture
async def store(url: str) -> AsyncIterator[LogStore]:
    """A store at ``url``, migrated to the newest schema."""
    s = await LogStore.open(url)
    try:
        await s.upgrade()
        yield s
    finally:
        await s.close()
