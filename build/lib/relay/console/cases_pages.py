"""The console's case pages (the list, opening a case, a case with its trail, its messages' live
states and its forms, the exports and the printable log), the access audit page and the users
page, all under /ui. Reading a case is for every console role; writing to one needs ``support``;
the audit and users pages need ``admin``. Every POST checks the CSRF token.

The store does the work (relay.store.cases, relay.store.audit, relay.store.actions, each in one
transaction with its audit line); this module turns forms into calls and results into pages."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData

from relay.auth import USERNAME, hash_password
from relay.cases import CHANNELS
from relay.console.web import (
    CSRF,
    Admin,
    ConsoleError,
    ConsoleUser,
    Support,
    Viewer,
    config_of,
    redirect,
    render,
    store_of,
)
from relay.errors import Conflict, NotFound
from relay.model import (
    CASE_STATES,
    CLOSED_CASE_STATES,
    CONSOLE_ROLES,
    AuditEntry,
    CaseEntry,
    CaseState,
    CaseView,
    EntryKind,
    Role,
    iso,
)
from relay.store.chain import ChainReport

log = logging.getLogger(__name__)

router = APIRouter(prefix="/ui", include_in_schema=False)

PAGE: Final = 50  # cases, or audit lines, a page
# The entry kinds an agent writes with the case page's forms ("action" entries come with the
# actions themselves, automatic confirmations from the store; closing is its own form).
FORM_KINDS: Final[tuple[EntryKind, ...]] = ("interaction", "escalation", "resolution", "confirmation", "feedback")
ACTIONS: Final = ("retry", "resend", "unsuppress")  # what the case page runs on a covered message
MAX_SHOWN: Final = 100  # messages a case page shows with their live states (a case may cover 500)
MAX_ID: Final = 18  # digits of a case id or a cursor: more cannot be an id (and would overflow BIGINT)
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection, OWASP).
FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


# -- the case list


@router.get("/cases", response_class=HTMLResponse)
async def case_list(
    request: Request,
    user: Viewer,
    *,
    state: str = "",
    owner: str = "",
    overdue: str = "",
    escalated: str = "",
    before: str = "",
) -> HTMLResponse:
    chosen: CaseState | None = next((s for s in CASE_STATES if s == state), None)
    owner = _filter(owner)
    cursor = _int(before)
    cases, next_before = await store_of(request).cases(
        state=chosen, owner=owner or None, overdue=True if overdue else None, escalated=True if escalated else None,
        sla=config_of(request).console.case_sla, limit=PAGE, before=cursor,
    )  # fmt: skip
    filters = {"state": chosen or "", "owner": owner, "overdue": "1" if overdue else "",
               "escalated": "1" if escalated else ""}  # fmt: skip
    return render(request, "case_list.html", {
        "cases": [_case_row(c) for c in cases], "filters": filters, "states": CASE_STATES,
        "first_page": cursor is None, "filtered": any(filters.values()),
        "next_query": _query({**filters, "before": str(next_before)}) if next_before is not None else "",
    })  # fmt: skip


def _filter(text: str) -> str:
    """A filter as typed, fit for a query: no control characters (NUL is an error on
    PostgreSQL, not a match), at most 200 characters."""
    return "".join(c for c in text if c >= " ").strip()[:200]


def _int(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= MAX_ID else None


def _query(params: Mapping[str, str]) -> str:
    return urlencode({k: v for k, v in params.items() if v})


def _case_row(case: CaseView) -> dict[str, Any]:
    return {
        "id": case.id, "title": case.title, "customer_ref": case.customer_ref, "owner": case.owner,
        "state": case.state, "state_text": case.state.replace("_", " "), "overdue": case.overdue,
        "opened_at": case.opened_at, "updated_at": case.updated_at, "opened_by": case.opened_by,
        "messages": len(case.queue_ids), "closed_reason": case.closed_reason,
        "closed": case.state in CLOSED_CASE_STATES,
    }  # fmt: skip


# -- opening a case


@router.get("/cases/new", response_class=HTMLResponse)
async def case_new_form(request: Request, user: Support) -> HTMLResponse:
    queue_ids = _queue_ids(request.query_params.getlist("queue_id"))
    return render(request, "case_new.html", _new_context(user, queue_ids, {}))


@router.post("/cases/new", dependencies=[CSRF], response_model=None)
async def case_new(request: Request, user: Support) -> Response:
    """Opens a case over the posted messages (repeated ``queue_id``). A post without a title (the
    search page's selection, a message page's button) first shows the form to complete."""
    form = await request.form()
    queue_ids = _queue_ids(_strings(form, "queue_id"))
    values = {k: _text(form, k) for k in ("title", "customer_ref", "owner", "incident")}
    if "title" not in form:
        return render(request, "case_new.html", _new_context(user, queue_ids, values))
    try:
        case = await store_of(request).open_case(
            title=values["title"], customer_ref=values["customer_ref"], owner=values["owner"] or user.name,
            queue_ids=queue_ids, actor=user.name, ip=user.ip, incident=values["incident"],
        )  # fmt: skip
    except (ValueError, NotFound) as exc:
        context = _new_context(user, queue_ids, values)
        context["error"] = str(exc)
        return render(request, "case_new.html", context, status=422)
    log.info("case %s opened by %s over %s", case.id, user.name, ",".join(queue_ids) or "no message")
    return redirect(request, f"/ui/cases/{case.id}", flash=f"Case {case.id} opened.")


def _new_context(user: ConsoleUser, queue_ids: Sequence[str], values: Mapping[str, str]) -> dict[str, Any]:
    fields = {"title": "", "customer_ref": "", "owner": user.name, "incident": ""}
    fields.update({k: v for k, v in values.items() if v})
    return {"queue_ids": list(queue_ids), "values": fields, "error": ""}


def _queue_ids(given: Sequence[str]) -> list[str]:
    """Queue ids as posted or typed (spaces or commas between), upper-cased, each once, in
    order; what cannot be an id is dropped (ids that look right but are unknown: the store says)."""
    out: list[str] = []
    for raw in given:
        for word in raw.replace(",", " ").split():
            qid = word.upper()
            if len(qid) <= 32 and qid.isascii() and qid.isalnum() and qid not in out:
                out.append(qid)
    return out


def _strings(form: FormData, key: str) -> list[str]:
    return [v for v in form.getlist(key) if isinstance(v, str)]


def _text(form: FormData, key: str) -> str:
    """A form field's text, stripped ("" when absent or a file). Lengths and NULs are the
    store's to refuse (relay.cases.text), with a sentence the page shows."""
    value = form.get(key)
    return value.strip() if isinstance(value, str) else ""


