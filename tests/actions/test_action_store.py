"""Support's actions in the store, on SQLite and PostgreSQL: each writes its events, its audit
line and (from a case) the case's action entry in one transaction, and a refused one writes
nothing at all."""

from __future__ import annotations

import asyncio
import time

import action_fixtures
import pytest
import sqlalchemy as sa
from action_fixtures import (
    audit_lines,
    bounce,
    events,
    message,
    recipient_id,
    snapshot,
    states,
    targets,
    view,
)
from helpers import raw_sql

from relay.errors import Conflict, NotFound, ReasonRequired
from relay.logstore import LogStore
from relay.model import Suppression

store, url = action_fixtures.store, action_fixtures.url


async def _case(store: LogStore, *qids: str) -> int:
    return (await store.open_case(title="Invoice to Jane", queue_ids=qids, actor="sam", ip="10.0.0.7")).id


# -- retry and cancel


async def test_retry_from_a_case_writes_events_audit_and_entry_together(store: LogStore, url: str) -> None:
    await store.enqueue(message("01RETRY1", ("jane@example.com", "joe@example.com")))
    await bounce(store, "01RETRY1")
    case_id = await _case(store, "01RETRY1")
    assert await store.retry("01RETRY1", by="sam", reason="mailbox fixed", case_id=case_id, ip="10.0.0.7") == 2

    v = await view(store, "01RETRY1")
    retried = events(v, "retried")
    assert {e["recipient"] for e in retried} == {"jane@example.com", "joe@example.com"}
    assert all(e["by"] == "sam" and e["case_id"] == case_id and e["reason"] == "mailbox fixed" for e in retried)
    (line,) = await audit_lines(store, "action.retry")
    assert (line.actor, line.ip, line.target) == ("sam", "10.0.0.7", "01RETRY1")
    assert line.details["count"] == 2
    assert line.details["case_id"] == case_id
    case = await store.case(case_id, sla=3600)
    assert case is not None
    assert case.state == "action_taken"
    (entry,) = [e for e in case.entries if e.kind == "action"]
    assert entry.details["action"] == "retry"
    assert entry.details["queue_id"] == "01RETRY1"
    assert entry.actor == "sam"
    ids = {await recipient_id(url, "01RETRY1", a) for a in ("jane@example.com", "joe@example.com")}
    assert await targets(url) == {(case_id, i, "01RETRY1") for i in ids}


async def test_cli_retry_and_cancel_are_audited_without_a_case(store: LogStore) -> None:
    await store.enqueue(message("01CLI1"))
    assert await store.retry("01CLI1") == 1  # the CLI's call, unchanged
    assert await store.retry(None) == 1  # --all
    assert await store.cancel("01CLI1", reason="customer asked") == 1
    lines = await audit_lines(store)
    assert [(x.action, x.actor, x.ip, x.target) for x in reversed(lines)] == [
        ("action.retry", "cli", "", "01CLI1"),
        ("action.retry", "cli", "", ""),
        ("action.cancel", "cli", "", "01CLI1"),
    ]
    (cancelled,) = events(await view(store, "01CLI1"), "cancelled")
    assert "case_id" not in cancelled
    assert cancelled["reason"] == "customer asked"
    with pytest.raises(ValueError, match="names a message"):
        await store.retry(None, case_id=1)


@pytest.mark.parametrize("closing", ["closed", "confirmed-by-hand", "unknown"])
async def test_a_closed_or_unknown_case_refuses_every_action_whole(store: LogStore, url: str, closing: str) -> None:
    await store.enqueue(message("01SHUT1", ("jane@example.com",)))
    await bounce(store, "01SHUT1")
    case_id = await _case(store, "01SHUT1")
    if closing == "closed":
        await store.close_case(case_id, "customer left", actor="sam")
    elif closing == "confirmed-by-hand":
        await store.add_case_entry(case_id, "confirmation", {"how": "phone"}, actor="sam")
    else:
        case_id += 1000
    error = NotFound if closing == "unknown" else Conflict
    before, rows = await snapshot(url), await states(url)
    attempts = [
        store.retry("01SHUT1", by="sam", case_id=case_id),
        store.cancel("01SHUT1", by="sam", case_id=case_id),
        store.resend("01SHUT1", "jane@example.com", "jane@example.org", by="sam", case_id=case_id),
        store.comment("01SHUT1", "called her", by="sam", case_id=case_id),
        store.release("01SHUT1", by="sam", case_id=case_id),
        store.discard("01SHUT1", by="sam", case_id=case_id),
    ]
    for attempt in attempts:
        with pytest.raises(error):
            await attempt
    await store.suppress(Suppression("jane@example.com", "manual", "api", None, time.time()), actor="t")
    before = await snapshot(url)
    with pytest.raises(error):
        await store.unsuppress_recipient("01SHUT1", "jane@example.com", "fixed", by="sam", case_id=case_id)
    assert await snapshot(url) == before
    assert await states(url) == rows


