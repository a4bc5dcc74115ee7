"""Runs a relay.search ``Query``: messages matching every term, newest first, a page at a
time, with a count capped at COUNT_CAP.

How it stays fast at a million messages, the same on SQLite and PostgreSQL:

1. Probe: each positive term an index can answer (to: an address, id:, message-id:, tag:,
   status:, reason:, domain:, user:, from: an address, is:) reads its queue ids, up to
   PROBE_CAP. Terms that only a scan can answer (free text, substrings) are probed only when no
   indexed term is under the cap. The ids of the terms under their cap are intersected, and
   drive the search (``queue_id IN (ids)``, then a sort of those few); the other terms filter.
2. When no term is under the cap (only common terms), the search walks messages newest first
   by received_at, checking each term (EXISTS), and stops at the page's end; the count stops
   at COUNT_CAP + 1 matches.

On SQLite, which index each mode may use is pinned (``+ 0``, ``|| ''``): it has no statistics
to tell a common value from a rare one, and would otherwise sort every message of a common
tag. PostgreSQL plans by its statistics, so there the columns stay bare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from relay.model import SearchPage
from relay.search import Query, Term
from relay.store import log as event_log
from relay.store.schema import events, message_tags, messages, recipients

COUNT_CAP = 10_000
PROBE_CAP = 50_000  # a term with more matches is common: walking newest first finds a page sooner
FEW = 100  # probes that narrow it down to this few messages end the probing
SCAN_IDS = 5000  # a table scan's probe (free text, substrings) keeps this many ids at most
MAX_PARAMS = 30_000  # ids bound as parameters: below SQLite's (32766) and asyncpg's (32767) limit
# Events whose details carry a classify() reason.
REASON_EVENTS = ("bounced", "deferred", "expired", "complained")

m, r, e, t = messages, recipients, events, message_tags


@dataclass(frozen=True, slots=True)
class _Planned:
    term: Term
    probe: sa.Select[tuple[str]] | None  # the term's queue ids, when it may drive
    indexed: bool  # the probe reads an index (cheap); else it scans a table


def like(value: str) -> str:
    """A LIKE pattern for a substring, with the user's % _ and \\ taken literally."""
    return "%" + value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class _fold(FunctionElement[str]):
    """lower(x) for a LIKE: on SQLite, x as it is, since its LIKE ignores ASCII case already and
    its lower() folds nothing else; skipping it saves a string per row of a scan."""

    type = sa.Text()
    name = "fold"
    inherit_cache = True