# -- a case


@router.get("/cases/{case_id}", response_class=HTMLResponse)
async def case_page(request: Request, user: Viewer, case_id: str) -> HTMLResponse:
    case = await _case(request, case_id)
    return render(request, "case_page.html", await _page_context(request, user, case))


async def _case(request: Request, case_id: str) -> CaseView:
    """The case with its trail; the 404 page when there is none."""
    number = _int(case_id)
    case = None if number is None else await store_of(request).case(number, sla=config_of(request).console.case_sla)
    if case is None:
        raise ConsoleError(404, f"There is no case {case_id[:40]!r}.")
    return case


async def _page_context(request: Request, user: ConsoleUser, case: CaseView, error: str = "") -> dict[str, Any]:
    store = store_of(request)
    # The covered messages, then those the case's resends made (their delivery confirms the case).
    queue_ids = list(case.queue_ids)
    for e in case.entries:
        new = e.details.get("new_queue_id") if e.kind == "action" else None
        if isinstance(new, str) and new not in queue_ids:
            queue_ids.append(new)
    messages: list[dict[str, Any]] = []
    for qid in queue_ids[:MAX_SHOWN]:
        view = await store.get_message(qid)
        messages.append({
            "queue_id": qid, "found": view is not None, "subject": view.subject if view else "",
            "covered": qid in case.queue_ids,
            "recipients": [{"address": r.address, "state": r.status, "last_response": r.last_response or ""}
                           for r in view.recipients] if view else [],
        })  # fmt: skip
    closed = case.state in CLOSED_CASE_STATES
    return {
        "case": _case_row(case), "messages": messages, "entries": [_entry_row(e) for e in case.entries],
        "can_act": user.can_act and not closed, "can_feedback": user.can_act, "channels": CHANNELS,
        "error": error, "more_messages": max(0, len(queue_ids) - MAX_SHOWN),
        "targets": [(m["queue_id"], r["address"]) for m in messages if m["covered"] for r in m["recipients"]],
    }  # fmt: skip


def _entry_row(entry: CaseEntry) -> dict[str, Any]:
    return {
        "id": entry.id, "at": entry.at, "actor": entry.actor, "kind": entry.kind, "summary": entry_summary(entry),
        "hash": entry.hash, "short_hash": entry.hash[:12], "queue_id": str(entry.details.get("queue_id") or ""),
        "new_queue_id": str(entry.details.get("new_queue_id") or ""),
    }  # fmt: skip


