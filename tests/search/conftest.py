"""What the search tests share: a store on SQLite and PostgreSQL, seeded with one message per
case the grammar distinguishes (``SEED``: letter -> message), at known times around ``NOW``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from helpers import new_message, store_url

from relay.logstore import LogStore
from relay.model import EventView, Imported

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
HOUR, DAY = 3600.0, 86400.0


def qid(letter: str) -> str:
    return f"01SEARCH{letter.upper()}" + "0" * (26 - 9)


def _item(
    letter: str,
    rcpts: tuple[tuple[str, str], ...],  # (address, state)
    *,
    at: float,
    subject: str = "Hello",
    tags: tuple[str, ...] = ("welcome",),
    user: str | None = "app",
    mail_from: str = "app@example.com",
    message_id: str | None = None,
    events: tuple[tuple[str, str, dict[str, object]], ...] = (),  # (type, recipient, details)
) -> list[Imported]:
    msg = new_message(
        qid(letter), tuple(a for a, _ in rcpts), at=at, subject=subject, tags=tags, user=user, mail_from=mail_from,
        message_id=message_id or f"{letter}@app.example",
    )  # fmt: skip
    evs = (EventView(at, "received", None, {}), *(EventView(at + 5, t, r, d) for t, r, d in events))
    # bulk_import gives every recipient one state: one Imported per state, same message.
    states = sorted({s for _, s in rcpts})
    if len(states) == 1:
        next_at = NOW + HOUR if states[0] in ("queued", "deferred") else None  # held: never due
        return [Imported(msg, states[0], 1, next_at, "250 ok", evs)]
    raise AssertionError("one state per message in the seed")


SEED: dict[str, list[Imported]] = {
    # a bounce to jane, user unknown; an invoice, two days old
    "a": _item("a", (("jane@example.com", "bounced"),), at=NOW - 2 * DAY, subject="Your invoice 100%",
               tags=("invoice",), mail_from="billing@shop.example",
               events=(("bounced", "jane@example.com", {"reason": "userunknown", "code": 550}),)),
    # delivered to two, opened and clicked: a password reset, an hour ago
    "b": _item("b", (("bob@example.org", "delivered"), ("carol@example.com", "delivered")), at=NOW - HOUR,
               subject="Password reset for Bob", message_id="reset.b@app.example",
               events=(("delivered", "bob@example.org", {}), ("opened", "bob@example.org", {"machine": False}),
                       ("clicked", "bob@example.org", {"url": "u"}))),
    # deferred (rate limited), ten days old, another user
    "c": _item("c", (("dave@other.test", "deferred"),), at=NOW - 10 * DAY, subject="Receipt_2", tags=("invoice",),
               user="web", events=(("deferred", "dave@other.test", {"reason": "ratelimited", "code": 451}),)),
    # suppressed, no tag, received yesterday; no user
    "d": _item("d", (("erin@example.com", "suppressed"),), at=NOW - 20 * HOUR, subject="Hi there", tags=(),
               user=None, events=(("suppressed", "erin@example.com", {"reason": "suppressed"}),)),
    # delivered then complained, three hours ago
    "e": _item("e", (("frank@example.com", "delivered"),), at=NOW - 3 * HOUR, subject="Weekly news",
               events=(("delivered", "frank@example.com", {}),
                       ("complained", "frank@example.com", {"reason": "feedback"}))),
    # delivered to jane too, half an hour ago; machine open only
    "f": _item("f", (("Jane@Example.com", "delivered"),), at=NOW - 1800, subject="Password reset",
               events=(("delivered", "Jane@Example.com", {}), ("opened", "Jane@Example.com", {"machine": True}))),
    # held, a user_name with an underscore, just now
    "g": _item("g", (("x_y@example.net", "held"),), at=NOW - 60, subject="50% off", tags=("promo",)),
}  # fmt: skip


async def seeded_store(kind: str, tmp_path: Path, stack: AsyncExitStack) -> LogStore:
    url = await store_url(kind, tmp_path / "relay.db", stack)
    store = await LogStore.open(url)
    stack.push_async_callback(store.close)
    await store.upgrade()
    await store.bulk_import([i for items in SEED.values() for i in items])
    return store


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogStore]:
    async with AsyncExitStack() as stack:
        yield await seeded_store(request.param, tmp_path, stack)
