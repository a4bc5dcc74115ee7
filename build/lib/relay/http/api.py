"""The JSON API under /api/v1: find messages, show one, retry one, stats; the suppression list.
Bearer tokens.

A message is the same object ``relay log --json`` prints: both are built by relay.http.schemas,
which also holds every model of the OpenAPI document. Parameters are validated by
FastAPI/pydantic: a bad one is 422 with the field named in ``detail[].loc``. Every query is
parameterised (SQLAlchemy Core, in LogStore).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from relay.errors import Conflict, NotFound, ReasonRequired
from relay.http import schemas
from relay.http.schemas import (
    ActionRequest,
    ActionResult,
    CaseRef,
    Message,
    MessagePage,
    NoteRequest,
    Problem,
    ResendRequest,
    ResendResult,
    RetryRequest,
    RetryResult,
    Stats,
    SuppressionAudit,
    SuppressionCheck,
    SuppressionEntry,
    SuppressionPage,
    SuppressionRequest,
    UnsuppressRecipientRequest,
    UnsuppressRequest,
)
from relay.logstore import LogStore
from relay.model import Suppression, SuppressionReason
from relay.search import QueryError

T = TypeVar("T")
State = Literal["queued", "deferred", "sending", "held", "delivered", "bounced", "expired", "suppressed", "cancelled"]
QUEUE_ID = r"^[0-9A-Za-z]{26}$"
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: 422, not a 500
_bearer = HTTPBearer(auto_error=False, description="One of the tokens in [http] api_tokens")


class Tokens:
    """API tokens, compared in constant time (as SHA-256 digests, so lengths do not leak).
    ``readonly`` tokens ([http] api_tokens_readonly) may only read, and never a body; a token
    listed in both is read-only."""

    def __init__(self, tokens: tuple[str, ...], readonly: tuple[str, ...] = ()) -> None:
        ro = {hashlib.sha256(t.encode()).digest() for t in readonly}
        full = {hashlib.sha256(t.encode()).digest() for t in tokens} - ro
        self._digests = [(d, False) for d in sorted(full)] + [(d, True) for d in sorted(ro)]

    def identify(self, presented: str) -> tuple[str, bool] | None:
        """(the token's label "api:...", whether it is read-only), or None for no token of ours."""
        digest = hashlib.sha256(presented.encode()).digest()
        match = None
        for known, readonly in self._digests:  # every one compared: the time does not tell which matched
            if hmac.compare_digest(digest, known):
                match = (known, readonly)
        return None if match is None else ("api:" + match[0].hex()[:12], match[1])

    def who(self, presented: str) -> str | None:
        found = self.identify(presented)
        return None if found is None else found[0]


def _store(request: Request) -> LogStore:
    store: LogStore = request.app.state.store
    return store


READ_METHODS = ("GET", "HEAD")


def _caller(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The token's label; 401 without a valid token, 403 when a read-only token asks to change
    anything (any method but GET and HEAD)."""
    found: tuple[str, bool] | None = None
    if credentials is not None and credentials.scheme.lower() == "bearer":
        tokens: Tokens = request.app.state.tokens
        found = tokens.identify(credentials.credentials)
    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    who, readonly = found
    request.state.read_only = readonly
    if readonly and request.method not in READ_METHODS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "read-only token")
    return who


def _full_token(request: Request, caller: Annotated[str, Depends(_caller)]) -> str:
    """The caller, if its token is not read-only (read-only tokens never read bodies)."""
    if getattr(request.state, "read_only", True):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "read-only token: message bodies are not readable with it")
    return caller


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or wrong bearer token"},
    403: {"model": Problem, "description": "A read-only token, for a change or a message body"},
    422: {"model": Problem, "description": "A parameter is invalid; `detail[].loc` names it"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such message"}}
router = APIRouter(prefix="/api/v1", dependencies=[Depends(_caller)], tags=["log"], responses=_ERRORS)
Store = Annotated[LogStore, Depends(_store)]
Caller = Annotated[str, Depends(_caller)]
FullCaller = Annotated[str, Depends(_full_token)]


def _cursor(after: tuple[float, str] | None) -> str | None:
    if after is None:
        return None
    return base64.urlsafe_b64encode(f"{after[0]!r}|{after[1]}".encode()).decode().rstrip("=")


def _parse_cursor(text: str) -> tuple[float, str]:
    try:
        at, _, last = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().partition("|")
        value = (float(at), last)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise _invalid("query", "cursor", "not a cursor this API returned") from exc
    if not last or value[0] != value[0] or "\x00" in last:  # NaN; a NUL, which PostgreSQL text refuses (a 500)
        raise _invalid("query", "cursor", "not a cursor this API returned")
    return value


def _invalid(where: str, name: str, message: str) -> HTTPException:
    return HTTPException(422, [{"loc": [where, name], "msg": message, "type": "value_error"}])


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


@router.get(
    "/messages",
    response_model=MessagePage,
    summary="Find messages, newest first",
    description="Filter with the parameters, or search with `q` (the console's grammar: `to:` `from:` `subject:` "
    "`message-id:` `id:` `tag:` `status:` `reason:` `domain:` `user:` `after:` `before:` `is:opened|clicked|"
    "suppressed|complained`, `-` to negate, quoted phrases, free text). `q` is not combined with the other "
    "filters: write them in `q`. With `q`, `total` counts the matches, up to 10,000.",
)
async def list_messages(
    *,
    store: Store,
    q: Annotated[
        str | None,
        Query(max_length=1000, description="A search, e.g. `to:jane@example.com status:bounced after:7d`"),
    ] = None,
    message_id: Annotated[
        str | None, Query(max_length=998, pattern=NO_NUL, description="Message-ID, with or without <>")
    ] = None,
    recipient: Annotated[str | None, Query(max_length=320, pattern=NO_NUL)] = None,
    id: Annotated[str | None, Query(pattern=QUEUE_ID, description="Queue id")] = None,
    tag: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    status: Annotated[State | None, Query(description="A recipient of the message is in this state")] = None,
    since: Annotated[datetime | None, Query(description="received at or after (ISO-8601 or epoch seconds)")] = None,
    until: Annotated[datetime | None, Query(description="received before (ISO-8601 or epoch seconds)")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> MessagePage:
    after = None if cursor is None else _parse_cursor(cursor)
    if q is not None:
        return await _search(store, q, (message_id, recipient, id, tag, status, since, until), limit, after)
    views, more = await store.search(
        queue_id=id, message_id=message_id, recipient=recipient, tag=tag, status=status,
        since=_ts(since), until=_ts(until), limit=limit, after=after,
    )  # fmt: skip
    return MessagePage(messages=[schemas.message(v) for v in views], next_cursor=_cursor(more))


async def _search(
    store: LogStore, q: str, filters: tuple[object, ...], limit: int, after: tuple[float, str] | None
) -> MessagePage:
    # One grammar per request: recipient= (exact) beside to: (exact or substring), since=
    # beside after:, would be two meanings for one question.
    if any(f is not None for f in filters):
        raise _invalid(
            "query", "q", "q cannot be combined with message_id, recipient, id, tag, status, since or until: "
            "write them in q (message-id:, to:, id:, tag:, status:, after:, before:)",
        )  # fmt: skip
    try:
        page = await store.search_messages(q, limit=limit, after=after)
    except QueryError as exc:
        raise _invalid("query", "q", str(exc)) from exc
    return MessagePage(
        messages=[schemas.message(v) for v in page.messages],
        next_cursor=_cursor(page.next),
        total=page.total,
        total_capped=page.total_capped,
    )


@router.get("/messages/{id}", response_model=Message, summary="One message and its timeline", responses=_NOT_FOUND)
async def get_message(store: Store, id: Annotated[str, Path(pattern=QUEUE_ID)]) -> Message:
    view = await store.get_message(id.upper())
    if view is None:
        raise HTTPException(404, "no such message")
    return schemas.message(view)


@router.post(
    "/messages/{id}/retry",
    response_model=RetryResult,
    summary="Make queued, deferred, expired or bounced recipients due now",
    responses={
        **_NOT_FOUND,
        400: {"model": Problem, "description": "The body is not JSON"},
        409: {"model": Problem, "description": "The case named by case_id is closed"},
    },
)
async def retry_message(
    request: Request,
    store: Store,
    caller: Caller,
    id: Annotated[str, Path(pattern=QUEUE_ID)],
    body: RetryRequest | None = None,
) -> RetryResult:
    case_id = body.case_id if body else None
    try:
        count = await store.retry(
            id.upper(), by=caller, reason=body.reason if body else "", case_id=case_id, ip=_client_ip(request)
        )  # RETRY_STATES
    except NotFound as exc:
        raise HTTPException(404, "no such message" if case_id is None else str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    request.app.state.wake_delivery()
    return RetryResult(id=id.upper(), retried=count)


# -- support actions on a message (the console's, for scripts); every one is audited

_ACTION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body is not JSON"},
    404: {"model": Problem, "description": "No such message, recipient or case"},
    409: {"model": Problem, "description": "The case is closed, or the action cannot be done (e.g. suppressed)"},
}


async def _act(aw: Awaitable[T]) -> T:
    """An action's store call, its refusals as Problem answers."""
    try:
        return await aw
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    except ReasonRequired as exc:
        raise _invalid("body", "reason", str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(422, [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]) from exc


@router.post(
    "/messages/{id}/cancel",
    response_model=ActionResult,
    summary="Cancel the recipients not final yet",
    tags=["actions"],
    responses=_ACTION_ERRORS,
)
async def cancel_message(
    request: Request, store: Store, caller: Caller, id: Annotated[str, Path(pattern=QUEUE_ID)],
    body: ActionRequest | None = None,
) -> ActionResult:  # fmt: skip
    reason, case_id = (body.reason, body.case_id) if body else ("", None)
    n = await _act(store.cancel(id.upper(), by=caller, reason=reason, case_id=case_id, ip=_client_ip(request)))
    return ActionResult(id=id.upper(), action="cancel", count=n)


@router.post(
    "/messages/{id}/resend",
    response_model=ResendResult,
    status_code=201,
    summary="Send the message again to a corrected address, as a new message linked to this one",
    tags=["actions"],
    responses=_ACTION_ERRORS,
)
async def resend_message(
    request: Request, store: Store, caller: Caller, id: Annotated[str, Path(pattern=QUEUE_ID)], body: ResendRequest
) -> ResendResult:
    new_id = await _act(
        store.resend(id.upper(), body.address, body.new_address, by=caller, ip=_client_ip(request),
                     case_id=body.case_id, reason=body.reason)
    )  # fmt: skip
    return ResendResult(id=id.upper(), new_id=new_id)


@router.post(
    "/messages/{id}/release",
    response_model=ActionResult,
    summary="Release held recipients (hold mode): queued, due now",
    tags=["actions"],
    responses=_ACTION_ERRORS,
)
async def release_message(
    request: Request, store: Store, caller: Caller, id: Annotated[str, Path(pattern=QUEUE_ID)],
    body: CaseRef | None = None,
) -> ActionResult:  # fmt: skip
    case_id = body.case_id if body else None
    n = await _act(store.release(id.upper(), by=caller, ip=_client_ip(request), case_id=case_id))
    if n:
        request.app.state.wake_delivery()
    return ActionResult(id=id.upper(), action="release", count=n)


@router.post(
    "/messages/{id}/discard",
    response_model=ActionResult,
    summary="Discard held recipients (hold mode): cancelled, never sent",
    tags=["actions"],
    responses=_ACTION_ERRORS,
)
async def discard_message(
    request: Request, store: Store, caller: Caller, id: Annotated[str, Path(pattern=QUEUE_ID)],
    body: CaseRef | None = None,
) -> ActionResult:  # fmt: skip
    case_id = body.case_id if body else None
    n = await _act(store.discard(id.upper(), by=caller, ip=_client_ip(request), case_id=case_id))
    return ActionResult(id=id.upper(), action="discard", count=n)


@router.post(
    "/messages/{id}/notes",
    response_model=ActionResult,
    status_code=201,
    summary="Add a support note to the message's timeline",
    tags=["actions"],
    responses=_ACTION_ERRORS,
)
async def add_note(
    request: Request, store: Store, caller: Caller, id: Annotated[str, Path(pattern=QUEUE_ID)], body: NoteRequest
) -> ActionResult:
    await _act(store.comment(id.upper(), body.text, by=caller, ip=_client_ip(request), case_id=body.case_id))
    return ActionResult(id=id.upper(), action="note", count=0)


@router.post(
    "/messages/{id}/unsuppress",
    response_model=ActionResult,
    summary="Remove the suppression entry of one of the message's recipients (a complaint's needs a reason)",
    tags=["actions"],
    responses=_ACTION_ERRORS,
)
async def unsuppress_recipient(
    request: Request, store: Store, caller: Caller, id: Annotated[str, Path(pattern=QUEUE_ID)],
    body: UnsuppressRecipientRequest,
) -> ActionResult:  # fmt: skip
    await _act(
        store.unsuppress_recipient(id.upper(), body.address, body.reason, by=caller, ip=_client_ip(request),
                                   case_id=body.case_id)
    )  # fmt: skip
    return ActionResult(id=id.upper(), action="unsuppress", count=1)


@router.get(
    "/messages/{id}/raw",
    summary="The message as stored and sent (message/rfc822); not for read-only tokens; audited",
    response_class=Response,
    responses={
        200: {"content": {"message/rfc822": {}}, "description": "The message, as an .eml attachment"},
        404: {"model": Problem, "description": "No such message, or its body is no longer kept"},
    },
)
async def raw_message(
    request: Request, store: Store, caller: FullCaller, id: Annotated[str, Path(pattern=QUEUE_ID)]
) -> Response:
    qid = id.upper()
    raw = await store.raw_message(qid)
    if raw is None:
        found = await store.get_message(qid)
        raise HTTPException(404, "no such message" if found is None else "the body is no longer kept")
    # Recorded before the body leaves: a download that cannot be audited does not happen.
    await store.audit(actor=caller, ip=_client_ip(request), action="download", target=qid,
                      details={"via": "api", "size": len(raw)})  # fmt: skip
    return Response(
        raw, media_type="message/rfc822", headers={"Content-Disposition": f'attachment; filename="{qid}.eml"'}
    )


@router.get("/stats", response_model=Stats, summary="What happened per tag, domain or user")
async def stats(
    store: Store,
    group_by: Annotated[Literal["tag", "domain", "user"], Query()] = "tag",
    since: Annotated[datetime | None, Query(description="default: 24 hours ago")] = None,
    until: Annotated[datetime | None, Query(description="default: now")] = None,
) -> Stats:
    end = until.timestamp() if until is not None else time.time()
    start = since.timestamp() if since is not None else end - 86400
    if start > end:
        raise _invalid("query", "since", "must not be after until")
    rows = await store.stats(start, end, group_by)
    return schemas.stats(start, end, group_by, rows)


# -- suppression

_NO_ENTRY: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "The address has no entry"}}
_NOT_JSON: dict[int | str, dict[str, Any]] = {400: {"model": Problem, "description": "The body is not JSON"}}


def _key(where: str, name: str, text: str) -> str:
    try:
        return schemas.suppression_address(text)
    except ValueError as exc:
        raise _invalid(where, name, str(exc)) from exc


def _id_cursor(before: int | None) -> str | None:
    return None if before is None else base64.urlsafe_b64encode(str(before).encode()).decode().rstrip("=")


def _parse_id_cursor(text: str) -> int:
    try:
        value = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        if value.isascii() and value.isdigit() and int(value) < 2**63:  # a BIGINT
            return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise _invalid("query", "cursor", "not a cursor this API returned")


@router.get(
    "/suppressions",
    response_model=SuppressionPage,
    summary="The suppression list, newest first",
    tags=["suppression"],
)
async def list_suppressions(
    store: Store,
    address: Annotated[str | None, Query(max_length=320, description="Only this address's (or `*@domain`'s)")] = None,
    reason: Annotated[SuppressionReason | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> SuppressionPage:
    key = None if address is None else _key("query", "address", address)
    after = None
    if cursor is not None:
        after = _parse_cursor(cursor)
        try:  # the address in it goes to the database: one that cannot be a key (a NUL) is no cursor of ours
            schemas.suppression_address(after[1])
        except ValueError as exc:
            raise _invalid("query", "cursor", "not a cursor this API returned") from exc
    entries, more = await store.suppressions(address=key, reason=reason, limit=limit, after=after)
    return SuppressionPage(suppressions=[schemas.suppression_entry(e) for e in entries], next_cursor=_cursor(more))


@router.post(
    "/suppressions",
    response_model=SuppressionEntry,
    status_code=201,
    summary="Suppress an address or a domain (reason manual, origin api)",
    tags=["suppression"],
    responses={
        200: {"model": SuppressionEntry, "description": "Suppressed already: the entry in force, unchanged"},
        **_NOT_JSON,
    },
)
async def add_suppression(
    response: Response, store: Store, caller: Caller, body: SuppressionRequest
) -> SuppressionEntry:
    now = time.time()
    try:
        expires_at = None if body.expires_at is None else schemas.expiry(body.expires_at, now)
    except ValueError as exc:  # it was in the future when the body was read
        raise _invalid("body", "expires_at", str(exc)) from exc
    entry = Suppression(body.address, "manual", "api", None, now, expires_at, body.note)
    try:
        found, new = await store.suppress(entry, actor=caller)
    except ValueError as exc:
        raise _invalid("body", "expires_at", str(exc)) from exc
    if not new:
        # Idempotent, as Postmark's and Mailgun's suppression endpoints are: a retried request
        # or a sync script succeeds; the status tells, and the entry in force is the answer.
        response.status_code = 200
    return schemas.suppression_entry(found)


@router.get(
    "/suppressions/check",
    response_model=SuppressionCheck,
    summary="Is mail to this address suppressed? By its own entry or its domain's",
    tags=["suppression"],
)
async def check_suppression(
    store: Store,
    address: Annotated[str, Query(max_length=320, pattern="@", description="A mailbox", examples=["jane@example.com"])],
) -> SuppressionCheck:
    _key("query", "address", address)
    entry = await store.suppression_check(address.strip())
    return SuppressionCheck(
        address=address.strip(),
        suppressed=entry is not None,
        entry=None if entry is None else schemas.suppression_entry(entry),
    )


@router.get(
    "/suppressions/audit",
    response_model=SuppressionAudit,
    summary="Who added and removed which entry, when and why; newest first",
    tags=["suppression"],
)
async def suppression_audit(
    store: Store,
    address: Annotated[str | None, Query(max_length=320, description="Only this address's (or `*@domain`'s)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> SuppressionAudit:
    key = None if address is None else _key("query", "address", address)
    before = None if cursor is None else _parse_id_cursor(cursor)
    changes, more = await store.suppression_audit(key, limit=limit, before=before)
    return SuppressionAudit(changes=[schemas.suppression_change(c) for c in changes], next_cursor=_id_cursor(more))


@router.get(
    "/suppressions/{address:path}",
    response_model=SuppressionEntry,
    summary="An address's (or `*@domain`'s) own entry",
    tags=["suppression"],
    responses=_NO_ENTRY,
)
async def get_suppression(store: Store, address: Annotated[str, Path(max_length=320)]) -> SuppressionEntry:
    key = _key("path", "address", address)
    entry = await store.suppression(key)
    if entry is None:
        raise HTTPException(404, f"{key} is not suppressed")
    return schemas.suppression_entry(entry)


@router.delete(
    "/suppressions/{address:path}",
    response_model=SuppressionEntry,
    summary="Remove an address's (or `*@domain`'s) entry; a complaint's needs a reason",
    tags=["suppression"],
    responses={**_NO_ENTRY, **_NOT_JSON},
)
async def remove_suppression(
    store: Store,
    caller: Caller,
    address: Annotated[str, Path(max_length=320)],
    body: UnsuppressRequest | None = None,
) -> SuppressionEntry:
    key = _key("path", "address", address)
    try:
        removed = await store.unsuppress(key, body.reason if body else "", actor=caller, origin="api")
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except ReasonRequired as exc:
        raise _invalid("body", "reason", str(exc)) from exc
    return schemas.suppression_entry(removed)


@router.get(
    "/bounce-reports/{id}",
    summary="A report as it came to the bounce listener (a DSN, an ARF complaint, an auto-reply)",
    response_class=Response,
    responses={200: {"content": {"message/rfc822": {}}}, 404: {"model": Problem, "description": "No such report"}},
)
async def bounce_report(store: Store, _: FullCaller, id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Response:
    # A report may quote the original message whole: a body, which read-only tokens do not read.
    raw = await store.bounce_report(id)
    if raw is None:
        raise HTTPException(404, "no such report")
    return Response(
        raw, media_type="message/rfc822", headers={"Content-Disposition": f'inline; filename="report-{id}.eml"'}
    )


# -- webhooks

_NO_DELIVERY: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such delivery"}}


@router.get(
    "/webhooks/deliveries",
    response_model=schemas.WebhookDeliveryPage,
    summary="Webhook deliveries (the outbox), newest first",
    tags=["webhooks"],
)
async def webhook_deliveries(
    store: Store,
    status: Annotated[Literal["pending", "failed", "delivered"] | None, Query()] = None,
    url: Annotated[str | None, Query(max_length=2000, pattern=NO_NUL, description="Only this endpoint's")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> schemas.WebhookDeliveryPage:
    before = None if cursor is None else _parse_id_cursor(cursor)
    found, more = await store.webhook_deliveries(status=status, url=url, limit=limit, before=before)
    return schemas.WebhookDeliveryPage(
        deliveries=[schemas.webhook_delivery(d) for d in found], next_cursor=_id_cursor(more)
    )


@router.post(
    "/webhooks/deliveries/{id}/retry",
    response_model=schemas.WebhookRetryResult,
    summary="Make a webhook delivery due now (pending, failed or delivered: sent again, same webhook-id)",
    tags=["webhooks"],
    responses=_NO_DELIVERY,
)
async def retry_webhook_delivery(
    store: Store, id: Annotated[int, Path(ge=1, le=2**63 - 1)]
) -> schemas.WebhookRetryResult:
    try:
        await store.webhook_retry(id)
    except NotFound as exc:
        raise HTTPException(404, "no such webhook delivery") from exc
    return schemas.WebhookRetryResult(id=id, status="pending")
