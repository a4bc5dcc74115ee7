"""The console's case pages (list, new, a case with its trail and forms, exports, print), the
access audit page and the users page, all under /ui. Reading is for every console role; the
case forms need ``support``; the audit and users pages need ``admin``. Every POST checks CSRF.

The store does the work (relay.store.cases, relay.store.audit, relay.store.actions); this module
only turns forms into calls and results into pages."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from relay.auth import USERNAME, hash_password
from relay.console.web import CSRF, Admin, ConsoleUser, Support, Viewer, config_of, render, store_of
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
    MessageView,
    iso,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/ui")

PAGE: Final = 50  # cases or audit lines a page
CHANNELS: Final = ("email", "phone", "chat", "internal")
# The entry kinds an agent writes from the case page ("action" entries come from the actions
# themselves, automatic confirmations from the store).
FORM_KINDS: Final[tuple[EntryKind, ...]] = ("interaction", "escalation", "resolution", "confirmation", "feedback")
ACTIONS: Final = ("retry", "resend", "unsuppress")
MAX_TEXT: Final = 4000  # longest free text a form field may carry (a summary, a reason)
_RANK: Final = {"viewer": 1, "support": 2, "admin": 3}
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def _at_least(user: ConsoleUser, role: str) -> bool:
    return _RANK.get(user.role, 0) >= _RANK[role]


# -- the case list


@router.get("/cases", response_class=HTMLResponse)
async def case_list(
    request: Request,
    user: Viewer,
    state: str = "",
    owner: str = "",
    overdue: str = "",
    escalated: str = "",
    before: str = "",
) -> HTMLResponse:
    store, config = store_of(request), config_of(request)
    chosen: CaseState | None = state if state in CASE_STATES else None  # type: ignore[assignment]
    cursor = int(before) if before.isdigit() else None
    cases, next_before = await store.cases(
        state=chosen,
        owner=owner.strip() or None,
        overdue=True if overdue else None,
        escalated=True if escalated else None,
        sla=config.console.case_sla,
        limit=PAGE,
        before=cursor,
    )
    filters = {"state": chosen or "", "owner": owner.strip(), "overdue": "1" if overdue else "",
               "escalated": "1" if escalated else ""}  # fmt: skip
    return render(request, "case_list.html", {
        "user": user, "cases": [_case_row(c) for c in cases], "filters": filters, "states": CASE_STATES,
        "next_before": next_before, "first_page": cursor is None,
        "next_query": _query({**filters, "before": str(next_before)}) if next_before is not None else "",
    })  # fmt: skip


def _query(params: Mapping[str, str]) -> str:
    return urlencode({k: v for k, v in params.items() if v})


def _case_row(case: CaseView) -> dict[str, Any]:
    return {
        "id": case.id, "title": case.title, "customer_ref": case.customer_ref, "owner": case.owner,
        "state": case.state, "overdue": case.overdue, "opened_at": iso(case.opened_at),
        "updated_at": iso(case.updated_at), "opened_by": case.opened_by, "messages": len(case.queue_ids),
        "closed_reason": case.closed_reason, "closed": case.state in CLOSED_CASE_STATES,
    }  # fmt: skip


# -- opening a case


@router.get("/cases/new", response_class=HTMLResponse)
async def case_new_form(request: Request, user: Support) -> HTMLResponse:
    queue_ids = _queue_ids(request.query_params.getlist("queue_id"))
    return render(request, "case_new.html", _new_context(user, queue_ids, {}))


@router.post("/cases/new", dependencies=[CSRF], response_model=None)
async def case_new(request: Request, user: Support) -> Response:
    form = await request.form()
    queue_ids = _queue_ids(_strings(form, "queue_id"))
    values = {k: _one(form, k) for k in ("title", "customer_ref", "owner", "incident")}
    if not values["title"]:
        # From a search selection or a message page the form has no title yet: ask for one.
        context = _new_context(user, queue_ids, values)
        if "title" in form:
            context["error"] = "A case needs a title."
            return render(request, "case_new.html", context, status=422)
        return render(request, "case_new.html", context)
    try:
        case = await store_of(request).open_case(
            title=values["title"], customer_ref=values["customer_ref"], owner=values["owner"] or user.name,
            queue_ids=queue_ids, actor=user.name, ip=user.ip, incident=values["incident"],
        )  # fmt: skip
    except (ValueError, NotFound) as exc:
        context = _new_context(user, queue_ids, values)
        context["error"] = str(exc)
        return render(request, "case_new.html", context, status=404 if isinstance(exc, NotFound) else 422)
    log.info("case %s opened by %s for %s", case.id, user.name, ",".join(queue_ids) or "no message")
    return RedirectResponse(f"/ui/cases/{case.id}", status_code=303)


def _new_context(user: ConsoleUser, queue_ids: Sequence[str], values: Mapping[str, str]) -> dict[str, Any]:
    return {"user": user, "queue_ids": list(queue_ids), "values": {"owner": user.name, **values}, "error": ""}


def _queue_ids(given: Sequence[str]) -> list[str]:
    """Queue ids as typed or posted, upper-cased, each once, in order; junk dropped (the store
    answers NotFound for ids that look right but do not exist)."""
    out: list[str] = []
    for raw in given:
        for word in raw.replace(",", " ").split():
            qid = word.upper()
            if len(qid) <= 32 and qid.isascii() and qid.isalnum() and qid not in out:
                out.append(qid)
    return out[:100]


def _strings(form: FormData, key: str) -> list[str]:
    return [v for v in form.getlist(key) if isinstance(v, str)]


def _one(form: FormData, key: str) -> str:
    value = form.get(key)
    return value.strip()[:MAX_TEXT] if isinstance(value, str) else ""


# -- a case


@router.get("/cases/{case_id}", response_class=HTMLResponse)
async def case_page(request: Request, user: Viewer, case_id: str) -> HTMLResponse:
    case = await _case_or_none(request, case_id)
    if case is None:
        return _missing(request, user, case_id)
    return render(request, "case_page.html", await _page_context(request, user, case))


async def _case_or_none(request: Request, case_id: str) -> CaseView | None:
    if not case_id.isdigit() or len(case_id) > 18:
        return None
    return await store_of(request).case(int(case_id), sla=config_of(request).console.case_sla)


def _missing(request: Request, user: ConsoleUser, case_id: str) -> HTMLResponse:
    return render(request, "case_error.html", {"user": user, "status": 404, "title": "No such case",
                                               "message": f"There is no case {case_id[:40]!r}."}, status=404)  # fmt: skip


async def _page_context(request: Request, user: ConsoleUser, case: CaseView, error: str = "") -> dict[str, Any]:
    store = store_of(request)
    messages = []
    for qid in case.queue_ids:
        view: MessageView | None = await store.get_message(qid)
        messages.append({
            "queue_id": qid, "found": view is not None, "subject": view.subject if view else "",
            "mail_from": view.mail_from if view else "",
            "recipients": [{"address": r.address, "state": r.status, "last_response": r.last_response or ""}
                           for r in view.recipients] if view else [],
        })  # fmt: skip
    closed = case.state in CLOSED_CASE_STATES
    return {
        "user": user, "case": _case_row(case), "messages": messages,
        "entries": [_entry_row(e) for e in case.entries],
        "can_act": _at_least(user, "support") and not closed,
        "channels": CHANNELS, "kinds": FORM_KINDS, "error": error,
        "targets": [(m["queue_id"], r["address"]) for m in messages for r in m["recipients"]],
    }  # fmt: skip


def _entry_row(entry: CaseEntry) -> dict[str, Any]:
    return {
        "id": entry.id, "at": iso(entry.at), "actor": entry.actor, "kind": entry.kind,
        "summary": entry_summary(entry), "details": _details_text(entry.details),
        "hash": entry.hash, "short_hash": entry.hash[:12],
        "queue_id": str(entry.details.get("queue_id", "")),
    }  # fmt: skip


def entry_summary(entry: CaseEntry) -> str:
    """One line saying what an entry records, for the trail, the CSV and the printed log."""
    d = entry.details

    def get(key: str) -> str:
        value = d.get(key)
        return "" if value is None else str(value)

    if entry.kind == "interaction":
        return f"{get('channel')}: {get('summary')}"
    if entry.kind == "escalation":
        return f"escalated to {get('to')}: {get('why')}"
    if entry.kind == "feedback":
        comment = get("comment")
        return f"score {get('score')}/5" + (f": {comment}" if comment else "")
    if entry.kind == "action":
        parts = [get("action"), get("queue_id")]
        if d.get("address"):
            parts.append(get("address"))
        if d.get("new_address"):
            parts.append(f"-> {get('new_address')}")
        if d.get("new_queue_id"):
            parts.append(f"(new message {get('new_queue_id')})")
        if d.get("reason") or d.get("text"):
            parts.append(f"- {get('reason') or get('text')}")
        return " ".join(p for p in parts if p)
    if entry.kind == "confirmation" and d.get("how"):
        return f"confirmed by hand: {get('how')}"
    for key in ("summary", "reason", "how"):
        if d.get(key):
            return get(key)
    return _details_text(d)


def _details_text(details: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in details.items() if k not in ("by",))


@router.post("/cases/{case_id}/entries", dependencies=[CSRF], response_model=None)
async def case_entry(request: Request, user: Support, case_id: str) -> Response:
    case = await _case_or_none(request, case_id)
    if case is None:
        return _missing(request, user, case_id)
    form = await request.form()
    kind = _one(form, "kind")
    store = store_of(request)
    try:
        if kind == "close":
            await store.close_case(case.id, _one(form, "reason"), actor=user.name, ip=user.ip)
        elif kind in FORM_KINDS:
            await store.add_case_entry(case.id, kind, _entry_details(kind, form), actor=user.name, ip=user.ip)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown entry kind {kind[:40]!r}")
    except (ValueError, Conflict) as exc:
        return await _refused(request, user, case, exc)
    except NotFound:
        return _missing(request, user, case_id)
    return RedirectResponse(f"/ui/cases/{case.id}#trail", status_code=303)


def _entry_details(kind: str, form: FormData) -> dict[str, Any]:
    if kind == "interaction":
        return {"channel": _one(form, "channel"), "summary": _one(form, "summary")}
    if kind == "escalation":
        return {"to": _one(form, "to"), "why": _one(form, "why")}
    if kind == "resolution":
        return {"summary": _one(form, "summary")}
    if kind == "confirmation":
        return {"how": _one(form, "how")}
    score = _one(form, "score")
    if not score.isdigit():
        raise ValueError("the score is a number from 1 to 5")
    return {"score": int(score), "comment": _one(form, "comment")}


async def _refused(request: Request, user: ConsoleUser, case: CaseView, exc: Exception) -> HTMLResponse:
    """The case page again, saying why: 409 for a closed case, 422 for a bad form."""
    status = 409 if isinstance(exc, Conflict) else 422
    fresh = await _case_or_none(request, str(case.id)) or case
    return render(request, "case_page.html", await _page_context(request, user, fresh, str(exc)), status=status)


@router.post("/cases/{case_id}/actions", dependencies=[CSRF], response_model=None)
async def case_action(request: Request, user: Support, case_id: str) -> Response:
    """Runs an action on one of the case's messages, with this case's id: the store writes the
    action's events, its audit line and the case's "action" entry in one transaction."""
    case = await _case_or_none(request, case_id)
    if case is None:
        return _missing(request, user, case_id)
    form = await request.form()
    action, qid = _one(form, "action"), _one(form, "queue_id").upper()
    address = _one(form, "address")
    if not qid and " " in (target := _one(form, "target")):
        qid, address = target.split(" ", 1)  # the resend/unsuppress forms pick "QUEUEID address"
    store = store_of(request)
    try:
        if qid not in case.queue_ids:
            raise ValueError("that message is not one of this case's")
        if case.state in CLOSED_CASE_STATES:
            raise Conflict(f"case {case.id} is {case.state}: reopen nothing, open a new case")
        if action == "retry":
            count = await store.retry(qid, by=user.name, case_id=case.id, ip=user.ip, reason=_one(form, "reason"))
            log.info("case %s: %s retried %s (%d recipients)", case.id, user.name, qid, count)
        elif action == "resend":
            new = await store.resend(qid, address, _one(form, "new_address"), by=user.name, ip=user.ip,
                                     case_id=case.id, reason=_one(form, "reason"))  # fmt: skip
            log.info("case %s: %s resent %s to a corrected address as %s", case.id, user.name, qid, new)
        elif action == "unsuppress":
            await store.unsuppress_recipient(qid, address, _one(form, "reason"), by=user.name, ip=user.ip,
                                             case_id=case.id)  # fmt: skip
        else:
            raise ValueError(f"unknown action {action[:40]!r}")
    except (ValueError, Conflict) as exc:
        return await _refused(request, user, case, exc)
    except NotFound as exc:
        return await _refused(request, user, case, ValueError(str(exc)))
    _wake(request)
    return RedirectResponse(f"/ui/cases/{case.id}#trail", status_code=303)


def _wake(request: Request) -> None:
    wake = getattr(request.app.state, "wake_delivery", None)
    if wake is not None:
        wake()


# -- exports and the printable log


def export_document(case: CaseView, *, by: str, at: float) -> dict[str, Any]:
    """A case's resolution log as one JSON document."""
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
        "exported_by": by, "exported_at": iso(at),
    }  # fmt: skip


