"""LogStore.dashboard on SQLite and PostgreSQL, over the search tests' seed."""

from __future__ import annotations

from conftest import DAY, NOW

from relay.logstore import LogStore
from relay.model import DashboardWindow


async def test_dashboard(store: LogStore) -> None:
    at = NOW + 60  # clear of the seed's exact hour boundary
    board = await store.dashboard(now=at)
    assert board.at == at
    assert board.hour == DashboardWindow(3600.0, received=2, delivered=1, deferred=0, bounced=0, complained=0)
    assert board.day == DashboardWindow(DAY, received=5, delivered=3, deferred=0, bounced=0, complained=1)
    assert board.day.complaint_rate == 1 / 3
    assert board.hour.complaint_rate == 0
    assert dict(board.queue) == {"queued": 0, "deferred": 1, "sending": 0, "held": 1}
    assert board.oldest_queued_age == 10 * DAY + 60
    assert [(r.tag, r.received) for r in board.tags] == [("welcome", 3), ("promo", 1), (None, 1)]
    welcome = board.tags[0]
    assert (welcome.delivered, welcome.opened, welcome.opened_machine, welcome.clicked) == (3, 1, 1, 1)
    assert (welcome.delivery_rate, welcome.open_rate, welcome.open_rate_machine) == (1.0, 0.3333, 0.3333)
    assert (welcome.click_rate, welcome.click_rate_machine) == (0.3333, 0.0)
    promo = board.tags[1]
    assert (promo.delivered, promo.delivery_rate, promo.open_rate) == (0, None, None)


async def test_empty_store(store: LogStore) -> None:
    board = await store.dashboard(now=NOW - 100 * DAY)  # before anything was received
    assert board.hour.received == board.day.received == 0
    assert board.day.complaint_rate is None
    assert board.tags == ()
