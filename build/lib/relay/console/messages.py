"""A message's page (summary, recipients, the merged timeline, headers, the body for support),
its sandboxed HTML, its .eml, the raw reports of its bounces, support's actions on it, and
the held messages page."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import Response

from relay.console import mime, timeline, web
from relay.console.web import CSRF, Support, Viewer
from relay.errors import ReasonRequired, RelayError, StoreError
from relay.model import CLOSED_CASE_STATES, FINAL_STATES, HELD, CaseView, MessageView, Suppression

log = logging.getLogger(__name__)

router = APIRouter(prefix=web.PREFIX, include_in_schema=False)

QUEUE_ID = r"^[0-9A-Za-z]{26}$"
QueueId = Annotated[str, Path(pattern=QUEUE_ID)]
# The HTML part, in a frame that can run nothing and fetch nothing (CSP "sandbox" too, for a
# browser that opens the URL outside the frame); only the console's own page may frame it.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox; frame-ancestors 'self'"
MAX_RECIPIENTS_CHECKED = 50  # recipients whose suppression entry the page looks up
T = TypeVar("T")


async def _message(request: Request, queue_id: str) -> MessageView:
    view = await web.store_of(request).get_message(queue_id.upper())
    if view is None:
        raise web.ConsoleError(404, f"There is no message {queue_id.upper()}.")
    return view


async def _cases_of(request: Request, queue_id: str) -> list[CaseView]:
    found, _ = await web.store_of(request).cases(queue_id=queue_id, sla=web.config_of(request).console.case_sla)
    return found


@router.get("/messages/{queue_id}", name="message")
async def message_page(request: Request, user: Viewer, queue_id: QueueId) -> Response:
    store = web.store_of(request)
    view = await _message(request, queue_id)
    qid = view.queue_id
    # The reads are independent: run them at once (each on a reader thread).
    checked = [r.address for r in view.recipients[:MAX_RECIPIENTS_CHECKED]]
    webhooks, cases, raw = await asyncio.gather(
        store.message_webhooks(qid), _cases_of(request, qid), store.raw_message(qid)
    )
    entries = await asyncio.gather(*(store.suppression(a) for a in checked))
    parsed = await asyncio.to_thread(mime.parse, raw) if raw is not None else None
    suppressed: dict[str, Suppression] = {a: e for a, e in zip(checked, entries, strict=True) if e is not None}
    show_body = user.can_act and parsed is not None and (parsed.text is not None or parsed.html is not None)
    if show_body:
        assert parsed is not None
        parts = [p for p, present in (("text", parsed.text is not None), ("html", parsed.html is not None)) if present]
        await web.audit(request, actor=user.name, action="view_body", target=qid, details={"parts": parts})
    return web.render(
        request, "message.html",
        {
            "m": view, "story": timeline.story(view, webhooks, cases), "cases": cases,
            "open_cases": [c for c in cases if c.state not in CLOSED_CASE_STATES],
            "parsed": parsed, "body_kept": raw is not None, "show_body": show_body, "suppressed": suppressed,
            "held": any(r.status == HELD for r in view.recipients),
            "final": all(r.status in FINAL_STATES for r in view.recipients),
        },
    )  # fmt: skip


@router.get("/messages/{queue_id}/html", name="message_html")
async def message_html(request: Request, user: Support, queue_id: QueueId) -> Response:
    qid = queue_id.upper()
    raw = await web.store_of(request).raw_message(qid)
    if raw is None:
        raise web.ConsoleError(404, f"The body of {qid} is not kept.")
    parsed = await asyncio.to_thread(mime.parse, raw)
    if parsed.html is None:
        raise web.ConsoleError(404, f"{qid} has no HTML part.")
    await web.audit(request, actor=user.name, action="view_body", target=qid, details={"parts": ["html"]})
    page = await asyncio.to_thread(mime.inert_html, parsed.html)
    return Response(
        page, media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": HTML_CSP, "X-Frame-Options": "SAMEORIGIN"},
    )  # fmt: skip


@router.get("/messages/{queue_id}/eml", name="message_eml")
async def message_eml(request: Request, user: Support, queue_id: QueueId) -> Response:
    qid = queue_id.upper()
    raw = await web.store_of(request).raw_message(qid)
    if raw is None:
        await _message(request, qid)
        raise web.ConsoleError(404, f"The body of {qid} is not kept any more.")
    # Recorded before the body leaves: a download that cannot be audited does not happen.
    await web.audit(
        request, actor=user.name, action="download", target=qid, details={"via": "console", "size": len(raw)}
    )
    return Response(
        raw, media_type="message/rfc822", headers={"Content-Disposition": f'attachment; filename="{qid}.eml"'}
    )


@router.get("/reports/{report_id}", name="report")
async def report(request: Request, user: Support, report_id: Annotated[int, Path(ge=1, le=2**62)]) -> Response:
    raw = await web.store_of(request).bounce_report(report_id)
    if raw is None:
        raise web.ConsoleError(404, f"There is no report {report_id}.")
    await web.audit(request, actor=user.name, action="view_report", target=f"report:{report_id}")
    # As text: a report quotes the original message, which must not render as HTML here.
    return Response(
        raw.decode("utf-8", errors="replace"), media_type="text/plain; charset=utf-8",
        headers={"Content-Security-Policy": "default-src 'none'; sandbox"},
    )  # fmt: skip


# -- actions (support): each a POST with the CSRF token, then back to the message with a message


def _case_id(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 18:
        raise web.ConsoleError(400, "That case number is not valid.")
    return int(text)


class Refused(Exception):
    """An action the store refused, with the sentence to show."""


async def _run(op: Awaitable[T]) -> T:
    """A store action's result, or Refused with why (an unknown or closed case, a bad address...)."""
    try:
        return await op
    except ReasonRequired as exc:
        raise Refused("A reason is required to lift a suppression added for a complaint.") from exc
    except StoreError as exc:
        log.exception("console action failed")
        raise Refused("Not done: the store could not be reached. Try again.") from exc
    except (RelayError, ValueError) as exc:  # NotFound, Conflict, bad input: their words are for people
        raise Refused(f"Not done: {exc}") from exc


