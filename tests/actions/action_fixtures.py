"""What the support actions' tests share: a fresh store on SQLite and PostgreSQL (optionally in
hold mode, or with a webhook endpoint), messages in it, and reads from outside the store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import new_message, raw_sql, stores

from relay.config import DeliveryConfig, WebhookConfig
from relay.logstore import LogStore
from relay.model import AuditEntry, MessageView, Outcome

message = new_message
url = stores.url  # the fixture: a fresh store's URL on each backend


async def open_store(url: str, **kw: Any) -> LogStore:
    s = await LogStore.open(url, **kw)
    await s.upgrade()
    return s


@pytest.fixture
async def store(url: str) -> AsyncIterator[LogStore]:
    s = await open_store(url, webhooks=[WebhookConfig(url="http://hooks.example.test/in")])
    try:
        yield s
    finally:
        await s.close()


def hold_all() -> DeliveryConfig:
    return DeliveryConfig(hold=True)


def hold_users(*users: str) -> DeliveryConfig:
    return DeliveryConfig(hold_users=users)


async def view(store: LogStore, qid: str) -> MessageView:
    found = await store.get_message(qid)
    assert found is not None
    return found


def events(v: MessageView, kind: str) -> list[dict[str, Any]]:
    return [dict(e.details, recipient=e.recipient) for e in v.events if e.type == kind]


async def audit_lines(store: LogStore, action: str | None = None) -> list[AuditEntry]:
    lines, _ = await store.audit_entries(limit=500, action=action)
    return lines


async def bounce(store: LogStore, qid: str) -> None:
    """Every recipient of the message bounced by a (pretend) attempt."""
    now = time.time()
    claimed = [c for c in await store.claim_due("w", lease=60, limit=100, now=now + 1) if c.queue_id == qid]
    assert claimed
    await store.record(
        "w",
        [
            Outcome(c.recipient_id, qid, c.address, "bounced", 1, None, "550 5.1.1 no such user", "bounced",
                    {"code": 550, "reason": "bad_mailbox", "hard": True}, now + 1)
            for c in claimed
        ],
    )  # fmt: skip


async def count_rows(url: str, table: str) -> int:
    return int(await raw_sql(url, lambda c: c.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()))


async def snapshot(url: str) -> dict[str, int]:
    """Row counts of everything an action writes: a refused action changes none."""
    tables = ("messages", "recipients", "events", "audit_log", "case_entries", "case_targets", "case_messages",
              "suppressions", "suppression_audit", "webhook_deliveries")  # fmt: skip
    return {t: await count_rows(url, t) for t in tables}


async def states(url: str) -> dict[tuple[str, str], tuple[str, Any]]:
    rows = await raw_sql(
        url, lambda c: c.execute(sa.text("SELECT queue_id, address, status, next_attempt_at FROM recipients")).all()
    )
    return {(r.queue_id, r.address): (r.status, r.next_attempt_at) for r in rows}


async def targets(url: str) -> set[tuple[int, int, str]]:
    rows = await raw_sql(
        url, lambda c: c.execute(sa.text("SELECT case_id, recipient_id, queue_id FROM case_targets")).all()
    )
    return {(int(r.case_id), int(r.recipient_id), r.queue_id) for r in rows}


async def recipient_id(url: str, qid: str, address: str) -> int:
    def read(c: Any) -> int:
        q = sa.text("SELECT id FROM recipients WHERE queue_id = :q AND address = :a")
        return int(c.execute(q, {"q": qid, "a": address}).scalar_one())

    return await raw_sql(url, read)


Reader = Callable[[Any], Any]
