"""``relay db copy --to URL``: move the configured SQLite store into an empty PostgreSQL (or
SQLite) store, for the day one node is not enough. Registered by relay.cli.

Every refusal is one line and exit 2, before anything is written: a target that is not a store
URL, cannot be reached or holds rows already, the source itself, a source not at the newest
schema. After the copy, the rows of every table are counted on both sides and the hash chains
verified on the target; any difference is exit 1. URLs are printed with their password masked.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import config as config_mod
from relay.errors import ConfigError, Conflict, StoreError

if TYPE_CHECKING:
    from relay.logstore import LogStore

log = logging.getLogger(__name__)


def add_parsers(db_sub: Any, common: argparse.ArgumentParser) -> None:
    cp = db_sub.add_parser(
        "copy",
        parents=[common],
        help="copy this store (SQLite) into an empty PostgreSQL store; stop Relay first",
        description="Copy every message, event, user, suppression, case and audit line of the configured SQLite "
        "store into the empty store at --to (migrated first), ids kept, in one transaction. Stop Relay first: "
        "what it accepts after the copy started is not copied.",
    )
    cp.add_argument("--to", required=True, metavar="URL", help="postgresql+asyncpg://USER:PASSWORD@HOST/DB")


def copy(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """The command: refusals raise CommandError (exit 2); differences after the copy return 1."""
    import asyncio

    return asyncio.run(_copy(cfg.store.url, _target_url(args.to)))


def _target_url(text: str) -> str:
    """``--to`` as [store] url would take it (postgresql:// means asyncpg); never echoed with
    its password."""
    from relay.cli import CommandError
    from relay.logstore import display_url

    try:
        url = config_mod.from_mapping({"store": {"url": text.strip()}}, {}).store.url
        shown = display_url(url)
    except (ConfigError, ValueError) as exc:
        raise CommandError("--to: expected a postgresql+asyncpg:// or sqlite+aiosqlite:// URL", 2) from exc
    if url.startswith("sqlite") and _sqlite_path(url) is None:
        raise CommandError(f"--to: {shown} names no file: an in-memory store would keep nothing", 2)
    return url


def _sqlite_path(url: str) -> Path | None:
    from relay.logstore import sqlite_file

    return sqlite_file(url)


async def _copy(source_url: str, target_url: str) -> int:
    from relay.cli import CommandError
    from relay.logstore import LogStore, display_url

    source_file, target_file = _sqlite_path(source_url), _sqlite_path(target_url)
    if source_file is None:
        raise CommandError(f"the store at {display_url(source_url)} is not SQLite: only a SQLite store is copied", 2)
    if not source_file.is_file():
        raise CommandError(f"no store at {source_file} (use --config or RELAY_CONFIG)", 2)
    if target_file is not None and _same_file(source_file, target_file):
        raise CommandError(f"--to names the store itself ({source_file})", 2)
    source = await LogStore.open(source_url)
    try:
        state = await source.schema_state()
        if state != "current":
            advice = {
                "behind": 'the store is older than this relay: run "relay db upgrade" first',
                "ahead": "the store was upgraded by a newer relay: run that version",
            }
            raise CommandError(advice.get(state, f"no store at {source_file}"), 2)
    finally:
        await source.close()
    if target_file is not None and not target_file.is_file() and not target_file.parent.is_dir():
        raise CommandError(f"--to: no directory {target_file.parent}", 2)
    target = await LogStore.open(target_url)
    try:
        return await _copy_into(target, source_url, target_url)
    finally:
        await target.close()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


async def _copy_into(target: LogStore, source_url: str, target_url: str) -> int:
    from relay.cli import CommandError
    from relay.logstore import display_url

    shown = display_url(target_url)
    try:
        before = await target.copy_preflight()
    except StoreError as exc:
        raise CommandError(f"--to: {exc}", 2) from exc
    if before.state == "missing" and target_url.startswith("postgresql") and not await _reachable(target):
        name = target_url.rsplit("/", 1)[-1].split("?", 1)[0]
        raise CommandError(f'--to: the database does not exist at {shown}: create it first ("createdb {name}")', 2)
    if before.state == "missing" and before.tables:
        names = ", ".join(before.tables[:5]) + (", ..." if len(before.tables) > 5 else "")
        raise CommandError(f"--to: the database at {shown} holds other tables ({names}): copy into an empty one", 2)
    if before.state == "ahead":
        raise CommandError(f"--to: the store at {shown} was upgraded by a newer relay", 2)
    if before.rows:
        held = ", ".join(f"{name}: {n:,}" for name, n in before.rows.items())
        raise CommandError(f"--to: the store at {shown} holds rows already ({held}): copy only into an empty store", 2)

    print(f"copying {display_url(source_url)}\n     to {shown}")
    print("Stop Relay before copying: what it accepts after the copy starts is not copied.", flush=True)
    started = time.monotonic()
    try:
        copied = await target.copy_from(source_url, _progress())
    except Conflict as exc:  # a store filled between the check and the copy
        raise CommandError(f"--to: {exc}", 2) from exc
    elapsed = time.monotonic() - started
    after = await target.copy_counts()
    report = await target.verify_chains()
    return _report(copied.source, after, report.ok, report.text(), elapsed)


async def _reachable(target: LogStore) -> bool:
    try:
        await target.ping()
    except StoreError:
        return False
    return True


def _progress() -> Callable[[str, int, int], None]:
    """A line on stderr every 5 s while a big table is copied; the table of counts comes at the end."""
    last = [time.monotonic()]

    def progress(table: str, written: int, total: int) -> None:
        now = time.monotonic()
        if written < total and now - last[0] >= 5:
            print(f"  {table}: {written:,} of {total:,} rows...", file=sys.stderr, flush=True)
            last[0] = now

    return progress


def _report(source: Mapping[str, int], target: Mapping[str, int], chains_ok: bool, chains: str, elapsed: float) -> int:
    from relay.store.copy import SKIPPED  # the reasons only; the SQL stays in relay.store

    differ = [name for name in source if source[name] != target.get(name)]
    print(f"\n{'table':<20} {'source':>12} {'target':>12}")
    for name, n in source.items():
        mark = "  DIFFERENT" if name in differ else ""
        print(f"{name:<20} {n:>12,} {target.get(name, 0):>12,}{mark}")
    print("not copied: " + "; ".join(f"{name} ({why})" for name, why in SKIPPED.items()))
    print(f"audit verify on the target: {chains}")
    if differ or not chains_ok:
        what = f"row counts differ ({', '.join(differ)})" if differ else "the hash chains do not verify"
        print(f"relay: copy finished but {what}: do not switch to the target", file=sys.stderr)
        return 1
    total = sum(source.values())
    print(f"copied {total:,} rows in {elapsed:.1f} s.")
    print("Point [store] url (or RELAY_STORE_URL) at the target and start Relay there.")
    return 0
