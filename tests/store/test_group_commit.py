"""Group commit under expected errors, on SQLite and PostgreSQL: an operation that fails with
NotFound or Conflict fails alone; everything that shared its transaction still commits together."""

from __future__ import annotations

import asyncio
import logging

import pytest
import store_fixtures
from store_fixtures import message

from relay.errors import Conflict, NotFound
from relay.logstore import LogStore

store, url = store_fixtures.store, store_fixtures.url  # the fixtures, on both backends


async def test_an_expected_error_does_not_roll_back_the_shared_commit(
    store: LogStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await store.add_user("app", "scrypt$x")
    caplog.set_level(logging.WARNING, logger="relay.store.engine")
    # All submitted in one go, so the writer applies them in one shared transaction.
    results = await asyncio.gather(
        *(store.enqueue(message(f"01G{i:03d}")) for i in range(10)),
        store.retry("01UNKNOWNMESSAGE00000000000"),  # an API retry of an unknown id
        store.add_user("app", "scrypt$y"),  # a user that exists
        store.cancel("01ALSOUNKNOWN0000000000000"),
        *(store.enqueue(message(f"01H{i:03d}")) for i in range(10)),
        return_exceptions=True,
    )
    assert results[:10] == [None] * 10
    assert isinstance(results[10], NotFound)
    assert isinstance(results[11], Conflict)
    assert isinstance(results[12], NotFound)
    assert results[13:] == [None] * 10
    assert "retrying each alone" not in caplog.text  # the batch committed as one
    summary = await store.queue_summary()
    assert summary.counts["queued"] == 20
    assert await store.password_hash("app") == "scrypt$x"