@compiles(_fold)
def _fold_default(element: _fold, compiler: SQLCompiler, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(_fold, "sqlite")
def _fold_sqlite(element: _fold, compiler: SQLCompiler, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


class _pinned(FunctionElement[Any]):
    """A column hidden from SQLite's index choice (``x || ''``, ``x + 0``): inside EXISTS the
    lookup must go by queue id, never by (say) the status index, which would read every
    delivered recipient. Elsewhere the column as it is: PostgreSQL chooses by its statistics,
    which a pin would only blind (a tag search took 1.5 s pinned, 0.26 s not, at a million)."""

    name = "pinned"
    inherit_cache = True

    def __init__(self, column: sa.ColumnElement[Any]) -> None:
        super().__init__(column)
        self.type = column.type


@compiles(_pinned)
def _pinned_default(element: _pinned, compiler: SQLCompiler, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_pinned, "sqlite")
def _pinned_sqlite(element: _pinned, compiler: SQLCompiler, **kw: Any) -> str:
    pin = "+ 0" if isinstance(element.type, sa.Float | sa.Integer) else "|| ''"
    return f"({compiler.process(element.clauses, **kw)} {pin})"


def _pin(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return _pinned(column)


def _rcpt(*where: sa.ColumnElement[bool]) -> sa.Exists:
    return sa.exists().where(r.c.queue_id == m.c.queue_id, *where)


def _event(*where: sa.ColumnElement[bool]) -> sa.Exists:
    return sa.exists().where(e.c.queue_id == m.c.queue_id, *where)


def _reason_is(value: str) -> sa.ColumnElement[bool]:
    return sa.and_(e.c.type.in_(REASON_EVENTS), e.c.details["reason"].as_string() == value)


def _reason_pinned(value: str) -> sa.ColumnElement[bool]:
    return sa.and_(_pin(e.c.type).in_(REASON_EVENTS), e.c.details["reason"].as_string() == value)


def condition(term: Term, *, scan: bool) -> sa.ColumnElement[bool]:  # noqa: PLR0911, PLR0912 -- one case per operator
    """The term as a condition on a messages row (without its negation). ``scan``: the search
    walks received_at, so the term must not pull the planner onto another index."""
    v = term.value
    received = m.c.received_at if scan else _pin(m.c.received_at)
    match term.op:
        case "to":
            if term.exact:
                return _rcpt(sa.func.lower(_pin(r.c.address)) == v)
            return _rcpt(_fold(_pin(r.c.address)).like(like(v), escape="\\"))
        case "from":
            if term.exact:
                return sa.func.lower(m.c.mail_from + "" if scan else m.c.mail_from) == v
            return _fold(m.c.mail_from).like(like(v), escape="\\")
        case "subject":
            return _fold(m.c.subject).like(like(v), escape="\\")
        case "message-id":
            return m.c.message_id == v
        case "id":
            return m.c.queue_id == v
        case "tag":
            return sa.exists().where(t.c.queue_id == m.c.queue_id, _pin(t.c.tag) == v)
        case "status":
            return _rcpt(_pin(r.c.status) == v)
        case "reason":
            return _event(_reason_pinned(v))
        case "domain":
            return _rcpt(_pin(r.c.domain) == v)
        case "user":
            return sa.func.coalesce(m.c.username, "") == v  # no user: not app's, for -user:app
        case "after":
            assert term.at is not None
            return received >= term.at
        case "before":
            assert term.at is not None
            return received < term.at
        case "is":
            if v == "suppressed":
                return _rcpt(_pin(r.c.status) == "suppressed")
            return _event(_pin(e.c.type) == v)
        case "text":
            return sa.or_(
                _fold(m.c.subject).like(like(v), escape="\\"),
                _rcpt(_fold(_pin(r.c.address)).like(like(v), escape="\\")),
            )
    raise AssertionError(term.op)  # pragma: no cover


def _plan(term: Term, dialect: str) -> _Planned:  # noqa: PLR0912 -- one case per operator
    """The term's probe: a statement of its queue ids, indexed or not; None when it cannot drive."""
    v = term.value
    if term.negated or term.op in ("after", "before"):
        return _Planned(term, None, False)
    probe: sa.Select[tuple[str]] | None = None
    indexed = True
    match term.op:
        case "to":
            if term.exact:
                probe = sa.select(r.c.queue_id).where(sa.func.lower(r.c.address) == v)
            elif (domain := v[1:]) and v.startswith("@") and "@" not in domain and dialect == "sqlite":
                # to:@example.com: the domain index narrows it (addresses are stored with their
                # domain lower-cased), the substring decides. SQLite compares bytes; PostgreSQL
                # text under a locale's collation would not keep the prefix's range contiguous.
                probe = sa.select(r.c.queue_id).where(
                    r.c.domain >= domain,
                    r.c.domain < domain + "\U0010ffff",
                    _fold(r.c.address).like(like(v), escape="\\"),
                )
            else:
                probe, indexed = (
                    sa.select(r.c.queue_id).where(_fold(r.c.address).like(like(v), escape="\\")),
                    False,
                )
        case "from" if term.exact:
            probe = sa.select(m.c.queue_id).where(sa.func.lower(m.c.mail_from) == v)
        case "message-id" | "id":
            probe = sa.select(m.c.queue_id).where(condition(term, scan=False))
        case "user":
            probe = sa.select(m.c.queue_id).where(m.c.username == v)
        case "tag":
            probe = sa.select(t.c.queue_id).where(t.c.tag == v)
        case "status":
            probe = sa.select(r.c.queue_id).where(r.c.status == v)
        case "domain":
            probe = sa.select(r.c.queue_id).where(r.c.domain == v)
        case "reason":
            probe = sa.select(e.c.queue_id).where(_reason_is(v))
        case "is":
            if v == "suppressed":
                probe = sa.select(r.c.queue_id).where(r.c.status == "suppressed")
            else:
                probe = sa.select(e.c.queue_id).where(e.c.type == v)
        case "subject" | "from":
            probe, indexed = sa.select(m.c.queue_id).where(condition(term, scan=False)), False
        case "text":
            pattern = like(v)
            probe = sa.select(m.c.queue_id).where(_fold(m.c.subject).like(pattern, escape="\\"))
            probe = probe.union_all(sa.select(r.c.queue_id).where(_fold(r.c.address).like(pattern, escape="\\")))  # type: ignore[assignment]
            indexed = False
    return _Planned(term, probe, indexed)


@dataclass(slots=True)
class _Drive:
    """What the probes found: conditions on queue_id for the terms they cover (no need to
    check those again), and how many messages can match at most (None: every term is common)."""

    conds: list[sa.ColumnElement[bool]]
    covered: set[Term]
    fewest: int | None = None


def _driver(conn: Connection, planned: Sequence[_Planned]) -> _Drive:
    """Probe the terms (see the module's docstring): the ids of every indexed term with at most
    PROBE_CAP matches, intersected here (cheaper than any join the planner might pick); a table
    scan's probe only when no indexed term is under the cap, keeping at most SCAN_IDS."""
    ids: set[str] | None = None
    sizes: list[tuple[int, _Planned]] = []
    for indexed, cap in ((True, PROBE_CAP), (False, SCAN_IDS)):
        if not indexed and ids is not None:
            break  # scanning a table to find a smaller set costs more than filtering this one
        for p in planned:
            if p.probe is None or p.indexed is not indexed:
                continue
            rows = conn.scalars(p.probe.limit(cap + 1)).all()
            if len(rows) > cap:  # rows, not distinct ids, say whether it stopped at its limit
                continue
            found = {str(i) for i in rows}
            ids = found if ids is None else ids & found
            sizes.append((len(found), p))
            if len(ids) <= FEW:
                break  # a handful of messages: filtering them beats any other probe
    if ids is None:
        return _Drive([], set())
    if len(ids) <= MAX_PARAMS:
        cond = m.c.queue_id.in_(sa.bindparam("ids", sorted(ids), expanding=True))
        return _Drive([cond], {p.term for _, p in sizes}, len(ids))
    n, smallest = min(sizes, key=lambda size: size[0])  # too many to bind: its subquery drives
    assert smallest.probe is not None
    return _Drive([m.c.queue_id.in_(smallest.probe)], {smallest.term}, n)


def run(conn: Connection, query: Query, *, limit: int, after: tuple[float, str] | None, count: bool) -> SearchPage:
    """One page of the messages matching ``query``, newest first, with the capped count."""
    planned = [_plan(term, conn.dialect.name) for term in query.terms]
    drive = _driver(conn, planned)
    if drive.fewest == 0:
        return SearchPage(messages=(), total=0 if count else -1, total_capped=False, next=None)
    scan = drive.fewest is None
    conds = list(drive.conds)
    for term in query.terms:
        if term in drive.covered:
            continue
        cond = condition(term, scan=scan)
        conds.append(sa.not_(cond) if term.negated else cond)
    received = m.c.received_at if scan else _pin(m.c.received_at)
    page_conds = list(conds)
    if after is not None:
        at, last = after
        page_conds.append(sa.or_(received < at, sa.and_(received == at, m.c.queue_id < last)))
    stmt = (
        sa.select(m.c.queue_id, m.c.received_at)
        .where(*page_conds)
        .order_by(received.desc(), m.c.queue_id.desc())
        .limit(limit + 1)
    )
    views, more = event_log.search_page(conn, stmt, limit)
    total, capped = -1, False
    if count:
        inner = sa.select(sa.literal(1).label("one")).select_from(m).where(*conds).limit(COUNT_CAP + 1).subquery()
        total = int(conn.scalar(sa.select(sa.func.count()).select_from(inner)) or 0)
        total, capped = min(total, COUNT_CAP), total > COUNT_CAP
    return SearchPage(messages=tuple(views), total=total, total_capped=capped, next=more)
