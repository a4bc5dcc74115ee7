"""What the store's tests share: a fresh store on SQLite and PostgreSQL, and a message to put in it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import raw_sql, store_url

from relay.logstore import LogStore
from relay.model import NewMessage, Outcome


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


def message(
    qid: str, rcpts: tuple[str, ...] = ("jane@example.com",), *, at: float | None = None, **kw: object
) -> NewMessage:
    fields: dict[str, object] = {
        "queue_id": qid,
        "message_id": f"{qid.lower()}@app.example",
        "mail_from": "app@example.com",
        "recipients": rcpts,
        "subject": "Hello",
        "tags": ("welcome",),
        "user": "app",
        "client_ip": "127.0.0.1",
        "received_at": time.time() if at is None else at,
        "raw": b"Subject: Hello\r\n\r\nbody\r\n",
        "details": {"client_ip": "127.0.0.1"},
    }
    fields.update(kw)
    return NewMessage(**fields)  # type: ignore[arg-type]


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
