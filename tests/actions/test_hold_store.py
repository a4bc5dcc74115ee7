"""Hold mode in the store, on SQLite and PostgreSQL: held recipients are never due, nothing
that assumes the queue is due or leased mistakes them, and release / discard end the hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import action_fixtures
import pytest
from action_fixtures import audit_lines, events, hold_all, hold_users, message, open_store, states, view

from relay.logstore import LogStore

url = action_fixtures.url


@pytest.fixture
async def held_store(url: str) -> AsyncIterator[LogStore]:
    s = await open_store(url, delivery=hold_all())
    try:
        yield s
    finally:
        await s.close()


async def test_held_mail_is_kept_and_never_due(held_store: LogStore, url: str) -> None:
    store = held_store
    await store.enqueue(message("01HELD1", ("a@example.com", "b@example.net")))
    assert await states(url) == {
        ("01HELD1", "a@example.com"): ("held", None),
        ("01HELD1", "b@example.net"): ("held", None),
    }
    v = await view(store, "01HELD1")
    assert [e.type for e in v.events] == ["received", "held", "held"]
    assert all(e["by"] == "hold" for e in events(v, "held"))
    later = time.time() + 10 * 86400
    assert await store.claim_due("w", lease=60, now=later) == []
    assert not await store.anything_due(now=later)
    summary = await store.queue_summary()
    assert summary.counts["held"] == 2
    assert summary.oldest_queued_at is None
    assert [e.state for e in await store.queue_list(state="held")] == ["held", "held"]
    # retry never releases held mail, silently or otherwise
    assert await store.retry("01HELD1") == 0
    assert await store.retry(None) == 0
    assert {s for s, _ in (await states(url)).values()} == {"held"}


async def test_release_makes_held_recipients_due_once(held_store: LogStore, url: str) -> None:
    store = held_store
    await store.enqueue(message("01REL1", ("a@example.com", "b@example.net")))
    woken: list[str] = []
    store.on_due.append(lambda: woken.append("due"))
    assert await store.release("01REL1", by="sam", ip="10.0.0.7") == 2
    assert woken == ["due"]  # delivery is woken after the commit
    assert await store.release("01REL1", by="sam") == 0  # nothing held any more
    assert woken == ["due"]
    claimed = await store.claim_due("w", lease=60, now=time.time() + 1)
    assert {c.address for c in claimed} == {"a@example.com", "b@example.net"}
    released = events(await view(store, "01REL1"), "released")
    assert {e["recipient"] for e in released} == {"a@example.com", "b@example.net"}
    assert [x.details["count"] for x in await audit_lines(store, "action.release")] == [0, 2]


async def test_release_from_a_case_makes_its_recipients_targets(held_store: LogStore, url: str) -> None:
    store = held_store
    await store.enqueue(message("01RELC", ("a@example.com",)))
    case = await store.open_case(title="staging check", queue_ids=["01RELC"], actor="sam")
    assert await store.release("01RELC", by="sam", case_id=case.id) == 1
    assert len(await action_fixtures.targets(url)) == 1


async def test_discard_ends_held_mail_as_cancelled(held_store: LogStore, url: str) -> None:
    store = held_store
    await store.enqueue(message("01DIS1", ("a@example.com",)))
    assert await store.discard("01DIS1", by="sam") == 1
    assert await states(url) == {("01DIS1", "a@example.com"): ("cancelled", None)}
    (ev,) = events(await view(store, "01DIS1"), "cancelled")
    assert ev["discarded"] is True
    assert ev["by"] == "sam"
    assert await store.discard("01DIS1", by="sam") == 0
    assert await store.release("01DIS1", by="sam") == 0  # a discarded message cannot come back


async def test_discard_leaves_mail_that_is_not_held(url: str) -> None:
    store = await open_store(url)
    try:
        await store.enqueue(message("01NOTH", ("a@example.com",)))
        assert await store.discard("01NOTH", by="sam") == 0
        assert (await states(url))[("01NOTH", "a@example.com")][0] == "queued"
    finally:
        await store.close()


async def test_cancel_ends_held_mail_too(held_store: LogStore, url: str) -> None:
    await held_store.enqueue(message("01CAN1", ("a@example.com",)))
    assert await held_store.cancel("01CAN1", by="sam") == 1
    assert (await states(url))[("01CAN1", "a@example.com")][0] == "cancelled"


async def test_hold_users_holds_only_their_mail(url: str) -> None:
    store = await open_store(url, delivery=hold_users("staging-app", "api:0123456789ab"))
    try:
        await store.enqueue(message("01U1", user="staging-app"))
        await store.enqueue(message("01U2", user="prod-app"))
        await store.enqueue(message("01U3", user=None))
        await store.enqueue(message("01U4", user="api:0123456789ab"))
        got = {q: s for (q, _), (s, _) in (await states(url)).items()}
        assert got == {"01U1": "held", "01U2": "queued", "01U3": "queued", "01U4": "held"}
        assert events(await view(store, "01U1"), "held")[0]["by"] == "hold_users"
    finally:
        await store.close()


async def test_resend_of_held_users_mail_is_held_too(url: str) -> None:
    store = await open_store(url, delivery=hold_users("staging-app"))
    try:
        await store.enqueue(message("01RH1", ("a@example.com",), user="staging-app"))
        new_id = await store.resend("01RH1", "a@example.com", "b@example.com", by="sam")
        assert (await states(url))[(new_id, "b@example.com")] == ("held", None)
    finally:
        await store.close()


async def test_release_and_discard_at_once_one_wins(url: str) -> None:
    # two stores: two processes (or nodes) acting on the same held message at the same moment
    first, second = await open_store(url, delivery=hold_all()), await open_store(url)
    try:
        for i in range(5):
            await first.enqueue(message(f"01RACE{i}", ("a@example.com", "b@example.com")))
        for i in range(5):
            released, discarded = await asyncio.gather(
                first.release(f"01RACE{i}", by="sam"), second.discard(f"01RACE{i}", by="kim")
            )
            assert sorted((released, discarded)) == [0, 2]
            got = {s for (q, _), (s, _) in (await states(url)).items() if q == f"01RACE{i}"}
            assert got == ({"queued"} if released else {"cancelled"})
    finally:
        await first.close()
        await second.close()
