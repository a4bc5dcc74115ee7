"""What the webhook tests share: endpoints as [[webhooks]] config, a fresh store on SQLite and
PostgreSQL that writes the outbox for them, a message to put in it, a dispatcher with a short
retry schedule."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import new_message, store_url

from relay import config as cfgmod
from relay.config import WebhookConfig
from relay.logstore import LogStore
from relay.webhooks import Dispatcher, RetrySchedule

SHORT = RetrySchedule(delays=(0.05, 0.05, 0.05), jitter=0.0)


def endpoints(*specs: dict[str, Any]) -> tuple[WebhookConfig, ...]:
    """[[webhooks]] tables, validated as Relay validates its config file."""
    return cfgmod.from_mapping({"webhooks": list(specs)}).webhooks


@pytest.fixture(params=["sqlite", "postgres"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with AsyncExitStack() as stack:
        yield await store_url(request.param, tmp_path / "relay.db", stack)


@asynccontextmanager
async def opened(url: str, hooks: Sequence[WebhookConfig]) -> AsyncIterator[LogStore]:
    store = await LogStore.open(url, webhooks=hooks)
    try:
        await store.upgrade()
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def dispatching(
    store: LogStore, hooks: Sequence[WebhookConfig], *, grace: float = 1.0, **kw: Any
) -> AsyncIterator[Dispatcher]:
    kw.setdefault("schedule", SHORT)
    kw.setdefault("poll", 0.05)
    d = Dispatcher(hooks, store, **kw)
    task = asyncio.get_running_loop().create_task(d.run())
    try:
        yield d
    finally:
        await d.shutdown(grace)
        await task


message = new_message  # the webhook tests' name for it
