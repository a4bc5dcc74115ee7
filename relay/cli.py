"""``relay serve|db|log|queue|stats|suppressions|users|dkim|webhooks``: argument parsing, then a call into the modules.

Only ``serve`` and ``db upgrade`` create or upgrade a store; the other commands refuse to run
on a store that is missing or older than the code, so that a wrong --config never leaves an
empty database behind."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import getpass
import io
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from relay import cases_cli, cluster_cli, db_cli, retention_cli
from relay import config as config_mod
from relay.errors import ConfigError, RelayError, SmtpReplyError
from relay.model import (
    ACTIVE_STATES,
    HELD,
    RETRY_ALL_STATES,
    RETRY_STATES,
    ROLES,
    SUPPRESSION_REASONS,
    MessageView,
    QueueEntry,
    StatsRow,
    Suppression,
    SuppressionChange,
    iso,
)

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
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help='worker processes sharing the listeners (default: [server] processes, "auto": one per usable CPU core)',
    )

    db = sub.add_parser("db", parents=[common], help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", parents=[common], help="apply migrations up to the newest")
    db_cli.add_parsers(db_sub, common)  # relay db copy --to URL

    lg = sub.add_parser("log", parents=[common], help="a message's timeline by queue id, Message-ID or recipient")
    lg.add_argument("query", help="queue id, Message-ID (with or without <>), or recipient address")
    lg.add_argument("--json", action="store_true", help="print JSON")
    lg.add_argument("--limit", type=int, default=20, help="at most this many messages (default 20)")

    _search_parser(sub, common)

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
    release = q_sub.add_parser("release", parents=[common], help="hold mode: make a message's held recipients due now")
    release.add_argument("id", help="queue id")
    discard = q_sub.add_parser("discard", parents=[common], help="hold mode: cancel a message's held recipients")
    discard.add_argument("id", help="queue id")

    st = sub.add_parser("stats", parents=[common], help="recipients delivered, deferred, bounced... per group")
    st.add_argument("--group-by", choices=("tag", "domain", "user"), default="tag", help="(default tag)")
    st.add_argument("--since", type=_when, metavar="TIME", help="ISO-8601 or epoch seconds (default: 24 hours ago)")
    st.add_argument("--until", type=_when, metavar="TIME", help="ISO-8601 or epoch seconds (default: now)")
    st.add_argument("--json", action="store_true", help="print the API's JSON")

    _suppressions_parser(sub, common)
    _dkim_parser(sub, common)
    _webhooks_parser(sub, common)
    cases_cli.add_parsers(sub, common)  # relay audit [verify], relay cases list
    cluster_cli.add_parsers(sub, common)  # relay nodes
    retention_cli.add_parsers(sub, common)  # relay retention run [--dry-run]

    _users_parser(sub, common)
    return p


def _search_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    se = sub.add_parser(
        "search",
        parents=[common],
        help="find messages with the console's search grammar",
        description="Find messages, newest first: to: from: subject: message-id: id: tag: status: reason: domain: "
        "user: after: before: is:opened|clicked|suppressed|complained, '-' negates a term, quoted phrases, free "
        "text. Quote the whole query for the shell, e.g. relay search 'to:jane@example.com -status:delivered'.",
    )
    se.add_argument("query", nargs="+", help="the search (several arguments are joined with spaces)")
    se.add_argument("--limit", type=int, default=20, help="at most this many messages (default 20, at most 1000)")
    se.add_argument("--json", action="store_true", help="print the API's JSON: messages, total, total_capped")


def _users_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    u = sub.add_parser("users", parents=[common], help="SMTP AUTH users and console users")
    u_sub = u.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = u_sub.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument(
        "--role", choices=ROLES, default="smtp",
        help="smtp (default): sends mail, cannot sign in; viewer, support, admin: the console, cannot send",
    )  # fmt: skip
    add.add_argument(
        "--password-stdin", action="store_true", required=True, help="read the password from standard input"
    )
    u_sub.add_parser("list", parents=[common], help="list users")
    rm = u_sub.add_parser("remove", parents=[common], help="remove a user")
    rm.add_argument("name")


def _dkim_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dk = sub.add_parser("dkim", parents=[common], help="DKIM keys: make one, check its DNS record")
    dk_sub = dk.add_subparsers(dest="dkim_command", required=True, metavar="ACTION")
    gen = dk_sub.add_parser(
        "keygen", parents=[common], help="make a key under data_dir/dkim/ and print its DNS record and [[dkim]] entry"
    )
    gen.add_argument("domain")
    gen.add_argument("selector")
    gen.add_argument(
        "--algorithm", choices=("rsa-sha256", "ed25519-sha256"), default="rsa-sha256",
        help="rsa-sha256 (2048 bits, the default) or ed25519-sha256 (RFC 8463)",
    )  # fmt: skip
    check = dk_sub.add_parser(
        "check", parents=[common], help="does the DNS record of each of the domain's [[dkim]] entries match its key"
    )
    check.add_argument("domain")


def _suppressions_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("suppressions", parents=[common], help="the suppression list: addresses Relay does not mail")
    sp_sub = sp.add_subparsers(dest="suppressions_command", required=True, metavar="ACTION")
    ls = sp_sub.add_parser("list", parents=[common], help="entries in force, newest first")
    ls.add_argument("--address", metavar="ADDRESS", help="only this address's (or *@domain's) own entry")
    ls.add_argument("--reason", choices=SUPPRESSION_REASONS, help="only entries with this reason")
    ls.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N entries (default 1000)")
    ls.add_argument("--json", action="store_true", help="print a JSON array (each entry as the API shows it)")
    check = sp_sub.add_parser("check", parents=[common], help="is mail to an address suppressed, and by which entry")
    check.add_argument("address")
    check.add_argument("--json", action="store_true", help="print the object GET /api/v1/suppressions/check returns")
    add = sp_sub.add_parser(
        "add", parents=[common], help="suppress an address, or a domain as *@domain (reason manual)"
    )
    add.add_argument("address", help="a mailbox, or *@domain")
    add.add_argument("--note", default="", help="why, for whoever reads the list later")
    add.add_argument("--expires", metavar="WHEN", help='ISO-8601 date/time, or a duration from now ("30d", "12h")')
    rm = sp_sub.add_parser("remove", parents=[common], help="remove an address's (or *@domain's) entry")
    rm.add_argument("address")
    rm.add_argument("--reason", default="", help="why it may be mailed again; required for a complaint's entry")
    imp = sp_sub.add_parser(
        "import", parents=[common], help="add entries from CSV (the columns of export; only address is required)"
    )
    imp.add_argument("file", metavar="FILE", help="a CSV file with a header row, or - for standard input")
    exp = sp_sub.add_parser("export", parents=[common], help="every entry in force, as CSV")
    exp.add_argument("file", metavar="FILE", nargs="?", default="-", help="where to write (default -: standard output)")
    audit = sp_sub.add_parser(
        "audit", parents=[common], help="who added and removed entries, when and why; newest first"
    )
    audit.add_argument("address", nargs="?", help="only this address's (or *@domain's) lines")
    audit.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N lines (default 1000)")
    audit.add_argument("--json", action="store_true", help="print a JSON array")


def _webhooks_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from relay.model import WEBHOOK_TYPES

    wh = sub.add_parser("webhooks", parents=[common], help="webhook endpoints ([[webhooks]]) and their deliveries")
    wh_sub = wh.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    ls = wh_sub.add_parser("list", parents=[common], help="endpoints: pending, failed and delivered counts, disabled?")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    test = wh_sub.add_parser("test", parents=[common], help="send a signed test webhook to an endpoint now")
    test.add_argument("url", help="a [[webhooks]] url")
    replay = wh_sub.add_parser(
        "replay", parents=[common], help="queue the events of a time window again, as new deliveries"
    )
    replay.add_argument("--since", type=_when, required=True, metavar="TIME", help="ISO-8601 or epoch seconds")
    replay.add_argument("--until", type=_when, metavar="TIME", help="ISO-8601 or epoch seconds (default: now)")
    replay.add_argument(
        "--type", action="append", choices=WEBHOOK_TYPES, metavar="TYPE", help="only this type (repeatable)"
    )
    enable = wh_sub.add_parser("enable", parents=[common], help="send to an endpoint again after it answered 410 Gone")
    enable.add_argument("url")
    wh_sub.add_parser("secret", parents=[common], help='print a new secret: "whsec_" + base64 of 32 random bytes')


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
        if args.processes is not None and args.processes < 1:
            raise CommandError("--processes must be at least 1", 2)
        processes, why = worker_count(args.processes, cfg.server.processes)
        return _serve(cfg, processes, why)
    logs.setup(logging.WARNING)
    if args.command == "dkim":  # no store: keys and DNS only
        return _dkim_keygen(cfg, args) if args.dkim_command == "keygen" else asyncio.run(_dkim_check(cfg, args))
    if args.command == "webhooks" and args.webhooks_command in ("secret", "test"):
        return _webhooks_no_store(args, cfg)  # neither reads the store
    if args.command == "db" and args.db_command == "copy":  # two stores, neither upgraded by _with_store
        return db_cli.copy(cfg, args)
    commands: dict[str, Callable[[LogStore, argparse.Namespace], Awaitable[int]]] = {
        "db": _db,
        "log": _log,
        "queue": _queue,
        "search": _search,
        "stats": _stats,
        "suppressions": _suppressions,
        "users": _users,
        "webhooks": lambda store, args: _webhooks(store, args, cfg),
        "audit": cases_cli.audit,
        "cases": lambda store, args: cases_cli.cases(store, args, cfg),
        "nodes": cluster_cli.nodes,
        "retention": lambda store, args: retention_cli.run(store, args, cfg),
    }
    return asyncio.run(_with_store(cfg, args, commands[args.command]))


def worker_count(flag: int | None, setting: config_mod.Processes) -> tuple[int, str]:
    """How many processes `relay serve` runs, and why (said in the start's "started ..." line):
    --processes, else [server] processes, whose "auto" is the CPU cores this process may use."""
    if flag is not None:
        return flag, f"--processes {flag}"
    if setting != "auto":
        return setting, f"processes = {setting}"
    from relay.cpus import usable_cpus

    cores = usable_cpus()
    return cores, f"processes = auto: {cores} CPU {'core' if cores == 1 else 'cores'}"


def _serve(cfg: config_mod.Config, processes: int, why: str) -> int:
    """A start that fails says why in one line on stderr and exits 1, having started nothing:
    every listener is bound before the store opens, and a step that fails after that stops what
    the steps before it started (relay.service.lifecycle)."""
    from relay.service import listeners

    sockets = listeners.prepare(cfg)
    if processes > 1:
        from relay.service import workers  # before anything imports prometheus_client: see relay.metrics

        return workers.serve(cfg, processes, sockets, why=why)
    from relay.service import lifecycle

    return lifecycle.run(
        lambda: lifecycle.serve(
            cfg,
            smtp_sockets=sockets.smtp,
            http_sockets=sockets.http,
            tracking_sockets=sockets.tracking,
            bounce_sockets=sockets.bounces,
            smtp_tls_sockets=sockets.smtp_tls,
            why=why,
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
    # With [[webhooks]], what a command changes (suppressions, queue retry/delete) is reported too.
    store = await LogStore.open(url, webhooks=cfg.webhooks)
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


async def _search(store: LogStore, args: argparse.Namespace) -> int:
    from relay.search import QueryError

    if not 1 <= args.limit <= 1000:
        raise CommandError("--limit must be between 1 and 1000", 2)
    try:
        page = await store.search_messages(" ".join(args.query), limit=args.limit)
    except QueryError as exc:
        raise CommandError(str(exc), 2) from exc
    total = f"{page.total}+" if page.total_capped else str(page.total)
    if args.json:
        from relay.http.schemas import messages_json  # the JSON shape only: pydantic, not FastAPI

        doc = {**messages_json(page.messages), "total": page.total, "total_capped": page.total_capped}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    for m in page.messages:
        rcpts = ", ".join(f"{r.address} ({r.status})" for r in m.recipients)
        print(f"{m.queue_id}  {_local(m.received_at)}  {m.mail_from or '<>'}  {rcpts}  {m.subject!r}")
    shown = f" (the newest {len(page.messages)} shown)" if page.next is not None else ""
    print(f"{total} message{'' if total == '1' else 's'}{shown}")
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
        lines += [f"signed d={s.get('d')} s={s.get('s')} ({s.get('a')})" for s in d.get("dkim", ())]
        if d.get("reason"):
            lines.append(_why(d))
        if d.get("next_attempt_at"):
            lines.append(f"next attempt {d['next_attempt_at']}")
        return "\n        ".join(lines)
    if kind == "body_purged":
        return f"the body expired by retention (kept {d.get('kept') or '?'}; {d.get('bytes', '?')} bytes deleted)"
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
        if not args.all and (held := await _held(store, args.id)):  # retry never releases held mail
            print(f"{held} held recipient(s) left held: use `relay queue release {args.id}`")
        return 0
    if args.queue_command == "delete":
        n = await store.cancel(args.id, by="cli")
        print(f"{n} recipient(s) cancelled" if n else "nothing to cancel: every recipient is final already")
        return 0
    if args.queue_command in ("release", "discard"):
        act = store.release if args.queue_command == "release" else store.discard
        n = await act(args.id, by="cli")
        done = "due now" if args.queue_command == "release" else "discarded"
        print(f"{n} recipient(s) {done}" if n else f"nothing to {args.queue_command}: no recipient is held")
        return 0
    summary = await store.queue_summary()
    width = max(len(k) for k in summary.counts)
    for state, count in summary.counts.items():
        print(f"{state:<{width}}  {count}")
    age = "-" if summary.oldest_queued_at is None else f"{time.time() - summary.oldest_queued_at:.0f}s"
    print(f"oldest queued message: {age}")
    return 0


async def _held(store: LogStore, queue_id: str) -> int:
    view = await store.get_message(queue_id)
    return 0 if view is None else sum(1 for r in view.recipients if r.status == HELD)


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


# -- suppressions


def _actor() -> str:
    """Who runs the command, for the audit trail: the OS user name."""
    try:
        return getpass.getuser() or "cli"
    except (OSError, KeyError):  # no name for this uid (a container)
        return "cli"


def _suppression_key(text: str) -> str:
    from relay.http import schemas

    try:
        return schemas.suppression_address(text)
    except ValueError as exc:
        raise CommandError(f"{text!r} is {exc}", 2) from exc


async def _suppressions(store: LogStore, args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[LogStore, argparse.Namespace], Awaitable[int]]] = {
        "list": _suppressions_list,
        "check": _suppressions_check,
        "add": _suppressions_add,
        "remove": _suppressions_remove,
        "import": _suppressions_import,
        "export": _suppressions_export,
        "audit": _suppressions_audit,
    }
    return await handlers[args.suppressions_command](store, args)


async def _suppressions_list(store: LogStore, args: argparse.Namespace) -> int:
    limit = max(1, args.limit)
    key = None if args.address is None else _suppression_key(args.address)
    entries, more = await store.suppressions(address=key, reason=args.reason, limit=limit)
    _print_page(entries, args.json, format_suppression, more is not None and f"the newest {limit} entries")
    return 0


def _print_page(items: Sequence[Any], as_json: bool, line: Callable[[Any], str], cut: str | bool) -> None:
    """A page of records: as JSON (their ``to_json()``) or a line each; when ``cut`` names what
    is shown, a note on stderr that there is more."""
    if as_json:
        print(json.dumps([item.to_json() for item in items], indent=2, ensure_ascii=False))
    else:
        for item in items:
            print(line(item))
    if cut:
        print(f"relay: showing {cut}; use --limit for more", file=sys.stderr)


def format_suppression(e: Suppression) -> str:
    """A line of `relay suppressions list`: address, reason, origin, since, until, queue id, note."""
    until = "never" if e.expires_at is None else _local(e.expires_at)
    line = f"{e.address:<32} {e.reason:<11} {e.origin:<9} {_local(e.created_at)}  until {until:<24}"
    return _printable(f"{line}  {e.source_queue_id or '-'}  {e.note}".rstrip())


def format_suppression_change(c: SuppressionChange) -> str:
    """A line of `relay suppressions audit`."""
    line = f"{_local(c.at)}  {c.action:<7}  {c.address:<32} {c.reason or '-'}  by {c.actor} via {c.origin}"
    if c.source_queue_id:
        line += f"  queue id {c.source_queue_id}"
    if c.note:
        line += f"  note: {c.note}"
    return _printable(line)


# C0 and C1 controls, and DEL, as \xNN: a note (from the API) must not drive the terminal
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def _printable(text: str) -> str:
    return text.translate(_CONTROLS)


async def _suppressions_check(store: LogStore, args: argparse.Namespace) -> int:
    _suppression_key(args.address)
    address = args.address.strip()
    entry = await store.suppression_check(address)
    if args.json:  # the object GET /api/v1/suppressions/check returns
        doc = {"address": address, "suppressed": entry is not None, "entry": entry and entry.to_json()}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    elif entry is None:
        print(_printable(f"{address} is not suppressed"))
    else:
        print(_printable(f"{address} is suppressed by the entry:"))
        print(format_suppression(entry))
    return 0


def _text_option(flag: str, value: str) -> str:
    """A free-text option (a note, a reason) as the API takes it, else a usage error naming the flag."""
    from relay.http import schemas

    try:
        return schemas.suppression_text(value)
    except ValueError as exc:
        raise CommandError(f"{flag} {exc}", 2) from exc


async def _suppressions_add(store: LogStore, args: argparse.Namespace) -> int:
    from relay.http import schemas

    key = _suppression_key(args.address)
    note = _text_option("--note", args.note)
    if len(note) > schemas.SUPPRESSION_NOTE_MAX:
        raise CommandError(f"--note is longer than {schemas.SUPPRESSION_NOTE_MAX} characters", 2)
    now = time.time()
    expires_at = None if args.expires is None else _expires(args.expires, now)
    try:
        found, new = await store.suppress(Suppression(key, "manual", "cli", None, now, expires_at, note), _actor())
    except ValueError as exc:  # expired meanwhile ("--expires 1ms")
        raise CommandError(f"--expires: {exc}", 2) from exc
    if new:
        print(_printable(f"suppressed {found.address}" + ("" if expires_at is None else f" until {iso(expires_at)}")))
    else:
        print(_printable(f"{found.address} was suppressed already; its entry stays as it is:"))
        print(format_suppression(found))
    return 0


def _expires(text: str, now: float) -> float:
    """--expires: an ISO-8601 date/time (UTC unless it says otherwise), or a duration from now."""
    from relay.http import schemas

    try:
        when = datetime.fromtimestamp(now + config_mod.parse_duration(text, "--expires"), UTC)
    except ConfigError:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError as exc:
            raise CommandError(
                f'--expires: not an ISO-8601 date/time or a duration such as "30d": {text!r}', 2
            ) from exc
    except (OverflowError, OSError, ValueError) as exc:  # "9999999d"
        raise CommandError("--expires must be within 100 years", 2) from exc
    try:
        return schemas.expiry(when, now)
    except ValueError as exc:
        raise CommandError(f"--expires {exc}", 2) from exc


async def _suppressions_remove(store: LogStore, args: argparse.Namespace) -> int:
    from relay.errors import ReasonRequired

    key = _suppression_key(args.address)
    reason = _text_option("--reason", args.reason)
    try:
        removed = await store.unsuppress(key, reason, _actor(), "cli")
    except ReasonRequired as exc:
        raise CommandError(f"{exc} (--reason)", 2) from exc
    print(_printable(f"removed {removed.address} (was {removed.reason})"))
    return 0


@dataclass(frozen=True, slots=True)
class CsvImport:
    """What a CSV of suppression entries holds: the entries, the problems (by line), and how
    many rows were skipped for having expired."""

    entries: list[Suppression]
    errors: list[str]
    expired: int


def read_suppressions_csv(data: bytes, now: float) -> CsvImport:
    """Parse `relay suppressions import` input: UTF-8 CSV with a header row naming columns of
    ``relay suppressions export`` (address required). Any bytes: problems come back as lines
    ("line 3: address: ..."), never as exceptions."""
    from relay.http import schemas

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return CsvImport([], [f"byte {exc.start}: not UTF-8"], 0)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    entries: list[Suppression] = []
    errors: list[str] = []
    expired = 0
    header: list[str] | None = None
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if header is None:
                header = [name.strip().lower() for name in row]
                problem = _csv_header_problem(header)
                if problem:
                    return CsvImport([], [f"line {line}: {problem}"], 0)
                continue
            if len(row) != len(header):
                errors.append(f"line {line}: {len(row)} fields where the header has {len(header)}")
                continue
            cells = {name: value if name == "note" else value.strip() for name, value in zip(header, row, strict=True)}
            entry = schemas.suppression_row(cells, now)
            if isinstance(entry, list):
                errors += [_printable(f"line {line}: {problem}") for problem in entry]
            elif entry.expires_at is not None and entry.expires_at <= now:
                expired += 1
            else:
                entries.append(entry)
    except csv.Error as exc:  # a stray quote, a field over the size limit: the rest cannot be read reliably
        errors.append(f"line {reader.line_num}: {exc}")
    if header is None and not errors:
        errors.append("no header row (the first line names the columns: address,reason,note,...)")
    return CsvImport(entries, errors, expired)


def _csv_header_problem(header: list[str]) -> str | None:
    from relay.http import schemas

    known = schemas.SUPPRESSION_CSV_COLUMNS
    unknown = [name for name in header if name not in known]
    if unknown:
        return f"unknown column {unknown[0]!r} (the columns are {','.join(known)})"
    if len(set(header)) != len(header):
        return "a column is named twice"
    if "address" not in header:
        return "no address column"
    return None


MAX_CSV_ERRORS = 20  # problems printed; the rest are counted


async def _suppressions_import(store: LogStore, args: argparse.Namespace) -> int:
    try:
        data = await asyncio.to_thread(sys.stdin.buffer.read if args.file == "-" else Path(args.file).read_bytes)
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    now = time.time()
    found = read_suppressions_csv(data, now)
    if found.errors:
        shown = found.errors[:MAX_CSV_ERRORS]
        if len(found.errors) > MAX_CSV_ERRORS:
            shown.append(f"... and {len(found.errors) - MAX_CSV_ERRORS} more")
        source = "standard input" if args.file == "-" else args.file
        raise CommandError(f"{source}: nothing imported:\n  " + "\n  ".join(shown))
    added = await store.import_suppressions(found.entries, _actor(), now=now)
    present = len({e.address for e in found.entries}) - len(added)
    print(f"imported {_entries(len(added))}; {present} suppressed already (kept as they were); {found.expired} expired")
    return 0


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


async def _suppressions_export(store: LogStore, args: argparse.Namespace) -> int:
    from relay.http import schemas

    columns = schemas.SUPPRESSION_CSV_COLUMNS
    to_file = args.file != "-"
    try:
        f = await asyncio.to_thread(open, args.file, "w", newline="", encoding="utf-8") if to_file else sys.stdout
        with f if to_file else contextlib.nullcontext(f):
            writer = csv.writer(f, lineterminator="\r\n")
            writer.writerow(columns)
            count, after = 0, None
            while True:  # a page at a time: a list of millions never sits in memory whole
                entries, after = await store.suppressions(limit=1000, after=after, now=time.time())
                for e in entries:
                    doc = e.to_json()
                    writer.writerow(["" if doc[c] is None else doc[c] for c in columns])
                count += len(entries)
                if after is None:
                    break
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise CommandError(f"cannot write {args.file}: {exc.strerror or exc}") from exc
    if to_file:
        print(f"exported {_entries(count)} to {args.file}")
    return 0


async def _suppressions_audit(store: LogStore, args: argparse.Namespace) -> int:
    key = None if args.address is None else _suppression_key(args.address)
    limit = max(1, args.limit)
    changes, more = await store.suppression_audit(key, limit=limit)
    _print_page(changes, args.json, format_suppression_change, more is not None and f"the newest {limit} lines")
    return 0


def _dkim_keygen(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from relay import dkim

    domain, selector = args.domain.strip().rstrip(".").lower(), args.selector.strip().lower()
    try:
        new = dkim.generate(cfg.data_dir, domain, selector, args.algorithm)
    except FileExistsError as exc:
        raise CommandError(f"{exc.filename} exists: not overwriting a key (pick another selector)") from exc
    except ValueError as exc:
        raise CommandError(str(exc), 2) from exc
    except OSError as exc:
        raise CommandError(f"cannot write the key: {exc.strerror} ({exc.filename})") from exc
    key = new.key
    print(f"wrote {new.path} ({args.algorithm}{', 2048 bits' if key.k == 'rsa' else ''})")
    print()
    print("Publish this DNS TXT record:")
    print(f"  name:  {key.record_name}")
    print(f"  value: {key.txt_value()}")
    print(f"  zone:  {dkim.zone_line(key)}")
    print()
    print("Add this to the config, then `relay dkim check` and restart:")
    print(dkim.config_snippet(key), end="")
    return 0


async def _dkim_check(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from relay import dkim
    from relay.mx import MxResolver

    domain = args.domain.strip().rstrip(".").lower()
    entries = [(i, e) for i, e in enumerate(cfg.dkim) if e.domain.lower() == domain]
    if not entries:
        raise CommandError(f"no [[dkim]] entry for {domain} in the config")
    resolver = MxResolver(cfg.dns)
    ok = True
    for i, entry in entries:
        name = f"{entry.selector}._domainkey.{domain}"
        try:
            key = dkim.load_key(entry, f"dkim[{i}]")
            match, why = dkim.record_verdict(key, await resolver.txt(name))
        except SmtpReplyError as exc:  # DNS trouble, as relay.mx words it
            match, why = False, exc.reply.text
        except RelayError as exc:  # the key itself
            match, why = False, str(exc)
        ok = ok and match
        print(f"{entry.selector} ({entry.algorithm}) {name}: {why}")
    return 0 if ok else 1


async def _users(store: LogStore, args: argparse.Namespace) -> int:
    from relay.auth import USERNAME, hash_password

    if args.users_command == "add":
        if not USERNAME.match(args.name):
            raise CommandError("a user name is 1-128 of A-Z a-z 0-9 . _ @ + -", 2)
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("empty password on standard input", 2)
        await store.add_user(args.name, await asyncio.to_thread(hash_password, password), args.role, actor=_actor())
        print(f"added user {args.name} ({args.role})")
    elif args.users_command == "remove":
        await store.remove_user(args.name, actor=_actor())
        print(f"removed user {args.name}")
    else:
        for user in await store.list_users():
            print(f"{user.name}\t{user.role}\t{iso(user.created_at)}")
    return 0


# -- webhooks


def _webhooks_no_store(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from relay import webhooks

    if args.webhooks_command == "secret":
        print(webhooks.new_secret())
        return 0
    endpoint = next((w for w in cfg.webhooks if w.url == args.url), None)
    if endpoint is None:
        raise CommandError(f"no [[webhooks]] endpoint has url {args.url!r}", 2)
    webhook_id, response = asyncio.run(webhooks.send_test(endpoint))
    if response.ok:
        print(f"{webhook_id}: {response.status}")
        return 0
    print(f"{webhook_id}: {response.error}")
    return 1


async def _webhooks(store: LogStore, args: argparse.Namespace, cfg: config_mod.Config) -> int:
    if args.webhooks_command == "list":
        found = await store.webhook_endpoints([w.url for w in cfg.webhooks])
        configured = {w.url for w in cfg.webhooks}
        if args.json:
            rows = [
                {"url": e.url, "configured": e.url in configured, "pending": e.pending, "failed": e.failed,
                 "delivered": e.delivered, "disabled_at": iso(e.disabled_at), "disabled_reason": e.disabled_reason}
                for e in found
            ]  # fmt: skip
            print(json.dumps(rows, indent=2))
            return 0
        for e in found:
            state = (
                "enabled" if e.disabled_at is None else f"disabled since {_local(e.disabled_at)} ({e.disabled_reason})"
            )
            extra = "" if e.url in configured else "  (not configured: its deliveries wait)"
            print(f"{e.url}  pending {e.pending}  failed {e.failed}  delivered {e.delivered}  {state}{extra}")
        return 0
    if args.webhooks_command == "replay":
        until = time.time() if args.until is None else args.until
        if args.since > until:
            raise CommandError("--since must not be after --until", 2)
        if not cfg.webhooks:
            raise CommandError("no [[webhooks]] endpoints are configured", 2)
        count = await store.webhook_replay(cfg.webhooks, since=args.since, until=until, kinds=args.type or ())
        print(f"queued {count} webhook deliveries")
        return 0
    # enable
    if await store.webhook_enable(args.url):
        print(f"enabled {args.url}; its pending deliveries are due now")
    else:
        print(f"{args.url} was not disabled")
    return 0
