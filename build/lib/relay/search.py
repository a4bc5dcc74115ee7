"""The one search grammar: the console's search box, ``GET /api/v1/messages?q=`` and
``relay search QUERY``. Pure: text in, a ``Query`` out (relay/store/search.py runs it).

    to:jane@example.com status:bounced after:7d -is:opened "password reset" invoice

Terms are ANDed; ``-`` negates one; a value with spaces is quoted (``subject:"a b"``). Bare
words and quoted phrases are free text, over the subject and the recipient addresses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, get_args

from relay.bounces.classify import REASONS
from relay.model import STATES

__all__ = ["IS_VALUES", "MAX_LENGTH", "MAX_TERMS", "OPERATORS", "Query", "QueryError", "Term", "parse"]

Op = Literal[
    "to", "from", "subject", "message-id", "id", "tag", "status", "reason", "domain", "user",
    "after", "before", "is", "text",
]  # fmt: skip
OPERATORS: Final[tuple[str, ...]] = tuple(o for o in get_args(Op) if o != "text")  # "text": free text, no prefix
IS_VALUES: Final = ("opened", "clicked", "suppressed", "complained")
MAX_LENGTH: Final = 1000
MAX_TERMS: Final = 20
# A long relative time or epoch must not overflow a datetime: nothing older than this is asked for.
_MAX_SECONDS: Final = 200 * 365 * 86400
_OPERATOR = re.compile(r"[A-Za-z][A-Za-z-]*")  # "foo:" is an operator; "12:30" or "a.b:c" are text
_RELATIVE = re.compile(r"(\d{1,9})([smhdw])")
_EPOCH = re.compile(r"\d{1,12}(\.\d{1,9})?")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class QueryError(ValueError):
    """A search that cannot be run; the message is fit to show the person who typed it."""


@dataclass(frozen=True, slots=True)
class Term:
    """One term. ``value`` is normalised (lower case for addresses, states, reasons, domains,
    free text; upper case for queue ids; Message-IDs without <>). ``exact``: to:/from: with a
    whole address match it exactly, else as a substring. ``at``: after:/before:'s time."""

    op: Op
    value: str
    negated: bool = False
    exact: bool = False
    at: float | None = None

    def __str__(self) -> str:
        value = f'"{self.value}"' if (not self.value or any(c.isspace() for c in self.value)) else self.value
        if self.op == "text" and (":" in value or value.startswith("-")) and not value.startswith('"'):
            value = f'"{value}"'
        return ("-" if self.negated else "") + ("" if self.op == "text" else f"{self.op}:") + value


@dataclass(frozen=True, slots=True)
class Query:
    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return " ".join(str(t) for t in self.terms)


def parse(text: str, *, now: float) -> Query:
    """The query ``text`` says; relative times (``7d``, ``today``) count back from ``now``.
    QueryError for anything it cannot mean."""
    if "\x00" in text:
        raise QueryError("the search contains a NUL character")
    if len(text) > MAX_LENGTH:
        raise QueryError(f"the search is too long ({len(text)} characters; at most {MAX_LENGTH})")
    terms = tuple(_term(neg, op, value, quoted, now) for neg, op, value, quoted in _tokens(text))
    if len(terms) > MAX_TERMS:
        raise QueryError(f"too many terms ({len(terms)}; at most {MAX_TERMS})")
    return Query(terms)


