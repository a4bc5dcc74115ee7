"""What delivery tests share: a config that delivers to sinks through the test DNS server,
submitting a message, and waiting for its attempts and final states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import make_config, queue_id_of, send, smtp_client, wait_for
from helpers.peers import Zone
from relay.model import MessageView
from relay.service.lifecycle import Relay

MSG = b"From: app@example.com\r\nSubject: Hi\r\n\r\nHello\r\n"


def delivery_config(tmp_path: Path, zone: Zone, port: int, **extra: Any) -> Any:
    sections: dict[str, Any] = {
        "delivery": {"port": port, "retry_schedule": ["200ms"], "connect_timeout": "2s", "command_timeout": "5s",
                     "lease": "30s", "shutdown_grace": "2s"},
        "dns": {"nameservers": [f"127.0.0.1:{zone.port}"], "timeout": "1s"},  # type: ignore[attr-defined]
    }  # fmt: skip
    for key, value in extra.items():
        sections.setdefault(key, {}).update(value) if isinstance(value, dict) else sections.__setitem__(key, value)
    return make_config(tmp_path, **sections)


async def submit(relay: Relay, rcpts: list[str], data: bytes = MSG) -> str:
    async with smtp_client(relay) as client:
        code, text = await send(client, "app@example.com", rcpts, data)
    assert code == 250, text
    return queue_id_of(text)


async def final(relay: Relay, qid: str, timeout: float = 15.0) -> MessageView:
    """Wait until every recipient of the message is in a final state."""
    assert relay.store is not None
    store = relay.store

    async def done() -> MessageView | None:
        (msg,) = await store.lookup(qid)
        return msg if all(r.status not in ("queued", "deferred", "sending") for r in msg.recipients) else None

    return await wait_for(done, timeout)


def status(msg: MessageView) -> dict[str, str]:
    return {r.address: r.status for r in msg.recipients}


def attempts(msg: MessageView, address: str | None = None) -> list[dict[str, Any]]:
    kinds = {"delivered", "deferred", "bounced", "expired"}
    return [
        dict(e.details, type=e.type)
        for e in msg.events
        if e.type in kinds and (address is None or e.recipient == address)
    ]


async def first_attempt(relay: Relay, qid: str) -> MessageView:
    """Wait until the message's first attempt is logged."""
    assert relay.store is not None
    store = relay.store

    async def tried() -> MessageView | None:
        (m,) = await store.lookup(qid)
        return m if attempts(m) else None

    return await wait_for(tried)
