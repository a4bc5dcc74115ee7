"""`relay nodes`: the nodes registered in the store (several Relay processes on one PostgreSQL
database), with their heartbeats. Registered by relay.cli; this module holds its parser and
handler."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from relay.model import Node, iso

if TYPE_CHECKING:
    from relay.logstore import LogStore

log = logging.getLogger(__name__)

COLUMNS = ("NAME", "HOST", "VERSION", "STARTED", "LAST HEARTBEAT", "IN-FLIGHT", "STATE")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    nodes = sub.add_parser(
        "nodes", parents=[common], help="the nodes delivering from this store: heartbeats, in-flight, alive or dead"
    )
    nodes.add_argument("--json", action="store_true", help="print JSON")


def age(seconds: float) -> str:
    """A heartbeat's age, short: 0.4s, 12s, 5m, 3h, 2d."""
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s ago"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def rows(nodes: list[Node], now: float) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for n in nodes:
        state = str(n.to_json(now)["state"])
        started = (iso(n.started_at) or "")[:19].replace("T", " ")
        out.append((n.name, n.host, n.version, started, age(now - n.heartbeat_at), str(n.in_flight), state))
    return out


async def nodes(store: LogStore, args: argparse.Namespace) -> int:
    from relay.cli import _printable

    found = await store.nodes()
    now = time.time()
    if args.json:
        print(json.dumps([n.to_json(now) for n in found], indent=2, ensure_ascii=False))
        return 0
    if not found:
        print("no nodes registered (nodes register when `relay serve` delivers)")
        return 0
    table = [COLUMNS, *rows(found, now)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for r in table:
        print(_printable("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()))
    return 0
