"""Seeding for the retention tests: messages in any state at any time in the past (bulk import,
no delivery), webhook outbox rows and audit lines planted directly, and row counts per table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from helpers import new_message, raw_sql
from relay.logstore import LogStore
from relay.model import ACTIVE_STATES, EventView, Imported

DAY = 86400.0
NOW = 1_900_000_000.0  # "now" for every pass in these tests: rows are dated relative to it
TABLES = ("messages", "bodies", "message_tags", "recipients", "events", "link_chunks", "bounce_reports",
          "idempotency_keys", "webhook_deliveries", "audit_log")  # fmt: skip


def qid(n: int, prefix: str = "01RET") -> str:
    """A queue id of 26 characters (the console's pattern)."""
    return f"{prefix}{n:0{26 - len(prefix)}d}"


async def seed(
    store: LogStore,
    queue_id: str,
    status: str,
    *,
    age: float,
    rcpts: Sequence[str] = ("jane@example.com",),
    links: Sequence[str] = ("https://example.org/reset?token=secret",),
    raw: bytes | None = None,
) -> bytes:
    """A message received ``age`` seconds before NOW whose recipients are all ``status``, last
    changed then too; returns its body."""
    at = NOW - age
    body = raw if raw is not None else f"Subject: Reset {queue_id}\r\n\r\nhttps://example.org/reset\r\n".encode()
    msg = new_message(queue_id, tuple(rcpts), at=at, raw=body, links=tuple(links), track="clicks" if links else "")
    events = [EventView(at, "received", None, {"client_ip": "127.0.0.1"})]
    if status not in ACTIVE_STATES:
        events += [EventView(at + 1, status, r, {"attempt": 1, "code": 250}) for r in rcpts]  # type: ignore[arg-type]
    next_at = at + 3600 if status in ("queued", "deferred", "sending") else None
    await store.bulk_import([Imported(msg, status, 1, next_at, "250 ok", tuple(events))])
    return body


async def counts(url: str, queue_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Rows per table (of these messages only, where a table has a queue id)."""

    def read(conn: Connection) -> dict[str, int]:
        out = {}
        for table in TABLES:
            where = ""
            if queue_ids is not None and table not in ("webhook_deliveries", "audit_log"):
                where = " WHERE queue_id IN (" + ",".join(f"'{q}'" for q in queue_ids) + ")"
            out[table] = int(conn.execute(sa.text(f"SELECT count(*) FROM {table}{where}")).scalar_one())
        return out

    return await raw_sql(url, read)


async def sql(url: str, *statements: str, **params: Any) -> None:
    def run(conn: Connection) -> None:
        for s in statements:
            conn.execute(sa.text(s), params)

    await raw_sql(url, run, write=True)


async def webhook_row(url: str, status: str, *, age: float, body: bytes = b'{"type":"message.delivered"}') -> None:
    """An outbox row in ``status``, last changed ``age`` seconds before NOW."""
    at = NOW - age
    await sql(
        url,
        "INSERT INTO webhook_deliveries (webhook_id, url, type, event_at, body, status, attempts, created_at,"
        " updated_at, next_attempt_at) VALUES (:wid, 'http://hooks.example/x', 'message.delivered', :at, :body,"
        " :status, 1, :at, :at, :next_at)",
        wid=f"msg_{status}_{age}", at=at, body=body, status=status, next_at=at + 60 if status == "pending" else None,
    )  # fmt: skip