async def test_unknown_message_or_recipient_writes_nothing(store: LogStore, url: str) -> None:
    await store.enqueue(message("01KNOWN1"))
    before = await snapshot(url)
    for attempt in (
        store.retry("01NOPE"),
        store.cancel("01NOPE"),
        store.comment("01NOPE", "x", by="sam"),
        store.release("01NOPE", by="sam"),
        store.discard("01NOPE", by="sam"),
        store.resend("01NOPE", "jane@example.com", "a@example.org", by="sam"),
        store.resend("01KNOWN1", "stranger@example.com", "a@example.org", by="sam"),
        store.unsuppress_recipient("01KNOWN1", "stranger@example.com", "x", by="sam"),
    ):
        with pytest.raises(NotFound):
            await attempt
    assert await snapshot(url) == before


# -- resend


async def test_resend_stores_a_linked_new_message(store: LogStore, url: str) -> None:
    raw = b"Subject: Invoice\r\nMessage-ID: <inv-1@app.example>\r\n\r\nYour invoice\r\n"
    await store.enqueue(
        message("01OLD1", ("jane@exmaple.com", "joe@example.com"), raw=raw, tags=("invoice", "eu"), track="opens")
    )
    await bounce(store, "01OLD1")
    case_id = await _case(store, "01OLD1")
    seen: list[str] = []
    store.on_enqueued.append(lambda m: seen.append(m.queue_id))
    new_id = await store.resend(
        "01OLD1", "JANE@exmaple.com", "jane@Example.COM", by="sam", ip="10.0.0.7", case_id=case_id, reason="typo"
    )
    assert seen == [new_id]  # delivery is woken, after the commit
    assert len(new_id) == 26
    assert new_id != "01OLD1"

    new = await view(store, new_id)
    assert [r.address for r in new.recipients] == ["jane@example.com"]
    assert new.recipients[0].status == "queued"
    assert new.recipients[0].next_attempt_at is not None
    assert (new.mail_from, new.subject, new.tags, new.user) == ("app@example.com", "Hello", ("invoice", "eu"), "app")
    (received,) = events(new, "received")
    assert received["resend_of"] == "01OLD1"
    assert received["by"] == "sam"
    assert received["case_id"] == case_id
    assert await store.raw_message(new_id) == raw

    old = await view(store, "01OLD1")
    (resent,) = events(old, "resent")
    assert resent == {"to": "jane@example.com", "new_queue_id": new_id, "by": "sam", "reason": "typo",
                      "case_id": case_id, "recipient": "jane@exmaple.com"}  # fmt: skip
    (line,) = await audit_lines(store, "action.resend")
    assert line.target == "01OLD1"
    assert line.details["new_queue_id"] == new_id
    rid = await recipient_id(url, new_id, "jane@example.com")
    assert await targets(url) == {(case_id, rid, new_id)}
    case = await store.case(case_id, sla=3600)
    assert case is not None
    assert set(case.queue_ids) == {"01OLD1", new_id}
    # the new message's webhook rows carry its queue id; the old message's "resent" row too
    assert {d.type for d in await store.message_webhooks(new_id)} == {"message.received"}
    assert "message.resent" in {d.type for d in await store.message_webhooks("01OLD1")}


async def test_resend_to_the_same_address_twice_sends_once(store: LogStore, url: str) -> None:
    """A double click or a retried request: the second resend to the same corrected address is
    refused (naming the first one's message), also when both run at once from two stores."""
    await store.enqueue(message("01TWICE", ("jane@exmaple.com",)))
    first = await store.resend("01TWICE", "jane@exmaple.com", "jane@example.com", by="sam")
    before = await snapshot(url)
    with pytest.raises(Conflict, match=f"already, as {first}"):
        await store.resend("01TWICE", "JANE@exmaple.com", "Jane@Example.com", by="sam")
    assert await snapshot(url) == before
    # another corrected address is another resend
    await store.resend("01TWICE", "jane@exmaple.com", "jane@example.org", by="sam")

    await store.enqueue(message("01RACE", ("joe@exmaple.com",)))
    other = await action_fixtures.open_store(url)
    try:
        results = await asyncio.gather(
            store.resend("01RACE", "joe@exmaple.com", "joe@example.com", by="sam"),
            other.resend("01RACE", "joe@exmaple.com", "joe@example.com", by="ann"),
            return_exceptions=True,
        )
    finally:
        await other.close()
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "str"]
    assert len(events(await view(store, "01RACE"), "resent")) == 1


