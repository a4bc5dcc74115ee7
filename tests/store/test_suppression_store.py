"""The suppression list's operations, on SQLite and PostgreSQL: matching (case, domains, expiry),
adding and removing with the audit trail, pages, import all-or-nothing, the count."""

from __future__ import annotations

import asyncio
import time

import pytest
import store_fixtures

from relay.errors import NotFound, ReasonRequired, StoreError
from relay.logstore import LogStore
from relay.model import Suppression, SuppressionReason

store, url = store_fixtures.store, store_fixtures.url  # the fixtures, on both backends

T0 = 1_900_000_000.0  # created_at of the entries below: fixed, so that pages have a known order


def entry(
    address: str,
    reason: SuppressionReason = "manual",
    *,
    at: float = T0,
    expires_at: float | None = None,
    note: str = "",
    qid: str | None = None,
) -> Suppression:
    origin = {"hard_bounce": "bounce", "complaint": "complaint", "manual": "api"}[reason]
    return Suppression(address, reason, origin, qid, at, expires_at, note)  # type: ignore[arg-type]


async def test_addresses_match_whatever_their_case(store: LogStore) -> None:
    found, new = await store.suppress(entry("Jane.Doe@Example.COM", note="asked"), actor="tester")
    assert new
    assert found.address == "jane.doe@example.com"
    for asked in ("jane.doe@example.com", "JANE.DOE@EXAMPLE.COM", "  Jane.Doe@example.com "):
        hit = await store.suppression_check(asked)
        assert hit is not None
        assert hit.address == "jane.doe@example.com"
        assert hit.note == "asked"
    assert await store.suppression_check("jane@example.com") is None
    assert await store.suppression("JANE.DOE@example.com") == found
    (page, more) = await store.suppressions(address="Jane.Doe@EXAMPLE.com")
    assert [e.address for e in page] == ["jane.doe@example.com"]
    assert more is None


async def test_a_domain_entry_covers_its_domain_and_an_own_entry_comes_first(store: LogStore) -> None:
    await store.suppress(entry("*@Spam.Example"), actor="tester")
    hit = await store.suppression_check("anyone@SPAM.example")
    assert hit is not None
    assert hit.address == "*@spam.example"
    assert await store.suppression_check("anyone@sub.spam.example") is None  # a domain entry is that domain only
    assert await store.suppression_check("anyone@example") is None
    await store.suppress(entry("bob@spam.example", "complaint", qid="01COMPLAINT"), actor="tester")
    own = await store.suppression_check("Bob@spam.example")
    assert own is not None
    assert (own.address, own.reason, own.source_queue_id) == ("bob@spam.example", "complaint", "01COMPLAINT")
    # the domain's entry is not bob's own: removing "bob" removes bob's only, and then the domain's still holds
    await store.unsuppress("bob@spam.example", "resolved with the customer", actor="tester", origin="cli")
    with pytest.raises(NotFound, match=r"suppressed by the entry \*@spam.example"):
        await store.unsuppress("bob@spam.example", "again", actor="tester", origin="cli")
    after = await store.suppression_check("bob@spam.example")
    assert after is not None
    assert after.address == "*@spam.example"


async def test_expired_entries_do_not_count_and_are_replaced(store: LogStore) -> None:
    now = time.time()
    await store.suppress(entry("temp@example.com", at=now, expires_at=now + 60), actor="tester")
    assert await store.suppression_check("temp@example.com", now=now + 59) is not None
    assert await store.suppression_check("temp@example.com", now=now + 61) is None
    assert await store.suppression("temp@example.com", now=now + 61) is None
    assert await store.suppression_count(now=now + 59) == 1
    assert await store.suppression_count(now=now + 61) == 0
    assert (await store.suppressions(now=now + 61))[0] == []
    with pytest.raises(NotFound):
        await store.unsuppress("temp@example.com", "", actor="tester", origin="cli", now=now + 61)
    # a new entry takes the expired one's place (import takes a "now": the clock, moved on)
    added = await store.import_suppressions(
        [entry("TEMP@example.com", "hard_bounce", at=now + 70)], "tester", now=now + 70
    )
    assert [e.address for e in added] == ["temp@example.com"]
    hit = await store.suppression_check("temp@example.com", now=now + 71)
    assert hit is not None
    assert (hit.reason, hit.expires_at) == ("hard_bounce", None)
    changes, _ = await store.suppression_audit("temp@example.com")
    assert [(c.action, c.reason) for c in changes] == [("added", "hard_bounce"), ("added", "manual")]
    with pytest.raises(ValueError, match="past"):
        await store.suppress(entry("late@example.com", at=now, expires_at=now - 1), actor="tester")


async def test_adding_twice_keeps_the_first_entry(store: LogStore) -> None:
    first, new = await store.suppress(entry("x@example.com", "complaint", note="first"), actor="bounces")
    assert new
    again, new = await store.suppress(entry("X@EXAMPLE.COM", "manual", note="second"), actor="tester")
    assert not new
    assert again == first
    changes, _ = await store.suppression_audit("x@example.com")
    assert len(changes) == 1


