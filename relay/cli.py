"""``relay serve|db|log|queue|stats|users``: argument parsing, then a call into the modules.

Only ``serve`` and ``db upgrade`` create or upgrade a store; the other commands refuse to run
on a store that is missing or older than the code, so that a wrong --config never leaves an
empty database behind."""

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
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from relay import config as config_mod
from relay.errors import ConfigError, RelayError
from relay.model import ACTIVE_STATES, RETRY_ALL_STATES, RETRY_STATES, MessageView, QueueEntry, StatsRow, iso

if TYPE_CHECKING:
    from relay.logstore import LogStore  # imported when a command runs: `serve` and --help stay light

T = TypeVar("T")
log = logging.getLogger(__name__)


class CommandError(RelayError):
    """A command cannot do what was asked: ``main`` prints the message and exits with ``code``
    (2 for a usage problem, as argparse does; 1 otherwise)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


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
    ls = q_sub.add_parser(
        "list",
        parents=[common],
        help="one line per active recipient: queue id, age, recipient, state, attempts, next attempt, last reply",
    )
    ls.add_argument("--state", choices=ACTIVE_STATES, help="only recipients in this state")
    ls.add_argument("--domain", metavar="DOMAIN", help="only recipients at this domain")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N recipients (default 1000)")
    retry = q_sub.add_parser(
        "retry", parents=[common], help=f"make a message's {'/'.join(RETRY_STATES)} recipients due now"
    )
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="queue id")
    target.add_argument(
        "--all", action="store_true", help=f"every {'/'.join(RETRY_ALL_STATES)} recipient (never old bounces)"
    )
    delete = q_sub.add_parser("delete", parents=[common], help="cancel a message's pending recipients")
    delete.add_argument("id", help="queue id")

    st = sub.add_parser("stats", parents=[common], help="recipients delivered, deferred, bounced... per group")
    st.add_argument("--group-by", choices=("tag", "domain", "user"), default="tag", help="(default tag)")
    st.add_argument("--since", type=_when, metavar="TIME", help="ISO-8601 or epoch seconds (default: 24 hours ago)")
    st.add_argument("--until", type=_when, metavar="TIME", help="ISO-8601 or epoch seconds (default: now)")
    st.add_argument("--json", action="store_true", help="print the API's JSON")

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


def _when(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time or epoch seconds: {text!r}") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run one command. Commands raise; this prints ``relay: <message>`` on stderr and picks
    the exit code, once for all: 2 for the config or usage, 1 for any other RelayError."""
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config or os.environ.get("RELAY_CONFIG") or None)
    except ConfigError as exc:
        _fail(f"config error: {exc}", 2)
    try:
        code = _dispatch(args, cfg)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
    except BrokenPipeError:
        # `relay log ... | head -1`: the reader has what it wanted. Stop quietly, with the status
        # of a process killed by SIGPIPE; devnull keeps the final flush at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + 13
    except RelayError as exc:
        message = str(exc)
        if args.command == "serve":  # a failed start is one line: no traceback, nothing else
            message = (message.strip().splitlines() or [type(exc).__name__])[0]
        _fail(message, exc.code if isinstance(exc, CommandError) else 1)
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
            raise CommandError("--processes must be at least 1", 2)
        return _serve(cfg, args.processes)
    logs.setup(logging.WARNING)
    commands: dict[str, Callable[[LogStore, argparse.Namespace], Awaitable[int]]] = {
        "db": _db,
        "log": _log,
        "queue": _queue,
        "stats": _stats,
        "users": _users,
    }
    return asyncio.run(_with_store(cfg, args, commands[args.command]))


