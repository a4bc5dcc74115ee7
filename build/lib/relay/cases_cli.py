"""`relay audit` (the access audit, newest first; `verify`: the hash chains) and `relay cases`
(a list). Registered by relay.cli; this module holds their parsers and handlers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from relay.model import CASE_STATES, AuditEntry, CaseView

if TYPE_CHECKING:
    from relay.config import Config
    from relay.logstore import LogStore


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    au = sub.add_parser(
        "audit", parents=[common], help="the access audit, newest first; `relay audit verify` checks its hash chains"
    )
    au.add_argument("--limit", type=int, default=50, metavar="N", help="lines (default 50)")
    au.add_argument("--actor", help="only this actor's lines")
    au.add_argument("--action", help="only this action (signin, view_body, case.entry, ...)")
    au.add_argument("--json", action="store_true", help="print JSON")
    au_sub = au.add_subparsers(dest="audit_command", metavar="ACTION")
    verify = au_sub.add_parser(
        "verify", parents=[common], help="recompute the audit's and the case trails' hash chains; exit 1 if broken"
    )
    verify.add_argument("--json", action="store_true", help="print JSON")

    cs = sub.add_parser("cases", parents=[common], help="support cases")
    cs_sub = cs.add_subparsers(dest="cases_command", required=True, metavar="ACTION")
    ls = cs_sub.add_parser("list", parents=[common], help="cases, newest first")
    ls.add_argument("--state", choices=CASE_STATES)
    ls.add_argument("--owner")
    ls.add_argument("--overdue", action="store_true", help="only cases open longer than [console] case_sla")
    ls.add_argument("--limit", type=int, default=50, metavar="N", help="cases (default 50)")
    ls.add_argument("--json", action="store_true", help="print the API's JSON")


async def audit(store: LogStore, args: argparse.Namespace) -> int:
    from relay.cli import _printable

    if getattr(args, "audit_command", None) == "verify":
        report = await store.verify_chains()
        print(json.dumps(report.to_json(), indent=2) if args.json else report.text())
        return 0 if report.ok else 1
    from relay.http import schemas

    entries, more = await store.audit_entries(limit=max(1, args.limit), actor=args.actor, action=args.action)
    if args.json:
        print(json.dumps([schemas.audit_line(e).model_dump() for e in entries], indent=2, ensure_ascii=False))
    else:
        for e in entries:
            print(_printable(format_audit(e)))
    if more is not None:
        print(f"relay: showing the newest {len(entries)} lines; use --limit for more", file=sys.stderr)
    return 0


def format_audit(e: AuditEntry) -> str:
    """A line of `relay audit`: when, who, from where, what, to what, details."""
    from relay.cli import _local

    details = json.dumps(dict(e.details), ensure_ascii=False, sort_keys=True) if e.details else ""
    line = f"{e.id:>6}  {_local(e.at)}  {e.actor:<16} {e.ip or '-':<15} {e.action:<14} {e.target or '-'}"
    return f"{line}  {details}".rstrip()


async def cases(store: LogStore, args: argparse.Namespace, cfg: Config) -> int:
    from relay.cli import _local, _printable
    from relay.http import schemas

    views, more = await store.cases(
        state=args.state, owner=args.owner, overdue=True if args.overdue else None, sla=cfg.console.case_sla,
        limit=max(1, args.limit),
    )  # fmt: skip
    if args.json:
        print(json.dumps([schemas.case(v).model_dump(exclude_none=True) for v in views], indent=2, ensure_ascii=False))
    else:
        for v in views:
            print(_printable(_case_line(v, _local(v.opened_at))))
    if more is not None:
        print(f"relay: showing the newest {len(views)} cases; use --limit for more", file=sys.stderr)
    return 0


def _case_line(v: CaseView, opened: str) -> str:
    late = "  OVERDUE" if v.overdue else ""
    return f"{v.id:>6}  {opened}  {v.state:<17} {v.owner or '-':<12} {v.customer_ref or '-':<12} {v.title}{late}"