async def test_resend_refusals_write_nothing(store: LogStore, url: str) -> None:
    await store.enqueue(message("01REF1", ("jane@example.com",)))
    await store.suppress(Suppression("*@blocked.example", "manual", "api", None, time.time()), actor="t")
    before = await snapshot(url)
    for bad in ("not an address", "", "a@b@c", "x\x00@example.com", "jane@[127.0.0.1]", "a" * 300 + "@example.com",
                "jane@example.com\r\nRCPT TO:<x@y>"):  # fmt: skip
        with pytest.raises(ValueError, match=r"address|literal"):
            await store.resend("01REF1", "jane@example.com", bad, by="sam")
    with pytest.raises(Conflict, match="suppress"):
        await store.resend("01REF1", "jane@example.com", "Ann@Blocked.example", by="sam")
    with pytest.raises(ValueError, match="too long"):
        await store.resend("01REF1", "jane@example.com", "ann@example.org", by="sam", reason="x" * 20_000)
    # the body is gone (a later retention): refused, with a clear error
    await raw_sql(url, lambda c: c.execute(sa.text("DELETE FROM bodies WHERE queue_id = '01REF1'")), write=True)
    before = await snapshot(url)
    store2 = await action_fixtures.open_store(url)  # no body cache
    try:
        with pytest.raises(Conflict, match="no longer kept"):
            await store2.resend("01REF1", "jane@example.com", "ann@example.org", by="sam")
        assert await store2.raw_message("01REF1") is None
    finally:
        await store2.close()
    assert await snapshot(url) == before


# -- notes


async def test_comment_is_an_event_and_an_audit_line(store: LogStore, url: str) -> None:
    await store.enqueue(message("01NOTE1"))
    case_id = await _case(store, "01NOTE1")
    await store.comment("01NOTE1", "Jane says: arrived in spam\nline two", by="sam", ip="::1", case_id=case_id)
    (note,) = events(await view(store, "01NOTE1"), "commented")
    assert note == {"text": "Jane says: arrived in spam\nline two", "by": "sam", "case_id": case_id, "recipient": None}
    (line,) = await audit_lines(store, "action.note")
    assert line.ip == "::1"
    assert not [d for d in await store.message_webhooks("01NOTE1") if d.type == "message.commented"]
    before = await snapshot(url)
    for bad in ("", "   ", "nul \x00 here", "x" * 10_001, "lone \udc80 surrogate"):
        with pytest.raises(ValueError, match=r"text|NUL|Unicode"):
            await store.comment("01NOTE1", bad, by="sam")
    assert await snapshot(url) == before


async def test_concurrent_actions_from_one_case_all_land(store: LogStore) -> None:
    for i in range(5):
        await store.enqueue(message(f"01CONC{i}"))
    case_id = await _case(store, *(f"01CONC{i}" for i in range(5)))
    await asyncio.gather(*(store.comment(f"01CONC{i % 5}", f"note {i}", by="sam", case_id=case_id) for i in range(30)))
    case = await store.case(case_id, sla=3600)
    assert case is not None
    assert len([e for e in case.entries if e.kind == "action"]) == 30
    assert len(await audit_lines(store, "action.note")) == 30
    report = await store.verify_chains()
    assert report.ok


# -- suppression


async def test_unsuppress_recipient_lifts_the_entry_with_its_trail(store: LogStore, url: str) -> None:
    await store.enqueue(message("01UNS1", ("jane@example.com",)))
    await store.suppress(Suppression("jane@example.com", "complaint", "complaint", "01UNS1", time.time()), actor="fbl")
    before = await snapshot(url)
    with pytest.raises(ReasonRequired):
        await store.unsuppress_recipient("01UNS1", "jane@example.com", "  ", by="sam")
    assert await snapshot(url) == before
    entry = await store.unsuppress_recipient("01UNS1", "Jane@Example.com", "she asked again", by="sam", ip="10.1.1.1")
    assert entry.reason == "complaint"
    assert await store.suppression_check("jane@example.com") is None
    (ev,) = events(await view(store, "01UNS1"), "unsuppressed")
    assert ev["by"] == "sam"
    assert ev["reason"] == "she asked again"
    assert ev["entry"]["reason"] == "complaint"
    changes, _ = await store.suppression_audit("jane@example.com")
    assert changes[0].action == "removed"
    assert changes[0].actor == "sam"
    (line,) = await audit_lines(store, "action.unsuppress")
    assert line.target == "01UNS1"
    assert line.details["address"] == "jane@example.com"
    with pytest.raises(NotFound):  # nothing left to lift
        await store.unsuppress_recipient("01UNS1", "jane@example.com", "again", by="sam")


# -- reads


async def test_message_webhooks_are_the_messages_own_newest_first(store: LogStore, url: str) -> None:
    await store.enqueue(message("01HOOK1"))
    await store.enqueue(message("01HOOK2"))
    await store.retry("01HOOK1", by="sam")
    await store.suppress(Suppression("x@example.com", "manual", "api", None, time.time()), actor="t")
    found = await store.message_webhooks("01HOOK1")
    assert [d.type for d in found] == ["message.retried", "message.received"]
    assert all(d.queue_id == "01HOOK1" for d in found)
    all_rows = await raw_sql(url, lambda c: c.execute(sa.text("SELECT type, queue_id FROM webhook_deliveries")).all())
    assert {(t, q) for t, q in all_rows if t.startswith("suppression.")} == {("suppression.created", None)}
    assert await store.message_webhooks("01NOPE") == []
    assert await store.raw_message("01NOPE") is None