def _serve(cfg: config_mod.Config, processes: int) -> int:
    """A start that fails says why in one line on stderr and exits 1, having started nothing:
    every listener is bound before the store opens, and a step that fails after that stops what
    the steps before it started (relay.service.lifecycle)."""
    from relay.service import listeners

    sockets = listeners.prepare(cfg)
    if processes > 1:
        from relay.service import workers  # before anything imports prometheus_client: see relay.metrics

        return workers.serve(cfg, processes, sockets)
    from relay.service import lifecycle

    return lifecycle.run(
        lambda: lifecycle.serve(
            cfg,
            smtp_sockets=sockets.smtp,
            http_sockets=sockets.http,
            tracking_sockets=sockets.tracking,
            bounce_sockets=sockets.bounces,
        )
    )


async def _with_store(
    cfg: config_mod.Config, args: argparse.Namespace, fn: Callable[[LogStore, argparse.Namespace], Awaitable[int]]
) -> int:
    from relay.logstore import LogStore, display_url, sqlite_file

    url = cfg.store.url
    creates = args.command == "db"  # `db upgrade`, the one command here that may create the store
    file = sqlite_file(url)
    where = str(file) if file is not None else display_url(url)
    if not creates and file is not None and not file.is_file():  # before opening: that would create it
        raise CommandError(f"no store at {where} (use --config or RELAY_CONFIG)", 2)
    store = await LogStore.open(url)
    try:
        if creates:
            await store.upgrade()
        else:
            state = await store.schema_state()
            if state == "missing":
                raise CommandError(f"no store at {where} (use --config or RELAY_CONFIG)", 2)
            if state == "behind":
                raise CommandError('the store needs "relay db upgrade"', 2)
            if state == "ahead":
                raise CommandError("the store was upgraded by a newer relay: run that version", 2)
        return await fn(store, args)
    finally:
        await store.close()


async def _db(store: LogStore, args: argparse.Namespace) -> int:
    print("schema is up to date")  # _with_store has upgraded it
    return 0


async def _log(store: LogStore, args: argparse.Namespace) -> int:
    found = await store.lookup(args.query, limit=max(1, args.limit))
    if not found:
        raise CommandError(f"no message matches {args.query!r}")
    if args.json:
        from relay.http.schemas import messages_json  # the JSON shape only: pydantic, not FastAPI

        print(json.dumps(messages_json(found), indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_timeline(m) for m in found))
    return 0