async def test_removal_needs_a_reason_for_a_complaint_and_is_audited(store: LogStore) -> None:
    await store.suppress(entry("angry@example.com", "complaint", note="ARF abuse", qid="01ARF"), actor="bounces")
    await store.suppress(entry("typo@example.com", "manual"), actor="api:abc")
    for blank in ("", "   "):
        with pytest.raises(ReasonRequired, match="needs a reason"):
            await store.unsuppress("angry@example.com", blank, actor="alice", origin="cli")
    assert await store.suppression_check("angry@example.com") is not None  # still there
    removed = await store.unsuppress("ANGRY@example.com", " customer opted back in ", actor="alice", origin="cli")
    assert (removed.address, removed.reason) == ("angry@example.com", "complaint")
    assert await store.suppression_check("angry@example.com") is None
    await store.unsuppress("typo@example.com", "", actor="api:abc", origin="api")  # no reason needed
    with pytest.raises(NotFound, match="not suppressed"):
        await store.unsuppress("typo@example.com", "", actor="api:abc", origin="api")

    changes, _ = await store.suppression_audit("angry@example.com")
    assert [c.to_json() for c in changes] == [
        {"at": changes[0].to_json()["at"], "address": "angry@example.com", "action": "removed",
         "reason": "customer opted back in", "origin": "cli", "actor": "alice", "source_queue_id": "01ARF",
         "note": "ARF abuse"},
        {"at": changes[1].to_json()["at"], "address": "angry@example.com", "action": "added", "reason": "complaint",
         "origin": "complaint", "actor": "bounces", "source_queue_id": "01ARF", "note": "ARF abuse"},
    ]  # fmt: skip
    everything, _ = await store.suppression_audit()
    assert [(c.address, c.action) for c in everything] == [
        ("typo@example.com", "removed"),
        ("angry@example.com", "removed"),
        ("typo@example.com", "added"),
        ("angry@example.com", "added"),
    ]
    first, before = await store.suppression_audit(limit=3)
    assert [c.action for c in first] == ["removed", "removed", "added"]
    assert before is not None
    rest, end = await store.suppression_audit(limit=3, before=before)
    assert [(c.address, c.action) for c in rest] == [("angry@example.com", "added")]
    assert end is None


async def test_pages_are_newest_first_with_a_cursor(store: LogStore) -> None:
    # two share a created_at: the address breaks the tie, so no page repeats or skips one
    items = [
        entry("a@example.com", at=T0 + 1),
        entry("b@example.com", "hard_bounce", at=T0 + 2),
        entry("c@example.com", at=T0 + 2),
        entry("d@example.com", "complaint", at=T0 + 3),
        entry("*@e.example", at=T0 + 4),
    ]
    await store.import_suppressions(items, "tester")
    seen: list[str] = []
    after = None
    for _ in range(5):
        page, after = await store.suppressions(limit=2, after=after)
        seen += [e.address for e in page]
        if after is None:
            break
    assert seen == ["*@e.example", "d@example.com", "c@example.com", "b@example.com", "a@example.com"]
    assert [e.address for e in (await store.suppressions(reason="manual"))[0]] == [
        "*@e.example", "c@example.com", "a@example.com",
    ]  # fmt: skip
    assert [e.address for e in (await store.suppressions(reason="complaint"))[0]] == ["d@example.com"]
    assert (await store.suppressions(address="nobody@example.com"))[0] == []
    assert await store.suppression_count() == 5


async def test_import_is_all_or_nothing(store: LogStore) -> None:
    await store.suppress(entry("kept@example.com", "complaint", note="original"), actor="bounces")
    bad = Suppression("bad@example.com", None, "cli", None, T0)  # type: ignore[arg-type]  # reason NOT NULL
    with pytest.raises(StoreError):
        await store.import_suppressions([entry("new@example.com"), bad], "tester")
    assert await store.suppression_check("new@example.com") is None
    assert await store.suppression_count() == 1
    added = await store.import_suppressions(
        [entry("new@example.com"), entry("Kept@example.com", "manual", note="import")], "tester"
    )
    assert [e.address for e in added] == ["new@example.com"]  # kept@ keeps its entry
    kept = await store.suppression_check("kept@example.com")
    assert kept is not None
    assert (kept.reason, kept.note) == ("complaint", "original")
    (line,), _ = await store.suppression_audit("new@example.com")
    assert (line.origin, line.actor) == ("cli", "tester")  # the audit says how it came; the entry keeps its origin
    new = await store.suppression("new@example.com")
    assert new is not None
    assert new.origin == "api"


async def test_a_race_to_add_one_address_adds_it_once(url: str, store: LogStore) -> None:
    """Two stores (two nodes) add the same address at once: one entry, one audit line."""
    others = [await LogStore.open(url) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(s.suppress(entry("race@example.com", note=f"node {i}"), actor=f"node{i}") for i, s in enumerate(others))
        )
    finally:
        for s in others:
            await s.close()
    assert sum(new for _, new in results) == 1
    assert len({found.note for found, _ in results}) == 1
    changes, _ = await store.suppression_audit("race@example.com")
    assert len(changes) == 1


async def test_a_large_import_stays_within_the_bind_parameter_limits(store: LogStore) -> None:
    many = [entry(f"user{i}@bulk.example", at=T0 + i) for i in range(40_000)]  # > 32767 keys in one IN list
    added = await store.import_suppressions(many, "tester")
    assert len(added) == 40_000
    assert await store.suppression_count() == 40_000
    again = await store.import_suppressions([*many[:10], entry("one-more@bulk.example")], "tester")
    assert [e.address for e in again] == ["one-more@bulk.example"]