def _tokens(text: str) -> list[tuple[bool, str | None, str, bool]]:
    """(negated, operator or None, value, quoted) per term, as written."""
    out: list[tuple[bool, str | None, str, bool]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        negated = text[i] == "-" and i + 1 < n and not text[i + 1].isspace()
        if negated:
            i += 1
        op: str | None = None
        if text[i] != '"':
            j = i
            while j < n and not text[j].isspace() and text[j] not in ':"':
                j += 1
            if j < n and text[j] == ":" and _OPERATOR.fullmatch(text[i:j]):
                op, i = text[i:j].lower(), j + 1
        if i < n and text[i] == '"':
            end = text.find('"', i + 1)
            end = n if end < 0 else end  # an unclosed quote runs to the end
            value, quoted, i = text[i + 1 : end], True, end + 1
        else:
            j = i
            while j < n and not text[j].isspace():
                j += 1
            value, quoted, i = text[i:j], False, j
        out.append((negated, op, value, quoted))
    return out


def _term(negated: bool, op: str | None, value: str, quoted: bool, now: float) -> Term:  # noqa: PLR0911, PLR0912 -- one case per operator
    if op is None:
        if not value.strip():
            if quoted:
                raise QueryError('an empty phrase ("") matches nothing useful; remove it')
            raise QueryError("a lone '-' must be followed by a term, like -status:delivered")
        return Term("text", value.lower(), negated)
    if op not in OPERATORS:
        raise QueryError(
            f"unknown operator {op}: (known: {', '.join(o + ':' for o in OPERATORS)}); "
            f'to search for text with a colon, quote it: "{op}:{value}"'
        )
    value = value.strip()
    if not value:
        raise QueryError(f"{op}: needs a value, like {_EXAMPLES[op]}")
    match op:
        case "to" | "from":
            low = value.lower()
            local, at, domain = low.rpartition("@")
            return Term(op, low, negated, exact=bool(at and local and domain))
        case "subject" | "user" | "tag":
            return Term(op, value.lower() if op == "subject" else value, negated)
        case "message-id":
            return Term(op, value.removeprefix("<").removesuffix(">").strip(), negated)
        case "id":
            return Term(op, value.upper(), negated)
        case "domain":
            return Term(op, value.lower().removeprefix("@"), negated)
        case "status":
            if value.lower() not in STATES:
                raise QueryError(f"unknown status {value!r} (known: {', '.join(STATES)})")
            return Term(op, value.lower(), negated)
        case "reason":
            if value.lower() not in REASONS:
                raise QueryError(f"unknown reason {value!r} (known: {', '.join(REASONS)})")
            return Term(op, value.lower(), negated)
        case "is":
            if value.lower() not in IS_VALUES:
                raise QueryError(f"unknown is:{value} (known: {', '.join('is:' + v for v in IS_VALUES)})")
            return Term(op, value.lower(), negated)
        case "after" | "before":
            return Term(op, value.lower(), negated, at=_time(op, value, now))
        case _:  # pragma: no cover - every operator is a case above
            raise QueryError(f"unknown operator {op}:")


_EXAMPLES: Final = {
    "to": "to:jane@example.com", "from": "from:app@example.com", "subject": 'subject:"password reset"',
    "message-id": "message-id:<abc@example.com>", "id": "id:01JD...", "tag": "tag:invoice",
    "status": "status:bounced", "reason": "reason:mailboxfull", "domain": "domain:example.com",
    "user": "user:app", "after": "after:2026-12-01 or after:7d", "before": "before:yesterday",
    "is": "is:opened",
}  # fmt: skip


def _time(op: str, value: str, now: float) -> float:
    """Seconds since the epoch: a date (its midnight, UTC), an ISO datetime, epoch seconds,
    ``7d``/``2h``/``30m``/``45s``/``1w`` ago, ``today`` or ``yesterday`` (midnight UTC)."""
    low = value.lower()
    midnight = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if low == "today":
        return midnight.timestamp()
    if low == "yesterday":
        return (midnight - timedelta(days=1)).timestamp()
    if m := _RELATIVE.fullmatch(low):
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds > _MAX_SECONDS:
            raise QueryError(f"{op}:{value} is too far back")
        return now - seconds
    if _EPOCH.fullmatch(low):
        return float(low)
    try:
        parsed = datetime.fromisoformat(value.upper() if "t" in low else value)
    except ValueError:
        raise QueryError(
            f"{op}:{value} is not a time (use 2026-12-01, 2026-12-01T09:30, epoch seconds, 7d, 2h, 30m, "
            "today or yesterday)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