def csv_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: one that starts like a formula gets a leading quote."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def export_csv(case: CaseView) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["at", "actor", "kind", "summary", "hash"])
    for e in case.entries:
        writer.writerow([csv_cell(c) for c in (iso(e.at) or "", e.actor, e.kind, entry_summary(e), e.hash)])
    return out.getvalue()


async def _exported(request: Request, user: ConsoleUser, case: CaseView, fmt: str) -> None:
    await store_of(request).audit(actor=user.name, ip=user.ip, action="case.export", target=f"case:{case.id}",
                                  details={"format": fmt})  # fmt: skip


@router.get("/cases/{case_id}/export.json", response_model=None)
async def case_export_json(request: Request, user: Viewer, case_id: str) -> Response:
    case = await _case_or_none(request, case_id)
    if case is None:
        return _missing(request, user, case_id)
    await _exported(request, user, case, "json")
    body = json.dumps(export_document(case, by=user.name, at=time.time()), indent=2, ensure_ascii=False)
    return Response(body, media_type="application/json", headers=_attachment(f"case-{case.id}.json"))


@router.get("/cases/{case_id}/export.csv", response_model=None)
async def case_export_csv(request: Request, user: Viewer, case_id: str) -> Response:
    case = await _case_or_none(request, case_id)
    if case is None:
        return _missing(request, user, case_id)
    await _exported(request, user, case, "csv")
    return Response(export_csv(case), media_type="text/csv; charset=utf-8", headers=_attachment(f"case-{case.id}.csv"))


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"}