def _back(request: Request, queue_id: str, done: str, *, error: bool = False, back: str = "") -> Response:
    """To the page the form came from (``back``, when a console page) else the message's."""
    return web.redirect(request, web.local_path(back, f"{web.PREFIX}/messages/{queue_id}"), flash=done, error=error)


Text = Annotated[str, Form(max_length=10_000)]
CaseField = Annotated[str, Form(max_length=40)]
Back = Annotated[str, Form(max_length=2000)]
Address = Annotated[str, Form(max_length=320)]


@router.post("/messages/{queue_id}/retry", dependencies=[CSRF])
async def retry(
    request: Request, user: Support, queue_id: QueueId, reason: Text = "", case_id: CaseField = ""
) -> Response:
    qid, store = queue_id.upper(), web.store_of(request)
    try:  # delivery is woken by the store once the retry has committed
        n = await _run(store.retry(qid, by=user.name, reason=reason, case_id=_case_id(case_id), ip=user.ip))
    except Refused as exc:
        return _back(request, qid, str(exc), error=True)
    if not n:
        return _back(
            request, qid, "Nothing to retry: no recipient is queued, deferred, expired or bounced.", error=True
        )
    return _back(request, qid, f"Retry requested: {n} recipient{'' if n == 1 else 's'} due now.")


@router.post("/messages/{queue_id}/cancel", dependencies=[CSRF])
async def cancel(
    request: Request, user: Support, queue_id: QueueId, reason: Text = "", case_id: CaseField = ""
) -> Response:
    qid, store = queue_id.upper(), web.store_of(request)
    try:
        n = await _run(store.cancel(qid, by=user.name, reason=reason, case_id=_case_id(case_id), ip=user.ip))
    except Refused as exc:
        return _back(request, qid, str(exc), error=True)
    if not n:
        return _back(request, qid, "Nothing to cancel: every recipient is final already.", error=True)
    return _back(request, qid, "Cancelled: the recipients that were still waiting will not be sent.")


