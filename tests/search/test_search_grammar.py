"""relay.search: the grammar, pure. Hypothesis: any text parses or raises QueryError, nothing
else; simple terms survive a round trip through str()."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.search import IS_VALUES, MAX_TERMS, OPERATORS, Query, QueryError, Term, parse

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
MIDNIGHT = datetime(2027, 1, 15, tzinfo=UTC).timestamp()


def terms(text: str) -> tuple[Term, ...]:
    return parse(text, now=NOW).terms


def test_operators_and_values() -> None:
    assert terms('to:Jane@Example.com -status:Bounced subject:"Password  Reset" tag:Invoice') == (
        Term("to", "jane@example.com", exact=True),
        Term("status", "bounced", negated=True),
        Term("subject", "password  reset"),
        Term("tag", "Invoice"),  # tags are as sent
    )
    assert terms("to:@example.com from:shop") == (Term("to", "@example.com"), Term("from", "shop"))
    assert terms("message-id:<a@b> id:01abc domain:@Example.COM user:App") == (
        Term("message-id", "a@b"), Term("id", "01ABC"), Term("domain", "example.com"), Term("user", "App"),
    )  # fmt: skip
    assert terms("reason:MailboxFull is:opened -is:clicked") == (
        Term("reason", "mailboxfull"), Term("is", "opened"), Term("is", "clicked", negated=True),
    )  # fmt: skip


def test_free_text_phrases_and_negation() -> None:
    assert terms('Invoice "password reset" -spam -"out of office"') == (
        Term("text", "invoice"), Term("text", "password reset"), Term("text", "spam", negated=True),
        Term("text", "out of office", negated=True),
    )  # fmt: skip
    # a colon after something that is not an operator name is text; quoted, any text is
    assert terms('12:30 "https://example.com/a"') == (Term("text", "12:30"), Term("text", "https://example.com/a"))
    assert terms("- a") == (Term("text", "-"), Term("text", "a"))
    assert terms('subject:"unclosed phrase') == (Term("subject", "unclosed phrase"),)
    assert terms("   ") == ()


@pytest.mark.parametrize(
    ("text", "at"),
    [
        ("after:7d", NOW - 7 * 86400), ("after:2h", NOW - 7200), ("after:30m", NOW - 1800),
        ("after:1w", NOW - 7 * 86400),
        ("after:today", MIDNIGHT), ("before:yesterday", MIDNIGHT - 86400),
        ("after:2027-01-01", datetime(2027, 1, 1, tzinfo=UTC).timestamp()),
        ("after:2027-01-01T10:30", datetime(2027, 1, 1, 10, 30, tzinfo=UTC).timestamp()),
        ("after:2027-01-01t10:30:00z", datetime(2027, 1, 1, 10, 30, tzinfo=UTC).timestamp()),
        ("after:2027-01-01T10:30:00+01:00", datetime(2027, 1, 1, 9, 30, tzinfo=UTC).timestamp()),
        ("before:1800000000", 1_800_000_000.0), ("before:1800000000.5", 1_800_000_000.5),
    ],
)  # fmt: skip
def test_times(text: str, at: float) -> None:
    (term,) = terms(text)
    assert term.at == at


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("status:nope", "unknown status 'nope' (known: queued, deferred"),
        ("is:read", "unknown is:read (known: is:opened"),
        ("reason:bad", "unknown reason 'bad' (known: userunknown"),
        ("foo:bar", "unknown operator foo: (known: to:, from:"),
        ("http://example.com", 'quote it: "http://example.com"'),
        ("to:", "to: needs a value"),
        ('subject:""', "subject: needs a value"),
        ('""', "empty phrase"),
        ("after:soon", "after:soon is not a time"),
        ("after:999999999d", "too far back"),
        ("after:2027-13-01", "is not a time"),
        ("a\x00b", "NUL"),
        ("x" * 1001, "too long (1001 characters; at most 1000)"),
        (" ".join(["w"] * (MAX_TERMS + 1)), "too many terms (21; at most 20)"),
    ],
)
def test_errors_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(QueryError, match=None) as info:
        parse(text, now=NOW)
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)


def test_twenty_terms_and_1000_characters_are_fine() -> None:
    assert len(terms(" ".join(["w"] * MAX_TERMS))) == MAX_TERMS
    assert terms("x" * 1000) == (Term("text", "x" * 1000),)


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_query_error(text: str) -> None:
    try:
        query = parse(text, now=NOW)
    except QueryError as exc:
        message = str(exc)
        query = None
    if query is None:
        assert message
        return
    assert len(query.terms) <= MAX_TERMS
    for term in query.terms:
        assert term.value or term.op == "text"


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters='\x00"'), max_size=120))
def test_text_made_of_operators_never_raises_anything_else(tail: str) -> None:
    for op in (*OPERATORS, "-to", "nope"):
        with contextlib.suppress(QueryError):
            parse(f"{op}:{tail}", now=NOW)


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.@_%-", min_size=1, max_size=12).filter(
    lambda w: not w.startswith("-") and ":" not in w
)
_PHRASE = st.lists(_WORD, min_size=1, max_size=3).map(" ".join)


@st.composite
def simple_terms(draw: st.DrawFn) -> Term:
    op = draw(st.sampled_from(["to", "from", "subject", "domain", "text", "status", "is", "tag", "user"]))
    negated = draw(st.booleans())
    if op == "status":
        return Term("status", draw(st.sampled_from(["queued", "bounced", "held"])), negated)
    if op == "is":
        return Term("is", draw(st.sampled_from(IS_VALUES)), negated)
    value = draw(_PHRASE if op in ("subject", "text") else _WORD)
    if op == "domain":
        value = value.lstrip("@") or "x"
    if op in ("to", "from"):
        local, at, domain = value.rpartition("@")
        return Term(op, value, negated, exact=bool(at and local and domain))
    return Term(op, value, negated)  # type: ignore[arg-type]


@given(st.lists(simple_terms(), max_size=MAX_TERMS))
def test_round_trip(items: list[Term]) -> None:
    query = Query(tuple(items))
    assert parse(str(query), now=NOW) == query
