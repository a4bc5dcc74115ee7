"""The cases API under /api/v1/cases: list and open cases, read one with its trail and its
messages' live states, append entries to its trail, close it unresolved. Bearer tokens, as the
rest of the API (relay.http.api's ``_caller``: read-only tokens may only read); the actor of
what a token writes is its label.

Actions (retry, resend, unsuppress, note) are not entries written here: they run through the
message actions with a case id, which write their "action" entry themselves.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from relay.errors import Conflict, NotFound
from relay.http import schemas
from relay.http.api import _caller, _id_cursor, _invalid, _parse_id_cursor, _store
from relay.http.schemas import Case, CaseEntry, CaseEntryRequest, CasePage, CaseRequest, CloseRequest, Problem
from relay.logstore import LogStore
from relay.model import CaseState, CaseView

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or wrong bearer token"},
    403: {"model": Problem, "description": "A read-only token, for a change"},
    422: {"model": Problem, "description": "A parameter or a field is invalid; `detail[].loc` names it"},
}
_NO_CASE: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such case"}}
_CLOSED: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "The case is closed"}}
_NOT_JSON: dict[int | str, dict[str, Any]] = {400: {"model": Problem, "description": "The body is not JSON"}}
router = APIRouter(prefix="/api/v1", dependencies=[Depends(_caller)], tags=["cases"], responses=_ERRORS)
Store = Annotated[LogStore, Depends(_store)]
Caller = Annotated[str, Depends(_caller)]
CaseId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _sla(request: Request) -> float:
    return float(request.app.state.config.console.case_sla)


def _ip(request: Request) -> str:
    return request.client.host if request.client else ""


async def _case(store: LogStore, case_id: int, sla: float) -> CaseView:
    view = await store.case(case_id, sla=sla)
    if view is None:
        raise HTTPException(404, f"no case {case_id}")
    return view


@router.get("/cases", response_model=CasePage, summary="Cases, newest first")
async def list_cases(
    *,
    request: Request,
    store: Store,
    state: Annotated[CaseState | None, Query()] = None,
    owner: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    overdue: Annotated[bool | None, Query(description="Open longer than [console] case_sla")] = None,
    escalated: Annotated[bool | None, Query(description="Escalated at some time")] = None,
    queue_id: Annotated[str | None, Query(pattern=r"^[0-9A-Za-z]{1,32}$", description="Covers this message")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> CasePage:
    before = None if cursor is None else _parse_id_cursor(cursor)
    views, more = await store.cases(
        state=state, owner=owner, overdue=overdue, escalated=escalated,
        queue_id=None if queue_id is None else queue_id.upper(), sla=_sla(request), limit=limit, before=before,
    )  # fmt: skip
    return CasePage(cases=[schemas.case(v) for v in views], next_cursor=_id_cursor(more))


@router.post(
    "/cases", response_model=Case, status_code=201, summary="Open a case over some messages", responses=_NOT_JSON
)
async def open_case(request: Request, store: Store, caller: Caller, body: CaseRequest) -> Case:
    try:
        view = await store.open_case(
            title=body.title, customer_ref=body.customer_ref, owner=body.owner,
            queue_ids=[q.upper() for q in body.queue_ids], actor=caller, ip=_ip(request), incident=body.incident,
        )  # fmt: skip
    except ValueError as exc:
        raise _invalid(
            "body", _field(str(exc), ("queue_ids", "title", "customer_ref", "owner", "incident")), str(exc)
        ) from exc
    full = await _case(store, view.id, _sla(request))
    return schemas.case(full, entries=True, messages=await store.case_messages(full))


@router.get("/cases/{case_id}", response_model=Case, summary="One case: its trail and its messages", responses=_NO_CASE)
async def get_case(request: Request, store: Store, case_id: CaseId) -> Case:
    view = await _case(store, case_id, _sla(request))
    return schemas.case(view, entries=True, messages=await store.case_messages(view))


@router.post(
    "/cases/{case_id}/entries",
    response_model=CaseEntry,
    status_code=201,
    summary="Append an entry to a case's trail",
    description="`kind` and the entry's fields: interaction {channel: email|phone|chat|internal, summary}, "
    "escalation {to, why}, resolution {summary}, confirmation {how}, feedback {score: 1-5, comment}, "
    "incident {summary}. Actions are not written here: run them on the message with the case's id.",
    responses={**_NO_CASE, **_CLOSED, **_NOT_JSON},
)
async def add_entry(
    request: Request, store: Store, caller: Caller, case_id: CaseId, body: CaseEntryRequest
) -> CaseEntry:
    details = dict(body.model_extra or {})
    if body.kind == "action":
        raise _invalid("body", "kind", "actions run through the message actions (retry, resend, ...) with the case id")
    try:
        entry = await store.add_case_entry(case_id, body.kind, details, actor=caller, ip=_ip(request))  # type: ignore[arg-type]
    except ValueError as exc:
        raise _invalid("body", _field(str(exc), ("kind", *details)), str(exc)) from exc
    except NotFound as exc:
        raise HTTPException(404, f"no case {case_id}") from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    return schemas.case_entry(entry)


@router.post(
    "/cases/{case_id}/close",
    response_model=Case,
    summary="Close a case unresolved, with the reason",
    responses={**_NO_CASE, **_CLOSED, **_NOT_JSON},
)
async def close_case(request: Request, store: Store, caller: Caller, case_id: CaseId, body: CloseRequest) -> Case:
    try:
        view = await store.close_case(case_id, body.reason, actor=caller, ip=_ip(request))
    except ValueError as exc:
        raise _invalid("body", "reason", str(exc)) from exc
    except NotFound as exc:
        raise HTTPException(404, f"no case {case_id}") from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    return schemas.case(view)


def _field(message: str, fields: tuple[str, ...]) -> str:
    """The field a ValueError's message names first (for ``detail[].loc``), else "body"."""
    named = [f for f in fields if message.startswith(f) or f" {f} " in f" {message} "]
    if not named and message.startswith("no message"):
        return "queue_ids"
    return named[0] if named else "body"
