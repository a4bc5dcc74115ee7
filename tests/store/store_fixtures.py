"""What the store's tests share: a fresh store on SQLite and PostgreSQL, and a message to put in it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import new_message, raw_sql, store_url

from relay.logstore import LogStore
from relay.model import Outcome


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


message = new_message  # the store tests' name for it


def outcome(
    c_id: int, qid: str, address: str, status: str, *, attempts: int = 1, next_at: float | None = None
) -> Outcome:
    event = "delivered" if status == "delivered" else "deferred"
    return Outcome(
        recipient_id=c_id, queue_id=qid, address=address, status=status, attempts=attempts,
        next_attempt_at=next_at, last_response="250 2.0.0 ok", event=event,
        details={"attempt": attempts, "code": 250}, at=time.time(),
    )  # fmt: skip


async def recipient_ids(url: str) -> dict[str, int]:
    """Queue id -> the id of its (last) recipient row, read from outside the store."""
    rows = await raw_sql(url, lambda c: c.execute(sa.text("SELECT queue_id, id FROM recipients")).all())
    return {r.queue_id: r.id for r in rows}
