"""What the store's tests share: a fresh store on SQLite and PostgreSQL, and a message to put in it."""

from __future__ import annotations

import time

import sqlalchemy as sa
from helpers import new_message, raw_sql, stores

from relay.model import Outcome

store, url = stores.store, stores.url  # the fixtures, on both backends
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