def entry_summary(entry: CaseEntry) -> str:
    """One line saying what an entry records: the trail, the CSV and the printed log show it."""
    d = entry.details

    def get(key: str) -> str:
        value = d.get(key)
        return "" if value is None else str(value)

    if entry.kind == "interaction":
        return f"{get('channel')}: {get('summary')}"
    if entry.kind == "escalation":
        return f"escalated to {get('to')}: {get('why')}"
    if entry.kind == "feedback":
        return f"score {get('score')}/5" + (f": {get('comment')}" if d.get("comment") else "")
    if entry.kind == "action":
        return _action_line(d)
    if entry.kind == "confirmation":
        return _confirmation(d)
    return get("summary") or ", ".join(f"{k}={v}" for k, v in d.items())


def _action_line(d: Mapping[str, Any]) -> str:
    parts = [str(d.get("action") or ""), str(d.get("queue_id") or "")]
    if d.get("address"):
        parts.append(str(d["address"]))
    if d.get("new_address"):
        parts.append(f"-> {d['new_address']}")
    if d.get("new_queue_id"):
        parts.append(f"(new message {d['new_queue_id']})")
    count = d.get("count")
    if d.get("action") == "retry" and isinstance(count, int):
        parts.append(f"({count} recipient{'' if count == 1 else 's'} made due)")
    if d.get("reason") or d.get("text"):
        parts.append(f"- {d.get('reason') or d.get('text')}")
    return " ".join(p for p in parts if p)


def _confirmation(d: Mapping[str, Any]) -> str:
    if not d.get("automatic"):
        return f"confirmed by hand: {d.get('how') or ''}"
    took, delivered = d.get("time_to_resolve_seconds"), d.get("delivered_at")
    line = "confirmed automatically: every recipient the case retried or resent was delivered"
    if isinstance(delivered, (int, float)):
        line += f", the last at {iso(float(delivered))}"
    if isinstance(took, (int, float)):
        line += f", {_seconds(float(took))} after the case was opened"
    return line


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@router.post("/cases/{case_id}/entries", dependencies=[CSRF], response_model=None)
async def case_entry(request: Request, user: Support, case_id: str) -> Response:
    """An entry written by hand (the kinds of FORM_KINDS), or "close" (closed_unresolved, a reason)."""
    case = await _case(request, case_id)
    form = await request.form()
    kind = _text(form, "kind")
    store = store_of(request)
    try:
        if kind == "close":
            await store.close_case(case.id, _text(form, "reason"), actor=user.name, ip=user.ip)
        else:
            chosen = next((k for k in FORM_KINDS if k == kind), None)
            if chosen is None:
                raise ValueError(f"unknown entry kind {kind[:40]!r}")
            await store.add_case_entry(case.id, chosen, _entry_details(chosen, form), actor=user.name, ip=user.ip)
    except (ValueError, Conflict) as exc:
        return await _refused(request, user, case, exc)
    except NotFound:
        raise ConsoleError(404, f"There is no case {case.id}.") from None
    done = "Case closed." if kind == "close" else f"{kind.capitalize()} added."
    return redirect(request, f"/ui/cases/{case.id}#trail", flash=done)


def _entry_details(kind: EntryKind, form: FormData) -> dict[str, Any]:
    fields = {
        "interaction": ("channel", "summary"), "escalation": ("to", "why"), "resolution": ("summary",),
        "confirmation": ("how",), "feedback": ("score", "comment"),
    }[kind]  # fmt: skip
    return {name: _text(form, name) for name in fields}


async def _refused(request: Request, user: ConsoleUser, case: CaseView, exc: Exception) -> HTMLResponse:
    """The case page again, saying why: 409 when the case is closed, 422 for a bad form."""
    status = 409 if isinstance(exc, Conflict) else 422
    fresh = await store_of(request).case(case.id, sla=config_of(request).console.case_sla) or case
    return render(request, "case_page.html", await _page_context(request, user, fresh, str(exc)), status=status)