@router.get("/cases/{case_id}/print", response_class=HTMLResponse)
async def case_print(request: Request, user: Viewer, case_id: str) -> HTMLResponse:
    case = await _case_or_none(request, case_id)
    if case is None:
        return _missing(request, user, case_id)
    await _exported(request, user, case, "print")
    return render(request, "case_print.html", {
        "user": user, "case": _case_row(case), "queue_ids": case.queue_ids,
        "entries": [_entry_row(e) for e in case.entries], "printed_at": iso(time.time()),
    })  # fmt: skip


# -- the access audit (admin)


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(
    request: Request, user: Admin, actor: str = "", action: str = "", before: str = "", verify: str = ""
) -> HTMLResponse:
    store = store_of(request)
    cursor = int(before) if before.isdigit() and len(before) <= 18 else None
    entries, next_before = await store.audit_entries(
        limit=PAGE, before=cursor, actor=actor.strip()[:200] or None, action=action.strip()[:200] or None
    )
    report = _chain_report(await store.verify_chains()) if verify else None
    filters = {"actor": actor.strip()[:200], "action": action.strip()[:200]}
    return render(request, "audit.html", {
        "user": user, "entries": [_audit_row(e) for e in entries], "filters": filters, "report": report,
        "next_query": _query({**filters, "before": str(next_before)}) if next_before is not None else "",
        "first_page": cursor is None,
    })  # fmt: skip


