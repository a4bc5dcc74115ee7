"""``relay serve|db|log|queue|users``: argument parsing, then a call into the modules."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

from relay import config as config_mod
from relay.errors import ConfigError, Conflict, NotFound, RelayError, StoreError
from relay.model import MessageView, iso

T = TypeVar("T")
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    config_help = "TOML file (default: $RELAY_CONFIG, else built-in defaults)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)

    p = argparse.ArgumentParser(prog="relay", description="A transactional SMTP relay with a searchable delivery log.")
    p.add_argument("--config", metavar="PATH", default=None, help=config_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the relay")
    serve.add_argument(
        "--processes", type=int, default=1, metavar="N", help="worker processes sharing the listeners (default 1)"
    )

    db = sub.add_parser("db", parents=[common], help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", parents=[common], help="apply migrations up to the newest")

    lg = sub.add_parser("log", parents=[common], help="a message's timeline by queue id, Message-ID or recipient")
    lg.add_argument("query", help="queue id, Message-ID (with or without <>), or recipient address")
    lg.add_argument("--json", action="store_true", help="print JSON")
    lg.add_argument("--limit", type=int, default=20, help="at most this many messages (default 20)")

    q = sub.add_parser("queue", parents=[common], help="queue counts and control")
    q_sub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    retry = q_sub.add_parser("retry", parents=[common], help="make deferred recipients due now")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="queue id")
    target.add_argument("--all", action="store_true", help="every deferred recipient")
    delete = q_sub.add_parser("delete", parents=[common], help="cancel a message's pending recipients")
    delete.add_argument("id", help="queue id")

    u = sub.add_parser("users", parents=[common], help="SMTP AUTH users")
    u_sub = u.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = u_sub.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument(
        "--password-stdin", action="store_true", required=True, help="read the password from standard input"
    )
    u_sub.add_parser("list", parents=[common], help="list users")
    rm = u_sub.add_parser("remove", parents=[common], help="remove a user")
    rm.add_argument("name")
    return p


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config or os.environ.get("RELAY_CONFIG") or None)
    except ConfigError as exc:
        _fail(f"config error: {exc}", 2)
    try:
        code = _dispatch(args, cfg)
    except (StoreError, RelayError) as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _fail(message: str, code: int) -> NoReturn:
    print(f"relay: {message}", file=sys.stderr)
    sys.exit(code)


def _dispatch(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from relay import logs

    if args.command == "serve":
        logs.setup()
        if args.processes < 1:
            _fail("--processes must be at least 1", 2)
        return _serve(cfg, args.processes)
    logs.setup(logging.WARNING)
    commands: dict[str, Callable[[Any, argparse.Namespace], Awaitable[int]]] = {
        "db": _db,
        "log": _log,
        "queue": _queue,
        "users": _users,
    }
    return asyncio.run(_with_store(cfg, args, commands[args.command]))


def _serve(cfg: config_mod.Config, processes: int) -> int:
    """A start that fails says why in one line on stderr and exits 1, having started nothing:
    every listener is bound before the store opens, and delivery starts last."""
    from relay import listeners

    try:
        sockets = listeners.prepare(cfg)
        if processes > 1:
            from relay import workers  # before anything imports prometheus_client: see relay.metrics

            return workers.serve(cfg, processes, sockets)
        from relay import server

        return server.run(
            lambda: server.serve(
                cfg, smtp_sockets=sockets.smtp, http_sockets=sockets.http, tracking_sockets=sockets.tracking
            )
        )
    except RelayError as exc:
        _fail((str(exc).strip().splitlines() or [type(exc).__name__])[0], 1)


async def _with_store(
    cfg: config_mod.Config, args: argparse.Namespace, fn: Callable[[Any, argparse.Namespace], Awaitable[int]]
) -> int:
    from relay.logstore import LogStore

    store = await LogStore.open(cfg.store.url)
    try:
        await store.upgrade()
        return await fn(store, args)
    finally:
        await store.close()


async def _db(store: Any, args: argparse.Namespace) -> int:
    print("schema is up to date")  # _with_store has upgraded it
    return 0


async def _log(store: Any, args: argparse.Namespace) -> int:
    found: list[MessageView] = await store.lookup(args.query, limit=max(1, args.limit))
    if not found:
        print(f"relay: no message matches {args.query!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"messages": [m.to_json() for m in found]}, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_timeline(m) for m in found))
    return 0


def _local(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def format_timeline(m: MessageView) -> str:
    lines = [
        f"{m.id}  <{m.message_id}>",
        f"  from     {m.mail_from}",
        f"  subject  {m.subject}",
        f"  size     {m.size} bytes   client {m.client_ip}   user {m.user or '-'}"
        + (f"   tags {', '.join(m.tags)}" if m.tags else ""),
        "  recipients:",
    ]
    for r in m.recipients:
        nxt = f"  next attempt {_local(r.next_attempt_at)}" if r.next_attempt_at is not None else ""
        lines.append(f"    {r.address:<40} {r.status:<10} attempts {r.attempts}{nxt}")
        if r.last_response:
            lines.append(f"      last reply: {r.last_response}")
    lines.append("  timeline:")
    for e in m.events:
        lines.append(f"    {_local(e.at)}  {e.type:<10} {e.recipient or ''}".rstrip())
        detail = _describe(e.type, dict(e.details))
        if detail:
            lines.append(f"        {detail}")
    return "\n".join(lines)


def _describe(kind: str, d: dict[str, Any]) -> str:
    if kind == "received":
        parts = [f"from {d.get('client_ip')}", f"helo {d.get('helo')}", str(d.get("protocol", ""))]
        if d.get("user"):
            parts.append(f"user {d['user']}")
        if d.get("tls"):
            parts.append(str(d["tls"]))
        return ", ".join(p for p in parts if p)
    if "attempt" in d:
        where = f"{d.get('mx_host') or '-'} [{d.get('ip') or '-'}]:{d.get('port') or '-'}"
        code = " ".join(str(x) for x in (d.get("code"), d.get("enhanced_code")) if x)
        tls = "no TLS" if d.get("tls") in (None, "none") else d["tls"]
        text = f"attempt {d['attempt']} via {where} ({tls}, {d.get('duration_ms')} ms): {code} {d.get('reply', '')}"
        lines = [text.rstrip()]
        lines += [f"(tried first: {t})" for t in d.get("tried", ())]
        if d.get("next_attempt_at"):
            lines.append(f"next attempt {d['next_attempt_at']}")
        return "\n        ".join(lines)
    return ", ".join(f"{k}={v}" for k, v in d.items() if v not in (None, ""))


async def _queue(store: Any, args: argparse.Namespace) -> int:
    if args.queue_command == "retry":
        n = await store.retry(None if args.all else args.id, by="cli")
        print(f"{n} recipient(s) due now")
        return 0
    if args.queue_command == "delete":
        try:
            n = await store.cancel(args.id, by="cli")
        except NotFound as exc:
            print(f"relay: {exc}", file=sys.stderr)
            return 1
        print(f"{n} recipient(s) cancelled" if n else "nothing to cancel: every recipient is final already")
        return 0
    summary = await store.queue_summary()
    width = max(len(k) for k in summary.counts)
    for state, count in summary.counts.items():
        print(f"{state:<{width}}  {count}")
    age = "-" if summary.oldest_queued_at is None else f"{time.time() - summary.oldest_queued_at:.0f}s"
    print(f"oldest queued message: {age}")
    return 0


async def _users(store: Any, args: argparse.Namespace) -> int:
    from relay.auth import USERNAME, hash_password

    if args.users_command == "add":
        if not USERNAME.match(args.name):
            print("relay: a user name is 1-128 of A-Z a-z 0-9 . _ @ + -", file=sys.stderr)
            return 2
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print("relay: empty password on standard input", file=sys.stderr)
            return 2
        try:
            await store.add_user(args.name, await asyncio.to_thread(hash_password, password))
        except Conflict as exc:
            print(f"relay: {exc}", file=sys.stderr)
            return 1
        print(f"added user {args.name}")
    elif args.users_command == "remove":
        try:
            await store.remove_user(args.name)
        except NotFound as exc:
            print(f"relay: {exc}", file=sys.stderr)
            return 1
        print(f"removed user {args.name}")
    else:
        for name, created in await store.list_users():
            print(f"{name}\t{iso(created)}")
    return 0