@router.post("/cases/{case_id}/actions", dependencies=[CSRF], response_model=None)
async def case_action(request: Request, user: Support, case_id: str) -> Response:
    """Runs an action on one of the case's messages with this case's id: the store writes its
    events, its audit line and the case's "action" entry in one transaction (nothing at all
    when the case is closed)."""
    case = await _case(request, case_id)
    form = await request.form()
    action, qid, address = _text(form, "action"), _text(form, "queue_id").upper(), _text(form, "address")
    target = _text(form, "target")  # the resend and unsuppress forms pick "QUEUEID address"
    if not qid and " " in target:
        qid, address = target.split(" ", 1)
    store = store_of(request)
    reason = _text(form, "reason")
    try:
        if qid not in case.queue_ids:
            raise ValueError("That message is not one this case covers.")
        if action == "retry":
            count = await store.retry(qid, by=user.name, reason=reason, case_id=case.id, ip=user.ip)
            done = f"{qid}: {count} recipient{'' if count == 1 else 's'} retried now."
        elif action == "resend":
            new_address = _text(form, "new_address")
            new = await store.resend(qid, address, new_address, by=user.name, ip=user.ip, case_id=case.id,
                                     reason=reason)  # fmt: skip
            done = f"{qid} resent to {new_address} as {new}."
        elif action == "unsuppress":
            await store.unsuppress_recipient(qid, address, reason, by=user.name, ip=user.ip, case_id=case.id)
            done = f"{address} is no longer suppressed."
        else:
            raise ValueError(f"unknown action {action[:40]!r}")
    except (ValueError, Conflict) as exc:
        return await _refused(request, user, case, exc)
    except NotFound as exc:  # a recipient the message does not have, a suppression gone meanwhile
        return await _refused(request, user, case, ValueError(str(exc)))
    log.info("case %s: %s by %s on %s", case.id, action, user.name, qid)
    return redirect(request, f"/ui/cases/{case.id}#trail", flash=done)


# -- the exports and the printable log


def export_document(case: CaseView, *, by: str, at: float) -> dict[str, Any]:
    """A case's resolution log as one JSON document: the case, then every entry of its trail."""
    return {
        "case": {
            "id": case.id, "title": case.title, "customer_ref": case.customer_ref, "owner": case.owner,
            "state": case.state, "overdue": case.overdue, "opened_by": case.opened_by,
            "opened_at": iso(case.opened_at), "updated_at": iso(case.updated_at),
            "closed_reason": case.closed_reason, "queue_ids": list(case.queue_ids),
        },
        "entries": [
            {"id": e.id, "at": iso(e.at), "actor": e.actor, "kind": e.kind, "summary": entry_summary(e),
             "details": dict(e.details), "hash": e.hash}
            for e in case.entries
        ],
        "exported_by": by,
        "exported_at": iso(at),
    }  # fmt: skip


def csv_cell(value: str) -> str:
    """The cell as text a spreadsheet shows, never runs: one that starts like a formula gets a
    leading quote."""
    return "'" + value if value.startswith(FORMULA_START) else value