@router.post("/messages/{queue_id}/resend", dependencies=[CSRF])
async def resend(
    request: Request,
    *,
    user: Support,
    queue_id: QueueId,
    address: Address = "",
    new_address: Address = "",
    reason: Text = "",
    case_id: CaseField = "",
) -> Response:
    qid, store, to = queue_id.upper(), web.store_of(request), new_address.strip()
    op = store.resend(qid, address, to, by=user.name, ip=user.ip, case_id=_case_id(case_id), reason=reason)
    try:
        new_id = await _run(op)
    except Refused as exc:
        return _back(request, qid, str(exc), error=True)
    return _back(request, new_id, f"Sent again to {to} as this new message; the original links here.")


@router.post("/messages/{queue_id}/unsuppress", dependencies=[CSRF])
async def unsuppress(
    request: Request,
    *,
    user: Support,
    queue_id: QueueId,
    address: Address = "",
    reason: Text = "",
    case_id: CaseField = "",
) -> Response:
    qid, store = queue_id.upper(), web.store_of(request)
    op = store.unsuppress_recipient(
        qid, address, reason, by=user.name, ip=user.ip, case_id=_case_id(case_id), origin="api"
    )
    try:
        await _run(op)
    except Refused as exc:
        return _back(request, qid, str(exc), error=True)
    return _back(request, qid, f"{address} is no longer on the suppression list.")


@router.post("/messages/{queue_id}/note", dependencies=[CSRF])
async def note(
    request: Request, user: Support, queue_id: QueueId, text: Text = "", case_id: CaseField = ""
) -> Response:
    qid, store = queue_id.upper(), web.store_of(request)
    try:
        await _run(store.comment(qid, text, by=user.name, ip=user.ip, case_id=_case_id(case_id)))
    except Refused as exc:
        return _back(request, qid, str(exc), error=True)
    return _back(request, qid, "Note added.")


@router.post("/messages/{queue_id}/release", dependencies=[CSRF])
async def release(
    request: Request, user: Support, queue_id: QueueId, case_id: CaseField = "", back: Back = ""
) -> Response:
    qid, store = queue_id.upper(), web.store_of(request)
    try:  # delivery is woken by the store once the release has committed
        n = await _run(store.release(qid, by=user.name, ip=user.ip, case_id=_case_id(case_id)))
    except Refused as exc:
        return _back(request, qid, str(exc), error=True, back=back)
    if not n:
        return _back(request, qid, f"Nothing was held in {qid}.", error=True, back=back)
    return _back(request, qid, f"Released {qid}: it is being sent now.", back=back)


@router.post("/messages/{queue_id}/discard", dependencies=[CSRF])
async def discard(
    request: Request, user: Support, queue_id: QueueId, case_id: CaseField = "", back: Back = ""
) -> Response:
    qid, store = queue_id.upper(), web.store_of(request)
    try:
        n = await _run(store.discard(qid, by=user.name, ip=user.ip, case_id=_case_id(case_id)))
    except Refused as exc:
        return _back(request, qid, str(exc), error=True, back=back)
    if not n:
        return _back(request, qid, f"Nothing was held in {qid}.", error=True, back=back)
    return _back(request, qid, f"Discarded {qid}: it will not be sent.", back=back)


# -- held messages (hold mode)

HELD_LIMIT = 200


@router.get("/held", name="held")
async def held_page(request: Request, user: Viewer) -> Response:
    store = web.store_of(request)
    entries = await store.queue_list(state=HELD, limit=HELD_LIMIT * 5)
    order: list[str] = []
    for e in entries:
        if e.queue_id not in order:
            order.append(e.queue_id)
    views = []
    for qid in order[:HELD_LIMIT]:
        view = await store.get_message(qid)
        if view is not None:
            views.append(view)
    config = web.config_of(request)
    return web.render(
        request, "held.html",
        {"messages": views, "more": len(order) > HELD_LIMIT, "hold_all": config.delivery.hold,
         "hold_users": config.delivery.hold_users},
    )  # fmt: skip
