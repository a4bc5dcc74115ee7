"""The console's dashboard: the last hour's and day's figures, queue depth and a per-tag table,
from the stats queries (events has an index on (type, at), so a day is cheap at any size)."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.model import ACTIVE_STATES, Dashboard, DashboardWindow, StatsRow, TagRow
from relay.store import log as event_log
from relay.store import statements as q
from relay.store.schema import messages, recipients

HOUR, DAY = 3600.0, 86400.0
# When the oldest message with a recipient in the queue (held ones too) arrived: by the status
# index, a few thousand rows, where next_attempt_at IS NOT NULL would read every recipient.
OLDEST_ACTIVE = sa.select(sa.func.min(messages.c.received_at)).where(
    messages.c.queue_id.in_(sa.select(recipients.c.queue_id).where(recipients.c.status.in_(ACTIVE_STATES)))
)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _window(conn: Connection, now: float, seconds: float) -> DashboardWindow:
    # Grouped by user, each message is in exactly one row: the sums are the totals (by tag, a
    # message with two tags would count twice).
    rows = event_log.stats(conn, now - seconds, now, "user", latencies=False)
    return DashboardWindow(
        seconds=seconds,
        received=sum(r.received for r in rows),
        delivered=sum(r.delivered for r in rows),
        deferred=sum(r.deferred for r in rows),
        bounced=sum(r.bounced for r in rows),
        complained=sum(r.complained for r in rows),
    )


def tag_rows(rows: Sequence[StatsRow]) -> tuple[TagRow, ...]:
    out = [
        TagRow(
            tag=r.group, received=r.received, delivered=r.delivered, bounced=r.bounced, opened=r.unique_opens,
            opened_machine=r.unique_opens_machine, clicked=r.unique_clicks, clicked_machine=r.unique_clicks_machine,
            delivery_rate=_rate(r.delivered, r.delivered + r.bounced + r.expired),
            open_rate=_rate(r.unique_opens, r.delivered), open_rate_machine=_rate(r.unique_opens_machine, r.delivered),
            click_rate=_rate(r.unique_clicks, r.delivered),
            click_rate_machine=_rate(r.unique_clicks_machine, r.delivered),
        )
        for r in rows
    ]  # fmt: skip
    return tuple(sorted(out, key=lambda row: (-row.received, row.tag is None, row.tag or "")))


def dashboard(conn: Connection, now: float) -> Dashboard:
    depth = dict.fromkeys(ACTIVE_STATES, 0)
    for state, n in conn.execute(q.COUNT_ACTIVE_BY_STATUS):
        depth[state] = n
    oldest = conn.scalar(OLDEST_ACTIVE)
    return Dashboard(
        at=now,
        hour=_window(conn, now, HOUR),
        day=_window(conn, now, DAY),
        queue=depth,
        oldest_queued_age=None if oldest is None else round(max(0.0, now - oldest), 3),
        tags=tag_rows(event_log.stats(conn, now - DAY, now, "tag", latencies=False)),
    )