def _audit_row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id, "at": iso(entry.at), "actor": entry.actor, "ip": entry.ip, "action": entry.action,
        "target": entry.target, "details": _details_text(entry.details), "short_hash": entry.hash[:12],
        "hash": entry.hash,
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Report:
    ok: bool
    lines: list[tuple[str, str]]


def _chain_report(report: Any) -> _Report:
    """ChainReport (relay.store.chain) as label/value lines; read by attribute so that a field
    added to the report shows up here without a change."""
    fields = getattr(report, "__dataclass_fields__", None) or {}
    values = {name: getattr(report, name) for name in fields} if fields else dict(vars(report))
    lines = [(name.replace("_", " "), _plain(value)) for name, value in values.items() if name != "ok"]
    return _Report(bool(getattr(report, "ok", False)), lines)


def _plain(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value) or "none"
    fields = getattr(value, "__dataclass_fields__", None)
    if fields:
        return ", ".join(f"{k}: {_plain(getattr(value, k))}" for k in fields)
    return str(value)


# -- users (admin)


@router.get("/users", response_class=HTMLResponse)
async def users_page(request: Request, user: Admin) -> HTMLResponse:
    return await _users_page(request, user)


async def _users_page(request: Request, user: ConsoleUser, error: str = "", status: int = 200) -> HTMLResponse:
    users = await store_of(request).list_users()
    return render(request, "users.html", {
        "user": user, "error": error, "roles": CONSOLE_ROLES,
        "users": [{"name": u.name, "role": u.role, "created_at": iso(u.created_at), "console": u.role in CONSOLE_ROLES}
                  for u in sorted(users, key=lambda u: (u.role == "smtp", u.name))],
    }, status=status)  # fmt: skip