def export_csv(case: CaseView) -> str:
    """One row per entry: at (ISO, UTC), actor, kind, summary, hash."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["at", "actor", "kind", "summary", "hash"])
    for e in case.entries:
        writer.writerow([csv_cell(c) for c in (iso(e.at) or "", e.actor, e.kind, entry_summary(e), e.hash)])
    return out.getvalue()


async def _exported(request: Request, user: ConsoleUser, case: CaseView, form: str) -> None:
    """An export is a download: the access audit records it before it is sent."""
    await store_of(request).audit(
        actor=user.name, ip=user.ip, action="case.export", target=f"case:{case.id}", details={"format": form}
    )


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


@router.get("/cases/{case_id}/export.json", response_model=None)
async def case_export_json(request: Request, user: Viewer, case_id: str) -> Response:
    case = await _case(request, case_id)
    await _exported(request, user, case, "json")
    body = json.dumps(export_document(case, by=user.name, at=time.time()), indent=2, ensure_ascii=False) + "\n"
    return Response(body, media_type="application/json", headers=_attachment(f"case-{case.id}.json"))


@router.get("/cases/{case_id}/export.csv", response_model=None)
async def case_export_csv(request: Request, user: Viewer, case_id: str) -> Response:
    case = await _case(request, case_id)
    await _exported(request, user, case, "csv")
    return Response(export_csv(case), media_type="text/csv; charset=utf-8", headers=_attachment(f"case-{case.id}.csv"))


@router.get("/cases/{case_id}/print", response_class=HTMLResponse)
async def case_print(request: Request, user: Viewer, case_id: str) -> HTMLResponse:
    case = await _case(request, case_id)
    await _exported(request, user, case, "print")
    return render(request, "case_print.html", {
        "case": _case_row(case), "queue_ids": case.queue_ids, "entries": [_entry_row(e) for e in case.entries],
        "printed_at": time.time(),
    })  # fmt: skip


# -- the access audit (admin)


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(
    request: Request, user: Admin, *, actor: str = "", action: str = "", before: str = "", verify: str = ""
) -> HTMLResponse:
    store = store_of(request)
    filters = {"actor": _filter(actor), "action": _filter(action)}
    cursor = _int(before)
    entries, next_before = await store.audit_entries(
        limit=PAGE, before=cursor, actor=filters["actor"] or None, action=filters["action"] or None
    )
    report = await store.verify_chains() if verify else None
    return render(request, "audit.html", {
        "entries": [_audit_row(e) for e in entries], "filters": filters, "report": _report(report),
        "first_page": cursor is None, "filtered": any(filters.values()),
        "next_query": _query({**filters, "before": str(next_before)}) if next_before is not None else "",
    })  # fmt: skip


def _audit_row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id, "at": entry.at, "actor": entry.actor, "ip": entry.ip, "action": entry.action,
        "target": entry.target, "details": ", ".join(f"{k}={_short(k, v)}" for k, v in entry.details.items()),
        "all_details": json.dumps(dict(entry.details), ensure_ascii=False, default=str)[:4000],
        "short_hash": entry.hash[:12], "hash": entry.hash,
    }  # fmt: skip


def _short(key: str, value: Any) -> str:
    """A detail as the audit table shows it: hashes cut to 12 characters, lists joined, long
    text cut (the cell's title has it all)."""
    text = " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    if key.endswith("hash"):
        return text[:12]
    return text if len(text) <= 80 else text[:79] + "…"


def _report(report: ChainReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    chains = sorted(set(report.counts) | set(report.heads))
    return {
        "ok": report.ok, "broken": str(report.broken) if report.broken is not None else "",
        "chains": [{"name": c, "count": report.counts.get(c, 0), "head": report.heads.get(c, "")} for c in chains],
    }  # fmt: skip


# -- users (admin)


@router.get("/users", response_class=HTMLResponse)
async def users_page(request: Request, user: Admin) -> HTMLResponse:
    return await _users_page(request)


async def _users_page(
    request: Request, error: str = "", status: int = 200, values: Mapping[str, str] | None = None
) -> HTMLResponse:
    users = await store_of(request).list_users()
    rows = [{"name": u.name, "role": u.role, "created_at": u.created_at, "console": u.role in CONSOLE_ROLES}
            for u in sorted(users, key=lambda u: (u.role not in CONSOLE_ROLES, u.name))]  # fmt: skip
    fields = {"name": "", "role": "support", **(values or {})}
    return render(request, "users.html", {"users": rows, "roles": CONSOLE_ROLES, "error": error, "values": fields},
                  status=status)  # fmt: skip


@router.post("/users/add", dependencies=[CSRF], response_model=None)
async def user_add(request: Request, user: Admin) -> Response:
    """Adds a console user (viewer, support or admin); SMTP users stay with `relay users add`."""
    form = await request.form()
    name, password = _text(form, "name"), form.get("password")
    role: Role | None = next((r for r in CONSOLE_ROLES if r == _text(form, "role")), None)
    values = {"name": name[:128], "role": role or "support"}
    if not USERNAME.match(name):
        return await _users_page(request, "A user name is 1-128 of A-Z a-z 0-9 . _ @ + -", 422, values)
    if role is None:
        return await _users_page(request, "The role is viewer, support or admin.", 422, values)
    if not isinstance(password, str) or not 8 <= len(password) <= 1024 or "\x00" in password:
        return await _users_page(request, "The password is 8 to 1024 characters (no NUL).", 422, values)
    store = store_of(request)
    if await store.user_role(name) is not None:
        return await _users_page(request, f"There is a user {name!r} already.", 409, values)
    hashed = await asyncio.to_thread(hash_password, password)  # scrypt: CPU for tens of ms, off the loop
    try:
        await store.add_user(name, hashed, role, actor=user.name, ip=user.ip)  # with its audit line
    except Conflict:  # added meanwhile
        return await _users_page(request, f"There is a user {name!r} already.", 409, values)
    log.info("console user %s (%s) added by %s", name, role, user.name)
    return redirect(request, "/ui/users", flash=f"{name} ({role}) added.")


@router.post("/users/remove", dependencies=[CSRF], response_model=None)
async def user_remove(request: Request, user: Admin) -> Response:
    form = await request.form()
    name = _text(form, "name")
    if name == user.name:
        return await _users_page(request, "You cannot remove yourself: another admin can.", 422)
    store = store_of(request)
    role = await store.user_role(name) if USERNAME.match(name) else None
    if role is None:
        return await _users_page(request, f"There is no user {name[:128]!r}.", 404)
    try:
        await store.remove_user(name, actor=user.name, ip=user.ip)  # with its audit line
    except NotFound:  # removed meanwhile
        return await _users_page(request, f"There is no user {name[:128]!r}.", 404)
    log.info("user %s (%s) removed by %s", name, role, user.name)
    return redirect(request, "/ui/users", flash=f"{name} removed.")