def _local(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def format_timeline(m: MessageView) -> str:
    lines = [
        f"{m.queue_id}  <{m.message_id}>",
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
        if d.get("reason"):
            lines.append(_why(d))
        if d.get("next_attempt_at"):
            lines.append(f"next attempt {d['next_attempt_at']}")
        return "\n        ".join(lines)
    if kind == "suppressed" and isinstance(d.get("entry"), dict):
        entry = d["entry"]
        return f"on the suppression list: {entry.get('address')} ({entry.get('reason')}, by {entry.get('origin')}, " \
               f"since {entry.get('created_at')})"  # fmt: skip
    if d.get("async"):
        reply = str(d.get("reply") or "")
        what = reply if reply[:3].isdigit() else " ".join(str(x) for x in (d.get("code"), d.get("status"), reply) if x)
        head = f"report {d.get('report_id')} ({d.get('report')}{', ' + str(d['action']) if d.get('action') else ''})"
        if d.get("feedback_type"):
            agent, source = d.get("user_agent") or "-", d.get("source_ip") or "-"
            what = f"feedback type {d['feedback_type']}, from {agent}, source {source}"
        lines = [f"{head}: {what}".rstrip(": ")]
        if d.get("reason"):
            lines.append(_why(d))
        if d.get("note"):
            lines.append(str(d["note"]))
        return "\n        ".join(lines)
    return ", ".join(f"{k}={v}" for k, v in d.items() if v not in (None, ""))


def _why(d: dict[str, Any]) -> str:
    """A bounce's or deferral's classification, for support: the reason, hard or soft, the rule."""
    return f"reason {d.get('reason')} ({'hard' if d.get('hard') else 'soft'}), rule: {d.get('rule')}"


async def _queue(store: LogStore, args: argparse.Namespace) -> int:
    if args.queue_command == "list":
        return await _queue_list(store, args)
    if args.queue_command == "retry":
        n = await store.retry(None if args.all else args.id, by="cli")
        print(f"{n} recipient(s) due now")
        return 0
    if args.queue_command == "delete":
        n = await store.cancel(args.id, by="cli")
        print(f"{n} recipient(s) cancelled" if n else "nothing to cancel: every recipient is final already")
        return 0
    summary = await store.queue_summary()
    width = max(len(k) for k in summary.counts)
    for state, count in summary.counts.items():
        print(f"{state:<{width}}  {count}")
    age = "-" if summary.oldest_queued_at is None else f"{time.time() - summary.oldest_queued_at:.0f}s"
    print(f"oldest queued message: {age}")
    return 0


async def _queue_list(store: LogStore, args: argparse.Namespace) -> int:
    limit = max(1, args.limit)
    entries: list[QueueEntry] = await store.queue_list(state=args.state, domain=args.domain, limit=limit + 1)
    now = time.time()
    if args.json:
        print(json.dumps([e.to_json(now) for e in entries[:limit]], indent=2, ensure_ascii=False))
    else:
        for e in entries[:limit]:
            print(format_queue_entry(e, now))
    if len(entries) > limit:
        print(f"relay: showing the first {limit} recipients; use --limit for more", file=sys.stderr)
    return 0


def format_queue_entry(e: QueueEntry, now: float) -> str:
    """A line of `relay queue list`, in the spirit of Postfix mailq."""
    if e.next_attempt_at is None:
        nxt = "-"
    elif e.next_attempt_at <= now:
        nxt = "due now"
    else:
        nxt = "in " + _span(e.next_attempt_at - now)
    line = f"{e.queue_id}  {_span(now - e.received_at):>6}  {e.recipient:<32} {e.state:<8}  {e.attempts:>3}  {nxt:<10}"
    return f"{line}  {e.last_response or '-'}"


def _span(seconds: float) -> str:
    """A short duration: 45s, 12m, 3h05m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


async def _stats(store: LogStore, args: argparse.Namespace) -> int:
    until = time.time() if args.until is None else args.until
    since = until - 86400 if args.since is None else args.since
    if since > until:
        raise CommandError("--since must not be after --until", 2)
    rows: list[StatsRow] = await store.stats(since, until, args.group_by)
    if args.json:  # the object GET /api/v1/stats returns
        from relay.http import schemas

        doc = schemas.stats(since, until, args.group_by, rows).model_dump(mode="json")
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    print(f"{iso(since)} .. {iso(until)}, by {args.group_by}; counts are recipients, deferrals are attempts")
    head = ("group", "received", "delivered", "deferred", "deferrals", "bounced", "expired", "complained",
            "suppressed", "opens", "clicks", "p50 s")  # fmt: skip
    table = [head] + [
        (r.group or "-", *(str(n) for n in (r.received, r.delivered, r.deferred, r.deferrals, r.bounced, r.expired,
                                             r.complained, r.suppressed, r.unique_opens, r.unique_clicks)),
         "-" if r.latency_p50 is None else f"{r.latency_p50:g}")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return 0


async def _users(store: LogStore, args: argparse.Namespace) -> int:
    from relay.auth import USERNAME, hash_password

    if args.users_command == "add":
        if not USERNAME.match(args.name):
            raise CommandError("a user name is 1-128 of A-Z a-z 0-9 . _ @ + -", 2)
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("empty password on standard input", 2)
        await store.add_user(args.name, await asyncio.to_thread(hash_password, password))
        print(f"added user {args.name}")
    elif args.users_command == "remove":
        await store.remove_user(args.name)
        print(f"removed user {args.name}")
    else:
        for name, created in await store.list_users():
            print(f"{name}\t{iso(created)}")
    return 0
