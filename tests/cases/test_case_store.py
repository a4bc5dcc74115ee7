"""Cases in the store, on SQLite and PostgreSQL: opening over messages (the incident summary),
entries and states, record_action inside another transaction, closing, the lists' filters, the
counts, and the automatic confirmation (once, even when two stores race for it)."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import new_message

from relay.errors import Conflict, NotFound
from relay.logstore import LogStore
from relay.model import CaseEntry, Outcome
from relay.store import cases as case_store
from relay.store.engine import Engine

DAY = 86400.0


async def bounced_message(store: LogStore, qid: str, rcpts: tuple[str, ...] = ("jane@example.com",)) -> list[int]:
    """A message whose recipients bounced (550 user unknown): their recipient ids."""
    await store.enqueue(new_message(qid, rcpts))
    claimed = await store.claim_due("w1", lease=60)
    mine = [c for c in claimed if c.queue_id == qid]
    await store.record("w1", [
        Outcome(recipient_id=c.recipient_id, queue_id=qid, address=c.address, status="bounced", attempts=1,
                next_attempt_at=None, last_response="550 5.1.1 user unknown", event="bounced",
                details={"attempt": 1, "code": 550, "reason": "bad_mailbox", "rule": "5.1.1"}, at=time.time())
        for c in mine
    ])  # fmt: skip
    return [c.recipient_id for c in mine]


async def deliver(store: LogStore, qid: str, at: float) -> None:
    """Retry the message and deliver every recipient the claim hands out (at ``at``)."""
    await store.retry(qid, by="test")
    claimed = [c for c in await store.claim_due("w2", lease=60) if c.queue_id == qid]
    await store.record("w2", [
        Outcome(recipient_id=c.recipient_id, queue_id=qid, address=c.address, status="delivered", attempts=2,
                next_attempt_at=None, last_response="250 ok", event="delivered", details={"attempt": 2}, at=at)
        for c in claimed
    ])  # fmt: skip


async def action(url: str, case_id: int, targets: list[tuple[int, str]], qid: str) -> CaseEntry:
    """What a support action with a case does: record_action inside the action's own transaction
    (here, through an engine of its own on the same store)."""
    at = time.time()
    engine = Engine(url)
    try:
        return await engine.call(
            lambda conn: case_store.record_action(
                conn, case_id, actor="sam", ip="192.0.2.9", details={"action": "retry", "queue_id": qid, "count": 1},
                targets=targets, at=at,
            )
        )  # fmt: skip
    finally:
        await engine.dispose()


async def test_open_over_messages_writes_the_incident(store: LogStore) -> None:
    await bounced_message(store, "Q1", ("jane@example.com", "joe@example.com"))
    case = await store.open_case(title="Invoice not received", customer_ref="T-1", owner="sam",
                                 queue_ids=["Q1", "Q1"], actor="ann", ip="192.0.2.1")  # fmt: skip
    assert case.state == "open"
    assert case.queue_ids == ("Q1",)
    full = await store.case(case.id, sla=DAY)
    assert full is not None
    (incident,) = full.entries
    assert incident.kind == "incident"
    summary = incident.details["summary"]
    assert "Q1 to jane@example.com: bounced; last response: 550 5.1.1 user unknown; reason: bad_mailbox" in summary
    assert "joe@example.com" in summary
    audit, _ = await store.audit_entries()
    assert [a.action for a in audit] == ["case.entry", "case.open"]
    assert audit[0].target == f"case:{case.id}"
    assert audit[0].details["entry_hash"] == incident.hash


async def test_open_refuses_unknown_messages_and_bad_fields(store: LogStore) -> None:
    with pytest.raises(ValueError, match="no message NOPE"):
        await store.open_case(title="x", queue_ids=["NOPE"], actor="ann")
    with pytest.raises(ValueError, match="title is required"):
        await store.open_case(title="  ", actor="ann")
    with pytest.raises(ValueError, match="NUL"):
        await store.open_case(title="a\x00b", actor="ann")
    with pytest.raises(ValueError, match="longer than"):
        await store.open_case(title="x" * 201, actor="ann")
    assert (await store.cases(sla=DAY))[0] == []
    assert (await store.verify_chains()).counts == {"audit": 0, "cases": 0}


async def test_entries_move_the_state(store: LogStore, url: str) -> None:
    case = await store.open_case(title="t", actor="ann", incident="it broke")
    add = store.add_case_entry
    await add(case.id, "interaction", {"channel": "email", "summary": "wrote to the customer"}, actor="ann")
    assert (await store.case(case.id, sla=DAY)).state == "open"  # type: ignore[union-attr]
    await add(case.id, "escalation", {"to": "mail team", "why": "their MX"}, actor="ann")
    assert (await store.case(case.id, sla=DAY)).state == "escalated"  # type: ignore[union-attr]
    await action(url, case.id, [], "Q0")
    assert (await store.case(case.id, sla=DAY)).state == "action_taken"  # type: ignore[union-attr]
    await add(case.id, "resolution", {"summary": "fixed the address"}, actor="ann")
    await add(case.id, "confirmation", {"how": "customer called back"}, actor="ann")
    full = await store.case(case.id, sla=DAY)
    assert full is not None
    assert full.state == "confirmed"
    assert full.queue_ids == ("Q0",)  # linked by the action
    with pytest.raises(Conflict):
        await add(case.id, "interaction", {"channel": "chat", "summary": "again"}, actor="ann")
    with pytest.raises(Conflict):
        await action(url, case.id, [], "Q0")
    await add(case.id, "feedback", {"score": 5, "comment": "great"}, actor="ann")
    full = await store.case(case.id, sla=DAY)
    assert full is not None
    assert full.state == "confirmed"
    assert [e.kind for e in full.entries] == [
        "incident", "interaction", "escalation", "action", "resolution", "confirmation", "feedback",
    ]  # fmt: skip
    assert (await store.verify_chains()).ok


async def test_bad_entries(store: LogStore, url: str) -> None:
    case = await store.open_case(title="t", actor="ann")
    add = store.add_case_entry
    with pytest.raises(ValueError, match="channel"):
        await add(case.id, "interaction", {"channel": "fax", "summary": "x"}, actor="ann")
    with pytest.raises(ValueError, match="score"):
        await add(case.id, "feedback", {"score": 6}, actor="ann")
    with pytest.raises(ValueError, match="actions"):
        await add(case.id, "action", {"action": "retry"}, actor="ann")
    with pytest.raises(ValueError, match="NUL"):
        await add(case.id, "resolution", {"summary": "a\x00"}, actor="ann")
    with pytest.raises(NotFound):
        await add(case.id + 100, "resolution", {"summary": "a"}, actor="ann")
    with pytest.raises(NotFound):
        await action(url, case.id + 100, [], "Q0")
    assert (await store.case(case.id, sla=DAY)).entries == ()  # type: ignore[union-attr]


async def test_close(store: LogStore) -> None:
    case = await store.open_case(title="t", actor="ann")
    with pytest.raises(ValueError, match="reason"):
        await store.close_case(case.id, " ", actor="ann")
    closed = await store.close_case(case.id, "customer unreachable", actor="ann", ip="192.0.2.1")
    assert (closed.state, closed.closed_reason) == ("closed_unresolved", "customer unreachable")
    with pytest.raises(Conflict):
        await store.close_case(case.id, "again", actor="ann")
    with pytest.raises(Conflict):
        await store.add_case_entry(case.id, "resolution", {"summary": "x"}, actor="ann")
    await store.add_case_entry(case.id, "feedback", {"score": 1, "comment": ""}, actor="ann")
    audit, _ = await store.audit_entries(action="case.close")
    assert audit[0].details == {"reason": "customer unreachable"}


async def test_lists_and_counts(store: LogStore) -> None:
    await bounced_message(store, "Q1")
    now = time.time()
    a = await store.open_case(title="a", owner="sam", queue_ids=["Q1"], actor="ann", now=now - 2 * DAY)
    b = await store.open_case(title="b", owner="kim", actor="ann")
    c = await store.open_case(title="c", owner="sam", actor="ann", now=now - 3 * DAY)
    await store.add_case_entry(b.id, "escalation", {"to": "x", "why": "y"}, actor="ann")
    await store.add_case_entry(b.id, "resolution", {"summary": "z"}, actor="ann")
    await store.close_case(c.id, "gone", actor="ann")

    async def ids(**kw: object) -> list[int]:
        found, _ = await store.cases(sla=DAY, **kw)  # type: ignore[arg-type]
        return [x.id for x in found]

    assert await ids() == [c.id, b.id, a.id]
    assert await ids(owner="sam") == [c.id, a.id]
    assert await ids(state="resolved") == [b.id]
    assert await ids(overdue=True) == [a.id]  # c is old too, but closed
    assert await ids(overdue=False) == [c.id, b.id]
    assert await ids(escalated=True) == [b.id]  # escalated once, resolved since
    assert await ids(queue_id="Q1") == [a.id]
    first, more = await store.cases(sla=DAY, limit=2)
    assert [x.id for x in first] == [c.id, b.id]
    assert more == b.id
    rest, more = await store.cases(sla=DAY, limit=2, before=more)
    assert [x.id for x in rest] == [a.id]
    assert more is None
    assert rest[0].overdue
    assert rest[0].queue_ids == ("Q1",)
    with pytest.raises(ValueError, match="unknown case state"):
        await store.cases(sla=DAY, state="nope")  # type: ignore[arg-type]
    counts = await store.case_counts()
    assert counts == {"open": 1, "action_taken": 0, "resolved": 1, "confirmed": 0, "escalated": 0,
                      "closed_unresolved": 1}  # fmt: skip


async def test_automatic_confirmation(store: LogStore, url: str) -> None:
    rids = await bounced_message(store, "Q1", ("jane@example.com", "joe@example.com"))
    case = await store.open_case(title="t", queue_ids=["Q1"], actor="ann")
    assert await store.confirm_cases() == []  # no targets yet
    await action(url, case.id, [(rids[0], "Q1")], "Q1")
    await action(url, case.id, [(rids[1], "Q1")], "Q1")
    assert await store.confirm_cases() == []  # still bounced
    delivered_at = time.time()
    await deliver(store, "Q1", delivered_at)
    done = await store.confirm_cases()
    assert len(done) == 1
    assert done[0][0] == case.id
    assert done[0][1] == pytest.approx(delivered_at - case.opened_at, abs=0.01)
    assert await store.confirm_cases() == []
    full = await store.case(case.id, sla=DAY)
    assert full is not None
    assert full.state == "confirmed"
    confirmation = full.entries[-1]
    assert confirmation.kind == "confirmation"
    assert confirmation.actor == "relay"
    assert confirmation.details["automatic"] is True
    assert confirmation.details["delivered_at"] == pytest.approx(delivered_at)
    assert (await store.verify_chains()).ok


async def test_confirmation_waits_for_every_target(store: LogStore, url: str) -> None:
    r1 = await bounced_message(store, "Q1")
    r2 = await bounced_message(store, "Q2")
    case = await store.open_case(title="t", queue_ids=["Q1", "Q2"], actor="ann")
    await action(url, case.id, [(r1[0], "Q1"), (r2[0], "Q2")], "Q1")
    await deliver(store, "Q1", time.time())
    assert await store.confirm_cases() == []
    await deliver(store, "Q2", time.time())
    assert [x for x, _ in await store.confirm_cases()] == [case.id]


async def test_confirmation_happens_once_across_stores(store: LogStore, url: str) -> None:
    """Two processes' stores confirm at the same time: one confirmation entry."""
    cases = []
    for n in range(5):
        rid = await bounced_message(store, f"Q{n}")
        case = await store.open_case(title="t", queue_ids=[f"Q{n}"], actor="ann")
        await action(url, case.id, [(rid[0], f"Q{n}")], f"Q{n}")
        await deliver(store, f"Q{n}", time.time())
        cases.append(case.id)
    other = await LogStore.open(url)
    try:
        results = await asyncio.gather(*(s.confirm_cases() for s in (store, other, store, other)))
    finally:
        await other.close()
    confirmed = sorted(x for r in results for x, _ in r)
    assert confirmed == sorted(cases)
    for case_id in cases:
        full = await store.case(case_id, sla=DAY)
        assert full is not None
        assert [e.kind for e in full.entries].count("confirmation") == 1
    assert (await store.verify_chains()).ok