@router.post("/users/add", dependencies=[CSRF], response_model=None)
async def user_add(request: Request, user: Admin) -> Response:
    form = await request.form()
    name, role = _one(form, "name"), _one(form, "role")
    password = form.get("password")
    if not USERNAME.match(name):
        return await _users_page(request, user, "A user name is 1-128 of A-Z a-z 0-9 . _ @ + -", 422)
    if role not in CONSOLE_ROLES:
        return await _users_page(request, user, "The role is viewer, support or admin.", 422)
    if not isinstance(password, str) or len(password) < 8 or len(password) > 1024 or "\x00" in password:
        return await _users_page(request, user, "The password is 8 to 1024 characters.", 422)
    store = store_of(request)
    # scrypt takes tens of milliseconds of CPU: off the event loop
    try:
        await store.add_user(name, await asyncio.to_thread(hash_password, password), role)  # type: ignore[arg-type]
    except Conflict:
        return await _users_page(request, user, f"There is a user {name!r} already.", 409)
    await store.audit(actor=user.name, ip=user.ip, action="user.add", target=name, details={"role": role})
    log.info("console user %s (%s) added by %s", name, role, user.name)
    return RedirectResponse("/ui/users", status_code=303)


@router.post("/users/remove", dependencies=[CSRF], response_model=None)
async def user_remove(request: Request, user: Admin) -> Response:
    form = await request.form()
    name = _one(form, "name")
    if name == user.name:
        return await _users_page(request, user, "You cannot remove yourself.", 422)
    store = store_of(request)
    role = await store.user_role(name)
    try:
        await store.remove_user(name)
    except NotFound:
        return await _users_page(request, user, f"There is no user {name[:128]!r}.", 404)
    await store.audit(actor=user.name, ip=user.ip, action="user.remove", target=name, details={"role": role or ""})
    log.info("user %s removed by %s", name, user.name)
    return RedirectResponse("/ui/users", status_code=303)
