"""Every operator, negation and phrase against a seeded store, on SQLite and PostgreSQL; paging
newest first and the capped count."""

from __future__ import annotations

import pytest
from conftest import NOW, qid

from relay.logstore import LogStore
from relay.search import QueryError
from relay.store import search as store_search

# query -> the seeded letters it finds, newest first (g f b e d a c)
CASES: list[tuple[str, str]] = [
    ("", "gfbedac"),
    ("to:jane@example.com", "fa"),  # exact, case-insensitive
    ("to:JANE@EXAMPLE.COM", "fa"),
    ("to:ane@example.com", ""),  # a whole address: exact, not a substring
    ("to:ane@", "fa"),  # not a whole address: a substring
    ("to:@example.com", "fbeda"),
    ("to:example", "gfbeda"),
    ("to:@example.org", "b"),
    ("-to:@example.com", "gc"),
    ("from:billing@shop.example", "a"),
    ("from:shop", "a"),
    ("-from:app@example.com", "a"),
    ("subject:reset", "fb"),
    ('subject:"password reset"', "fb"),
    ('subject:"password reset for"', "b"),
    ("subject:100%", "a"),  # % is literal
    ("subject:_", "c"),  # so is _
    ("subject:%", "ga"),
    ("message-id:<reset.b@app.example>", "b"),
    ("message-id:reset.b@app.example", "b"),
    ("message-id:nothing@app.example", ""),
    (f"id:{qid('c').lower()}", "c"),
    (f"-id:{qid('c')}", "gfbeda"),
    ("tag:invoice", "ac"),
    ("-tag:welcome", "gdac"),
    ("status:bounced", "a"),
    ("status:delivered", "fbe"),
    ("-status:delivered", "gdac"),
    ("status:held", "g"),
    ("status:sending", ""),
    ("reason:userunknown", "a"),
    ("reason:ratelimited", "c"),
    ("reason:feedback", "e"),
    ("-reason:userunknown", "gfbedc"),
    ("domain:example.com", "fbeda"),
    ("domain:@EXAMPLE.com", "fbeda"),
    ("domain:other.test status:deferred", "c"),
    ("user:web", "c"),
    ("-user:app", "dc"),  # a message without a user is not app's either
    ("after:1d", "gfbed"),
    ("before:1d", "ac"),
    ("after:yesterday before:today", "d"),
    ("after:2027-01-13 before:2027-01-14", "a"),
    (f"after:{NOW - 2 * 3600:.0f}", "gfb"),
    ("after:2027-01-15T06:30:00Z", "gfb"),
    ("-after:1d", "ac"),
    ("is:opened", "fb"),
    ("is:clicked", "b"),
    ("-is:opened", "gedac"),
    ("is:complained", "e"),
    ("is:suppressed", "d"),
    ("-is:suppressed -is:complained", "gfbac"),
    ("reset", "fb"),  # free text: subject
    ("frank", "e"),  # free text: recipient
    ("FRANK", "e"),
    ('"password reset"', "fb"),
    ("-reset", "gedac"),
    ("jane reset", "f"),
    ("x_y", "g"),
    ("x_", "g"),
    ('"https://example.com/x"', ""),
    ("to:jane@example.com status:bounced", "a"),
    ("to:jane@example.com -status:bounced", "f"),
    ("tag:invoice after:7d", "a"),
    ("-is:opened tag:welcome", "e"),
    ("domain:example.com status:bounced", "a"),
    ("nothing-matches-this", ""),
]


@pytest.mark.parametrize("count", [True, False])
async def test_every_operator(store: LogStore, count: bool) -> None:
    for text, want in CASES:
        page = await store.search_messages(text, limit=50, now=NOW, count=count)
        got = "".join(m.queue_id[8].lower() for m in page.messages)
        assert got == want, f"{text!r}: found {got!r}, wanted {want!r}"
        if count:
            assert (page.total, page.total_capped) == (len(want), False), text
        else:
            assert page.total == -1
        assert page.next is None


async def test_pages_newest_first(store: LogStore) -> None:
    seen, after = [], None
    while True:
        page = await store.search_messages("-status:held", limit=2, after=after, now=NOW)
        assert page.total == 6
        seen += [m.queue_id[8].lower() for m in page.messages]
        if page.next is None:
            break
        after = page.next
    assert "".join(seen) == "fbedac"


async def test_bad_queries_raise_query_error(store: LogStore) -> None:
    for text in ("status:nope", "is:read", "foo:bar", "reason:x", "after:soon", "to:", "a\x00b", "x" * 1001,
                 " ".join(["w"] * 21), "\"\""):  # fmt: skip
        with pytest.raises(QueryError):
            await store.search_messages(text, now=NOW)


async def test_count_is_capped(store: LogStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_search, "COUNT_CAP", 3)
    page = await store.search_messages("", now=NOW)
    assert (page.total, page.total_capped) == (3, True)
    page = await store.search_messages("status:delivered", now=NOW)
    assert (page.total, page.total_capped) == (3, False)


@pytest.mark.parametrize(
    ("probe_cap", "scan_ids", "max_params"),
    [(0, 0, 30_000), (50_000, 1, 30_000), (1, 1, 30_000), (2, 0, 30_000), (50_000, 5000, 1)],
)
async def test_every_plan_finds_the_same(
    store: LogStore, monkeypatch: pytest.MonkeyPatch, probe_cap: int, scan_ids: int, max_params: int
) -> None:
    """With tiny caps every term is "common" (the newest-first walk), or drives as a subquery
    rather than a list of ids; a probe stopped at its limit by a message's second recipient
    must not pass for a complete set: the answers are the same as with the usual plan."""
    monkeypatch.setattr(store_search, "PROBE_CAP", probe_cap)
    monkeypatch.setattr(store_search, "SCAN_IDS", scan_ids)
    monkeypatch.setattr(store_search, "MAX_PARAMS", max_params)
    for text, want in CASES:
        page = await store.search_messages(text, limit=50, now=NOW)
        got = "".join(m.queue_id[8].lower() for m in page.messages)
        assert got == want, f"{text!r} (walk): found {got!r}, wanted {want!r}"
        assert page.total == len(want)
