"""`relay retention run [--dry-run] [--json]`: one retention pass now, as `relay serve` runs one
every few minutes, printing rows and bytes per kind. Registered by relay.cli; this module holds
its parser and handler."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.config import Config
    from relay.logstore import LogStore
    from relay.model import RetentionCount

log = logging.getLogger(__name__)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    rt = sub.add_parser("retention", parents=[common], help="delete what [retention] no longer keeps")
    rt_sub = rt.add_subparsers(dest="retention_command", required=True, metavar="ACTION")
    run = rt_sub.add_parser(
        "run", parents=[common], help="one pass now: rows and bytes deleted per kind (bodies, messages, ...)"
    )
    run.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    run.add_argument("--json", action="store_true", help="print JSON")
    run.add_argument("--batch", type=int, default=500, metavar="N", help="rows per transaction (default 500)")


def size(n: int) -> str:
    """Bytes for people: "0 B", "812 B", "3.4 KiB", "1.2 GiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _setting(cfg: Config, kind: str) -> str:
    from relay.store.retention import span

    keep = float(getattr(cfg.retention, kind))
    return "kept forever" if keep <= 0 else f"older than {span(keep)}"


async def run(store: LogStore, args: argparse.Namespace, cfg: Config) -> int:
    from relay.cli import CommandError

    if args.batch < 1:
        raise CommandError("--batch must be at least 1", 2)
    counts = await store.retention_run(
        cfg.retention, dry_run=args.dry_run, batch=args.batch, session_idle=cfg.console.session_idle
    )
    if counts is None:
        raise CommandError("another Relay process is purging now; try again in a while")
    if args.json:
        print(json.dumps(_json(counts, cfg, dry_run=args.dry_run), indent=2))
        return 0
    for c in counts:
        print(f"{c.kind:<20} {c.rows:>10,} rows {c.bytes:>16,} bytes ({size(c.bytes)})  {_setting(cfg, c.kind)}")
    if args.dry_run:
        print("dry run: nothing deleted")
    return 0


def _json(counts: list[RetentionCount], cfg: Config, *, dry_run: bool) -> dict[str, Any]:
    from relay.store.retention import span

    return {
        "dry_run": dry_run,
        "kinds": [
            {"kind": c.kind, "rows": c.rows, "bytes": c.bytes,
             "keep": span(float(getattr(cfg.retention, c.kind))) if getattr(cfg.retention, c.kind) > 0 else None}
            for c in counts
        ],
    }  # fmt: skip
