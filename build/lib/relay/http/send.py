"""POST /api/v1/messages: sending over HTTP, through the same intake as SMTP.

The request is either a whole message (``raw``, base64, with its envelope) or its parts, which
relay.compose builds into one. Either way it then meets the SMTP listener's checks and limits:
``[smtp] max_message_size`` (413), ``max_recipients``, the RCPT address rule, suppression with
``reject_at_rcpt``, lines of at most 1000 octets, and ``intake.inspect`` (header rules, tags,
tracking, loops). Every refusal is 422 naming the field in ``detail[].loc``. The message is
stored in one transaction and only then answered 201; delivery is woken by the store.

``Idempotency-Key`` (per API token): its row is written in the message's own transaction, so a
retried request, or a concurrent twin, gets the first request's answer and nothing is sent
twice. The same key with a different request is 422, as the IETF draft
(draft-ietf-httpapi-idempotency-key-header) advises: the request is wrong, not in conflict
with the server's state (409 is for a twin still in progress, which cannot happen here: the
second of two twins waits for the first's commit).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, HTTPException, Request, Response
from pydantic import ValidationError
from ulid import ULID

from relay import compose, intake, metrics
from relay.config import Config
from relay.errors import InvalidMessage, StoreError, TooManyHops
from relay.http.api import Caller, Store
from relay.http.schemas import Problem, SendRequest, SendResult
from relay.logs import with_ids
from relay.logstore import IdempotencyKey, Idempotent, LogStore
from relay.model import NewMessage
from relay.smtp_in import HEAVY_CONTENT, long_line, valid_address

log = logging.getLogger(__name__)
T = TypeVar("T")

BODY_SLACK = 64 * 1024  # bytes of JSON beyond the base64 of a message of the maximum size
_WHITESPACE = re.compile(rb"[ \t\r\n]+")
_STRUCTURED = ("from_", "cc", "bcc", "reply_to", "subject", "text", "html", "headers", "tags", "attachments", "track")
_TAG_PROBLEM = re.compile(r"[\x00-\x1f\x7f,]")


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` put in place: the request body is read by hand
    (bounded, see ``_read_body``), so FastAPI does not publish its model; the document does."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


_BODY = {"required": True, "content": {"application/json": {"schema": _inline(SendRequest.model_json_schema())}}}
router = APIRouter(prefix="/api/v1", tags=["send"])


def _invalid(loc: tuple[str | int, ...], message: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


@router.post(
    "/messages",
    status_code=201,
    response_model=SendResult,
    summary="Send a message: 201 once it is stored and queued (a replayed Idempotency-Key: 201 again, "
    "with Idempotent-Replayed: true)",
    openapi_extra={"requestBody": _BODY},
    responses={
        401: {"model": Problem, "description": "Missing or wrong bearer token"},
        403: {"model": Problem, "description": "A read-only token"},
        413: {"model": Problem, "description": "The message (or the request) is larger than the limit"},
        422: {"model": Problem, "description": "A field is invalid or refused; `detail[].loc` names it"},
        503: {"model": Problem, "description": "The store failed; nothing was queued, try again"},
    },
)
async def send_message(
    request: Request,
    response: Response,
    store: Store,
    caller: Caller,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=r"^[\x20-\x7e]{1,255}$",
            description="A retry with the same key and body returns the first answer instead of sending again",
        ),
    ] = None,
) -> SendResult:
    config: Config = request.app.state.config
    limit = config.smtp.max_message_size
    body = await _read_body(request, int(limit * 1.4) + BODY_SLACK)
    try:
        req = await _work(len(body), SendRequest.model_validate_json, body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise HTTPException(422, [{**e, "loc": ["body", *e["loc"]]} for e in errors]) from exc
    # Every string is UTF-8 from here: the JSON parser refuses a lone surrogate ("\udc80").
    key = None
    if idempotency_key is not None:
        key = IdempotencyKey(caller, idempotency_key, await _work(len(body), _fingerprint, req))
        first = await _store_call(store.idempotency_key(caller, key.key))
        if first is not None:
            return _replay(first, key, response)

    ip = request.client.host if request.client else ""
    sender, recipients, raw = await _message(req, config, store, limit)
    queue_id = str(ULID())
    with with_ids(queue_id=queue_id):
        arrival = intake.Arrival(
            queue_id=queue_id, hostname=config.server.hostname, helo="api", client_ip=ip, protocol="HTTP",
            tls=None, recipients=recipients, at=time.time(),
        )  # fmt: skip
        box = [raw]
        del raw
        where = "raw" if req.raw is not None else "headers"
        try:
            if len(box[0]) > HEAVY_CONTENT:
                prepared, track, links = await asyncio.to_thread(
                    intake.inspect, box, arrival, config.smtp.max_hops, config.tracking
                )
            else:
                prepared, track, links = intake.inspect(box, arrival, config.smtp.max_hops, config.tracking)
        except InvalidMessage as exc:
            log.info("refused message from %s (%s): %s", ip, caller, exc.reply)
            raise _invalid((_field_of(exc, where),), str(exc.reply)) from exc
        msg = NewMessage(
            queue_id=queue_id, message_id=prepared.message_id, mail_from=sender, recipients=recipients,
            subject=prepared.subject, tags=prepared.tags, user=caller, client_ip=ip, received_at=arrival.at,
            raw=prepared.raw,
            details={"client_ip": ip, "protocol": "HTTP", "user": caller, "token": caller, "size": len(prepared.raw),
                     "recipients": len(recipients)},
            track=track, links=links,
        )  # fmt: skip
        first = await _store_call(store.enqueue(msg, key))
        if first is not None:
            assert key is not None  # only a key's twin comes back unstored
            return _replay(first, key, response)
        metrics.RECEIVED.inc()
        log.info(
            "accepted over HTTP from=<%s> rcpts=%d size=%d client=%s user=%s",
            sender, len(recipients), msg.size, ip, caller,
        )  # fmt: skip
        return SendResult(id=queue_id, message_id=prepared.message_id)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes:
    by its Content-Length before reading any of it, else while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _fingerprint(req: SendRequest) -> str:
    """SHA-256 of the request as parsed (keys sorted): the same request in other JSON spacing
    or key order is the same request."""
    canonical = json.dumps(req.model_dump(by_alias=True, exclude_unset=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _store_call(aw: Awaitable[T]) -> T:
    try:
        return await aw
    except StoreError as exc:
        log.exception("store failed while sending over HTTP")
        raise HTTPException(503, "the store failed; nothing was queued, try again") from exc


def _replay(first: Idempotent, key: IdempotencyKey, response: Response) -> SendResult:
    if first.request_hash != key.request_hash:
        raise HTTPException(
            422,
            [{"loc": ["header", "Idempotency-Key"], "msg": "this key was used with a different request",
              "type": "value_error"}],
        )  # fmt: skip
    response.headers["Idempotent-Replayed"] = "true"
    return SendResult(id=first.queue_id, message_id=first.message_id)


def _field_of(exc: InvalidMessage, where: str) -> str:
    """The request field an intake refusal is about."""
    if isinstance(exc, TooManyHops):
        return "raw"
    text = exc.reply.text
    if "X-Relay-Tag" in text:
        return "tags"
    if "X-Relay-Track" in text:
        return "track"
    return where


async def _message(req: SendRequest, config: Config, store: LogStore, limit: int) -> tuple[str, tuple[str, ...], bytes]:
    """The envelope sender, the envelope recipients and the message, checked as SMTP checks them."""
    if req.raw is not None:
        for name in sorted(req.model_fields_set & set(_STRUCTURED)):
            raise _invalid(("from" if name == "from_" else name,), "not allowed with raw (put it in the message)")
        if req.mail_from is None:
            raise _invalid(("mail_from",), "required with raw")
        sender = _sender(req.mail_from, ("mail_from",))
        recipients = await _recipients([("to", i, a) for i, a in enumerate(req.to)], config, store, bare=True)
        return sender, recipients, await _work(len(req.raw), _raw_message, req.raw, limit)
    if req.mail_from is not None:
        raise _invalid(("mail_from",), "only with raw; `from` is the envelope sender")
    if req.from_ is None:
        raise _invalid(("from",), "required (or send raw)")
    sender_box = _mailbox(req.from_, ("from",))
    sender = _sender(sender_box.address, ("from",))
    listed = [(f, i, a) for f in ("to", "cc", "bcc") for i, a in enumerate(getattr(req, f))]
    recipients = await _recipients(listed, config, store, bare=False)
    size = sum(len(a.content) for a in req.attachments) + len(req.text or "") + len(req.html or "")
    return sender, recipients, await _work(size, _built_message, req, sender_box, limit)


async def _work(size: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), in a worker thread when ``size`` says it is a big message's linear work (as
    SMTP does past HEAVY_CONTENT): the event loop keeps serving everyone else."""
    if size > HEAVY_CONTENT:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _raw_message(text: str, limit: int) -> bytes:
    raw = _base64(text, ("raw",), limit)
    if b"\r" not in raw:
        raw = raw.replace(b"\n", b"\r\n")  # a message written with Unix line ends
    if long_line(raw):
        raise _invalid(("raw",), "a line is longer than 1000 octets (RFC 5321 4.5.3.1.6)")
    return raw


def _built_message(req: SendRequest, sender: compose.Mailbox, limit: int) -> bytes:
    try:
        built = compose.build(_draft(req, sender, limit))
    except compose.ComposeError as exc:
        raise _invalid(exc.field, exc.problem) from exc
    control = [f"X-Relay-Tag: {t}\r\n".encode() for t in req.tags]
    if req.track is not None:
        control.append(f"X-Relay-Track: {req.track}\r\n".encode())
    raw = b"".join((*control, built))
    if len(raw) > limit:
        raise HTTPException(413, f"the message is larger than {limit} bytes")
    if long_line(raw):
        raise _invalid(("headers",), "a header line is longer than 1000 octets")
    return raw


def _ok_text(text: str) -> bool:
    return "\r" not in text and "\n" not in text and "\x00" not in text


def _mailbox(text: str, loc: tuple[str | int, ...]) -> compose.Mailbox:
    try:
        return compose.mailbox(text, loc)
    except compose.ComposeError as exc:
        raise _invalid(exc.field, exc.problem) from exc


def _sender(address: str, loc: tuple[str | int, ...]) -> str:
    if not _ok_text(address) or not valid_address(address.strip()):
        raise _invalid(loc, "not a valid address")
    return address.strip()


async def _recipients(
    listed: list[tuple[str, int, str]], config: Config, store: LogStore, *, bare: bool
) -> tuple[str, ...]:
    """The envelope recipients, as RCPT takes them: valid addresses, no domain literals, each
    once, at most ``[smtp] max_recipients``, none suppressed (with ``reject_at_rcpt``)."""
    if not listed:
        raise _invalid(("to",), "at least one recipient is required")
    out: list[str] = []
    seen: set[str] = set()
    for field, i, text in listed:
        loc = (field, i)
        if not _ok_text(text):
            raise _invalid(loc, "control characters are not allowed in an address")
        address = text.strip() if bare else _mailbox(text, loc).address
        if not valid_address(address):
            raise _invalid(loc, "not a valid address")
        local, _, domain = address.rpartition("@")
        if domain.startswith("["):
            raise _invalid(loc, "domain literals are not accepted")
        address = f"{local}@{domain.lower()}"
        if address.lower() in seen:
            continue  # a duplicate is delivered once
        if len(out) >= config.smtp.max_recipients:
            raise _invalid(loc, f"too many recipients (at most {config.smtp.max_recipients})")
        if config.suppression.reject_at_rcpt:
            entry = await _store_call(store.suppression_check(address))
            if entry is not None:
                metrics.SUPPRESSED.labels(entry.reason).inc()
                log.info("refused suppressed recipient <%s> (entry %s, %s)", address, entry.address, entry.reason)
                raise _invalid(loc, f"suppressed: {entry.address} is on the suppression list ({entry.reason})")
        seen.add(address.lower())
        out.append(address)
    return tuple(out)


def _base64(text: str, loc: tuple[str | int, ...], limit: int) -> bytes:
    try:
        data = _WHITESPACE.sub(b"", text.encode("ascii"))  # line-wrapped base64 is fine
    except UnicodeEncodeError as exc:
        raise _invalid(loc, "not base64") from exc
    if len(data) // 4 * 3 > limit + 3:
        raise HTTPException(413, f"the message is larger than {limit} bytes")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(loc, "not base64") from exc
    if len(decoded) > limit:
        raise HTTPException(413, f"the message is larger than {limit} bytes")
    return decoded


def _reply_to(text: str) -> compose.Mailbox:
    box = _mailbox(text, ("reply_to",))
    if not valid_address(box.address):
        raise _invalid(("reply_to",), "not a valid address")
    return box


def _draft(req: SendRequest, sender: compose.Mailbox, limit: int) -> compose.Draft:
    for name, value in req.headers.items():
        if problem := compose.check_header(name, value):
            raise _invalid(("headers", name), problem)
    if len(req.tags) > intake.MAX_TAGS:
        raise _invalid(("tags",), f"at most {intake.MAX_TAGS} tags")
    for i, tag in enumerate(req.tags):
        if not tag.strip() or len(tag) > intake.MAX_TAG_LENGTH or _TAG_PROBLEM.search(tag):
            raise _invalid(("tags", i), f"1 to {intake.MAX_TAG_LENGTH} printable characters, no comma")
    if req.track is not None and not _ok_text(req.track):
        raise _invalid(("track",), "expected none, opens, clicks or opens,clicks")
    for name in ("subject", "text", "html"):
        value = getattr(req, name)
        if value is not None and "\x00" in value:
            raise _invalid((name,), "NUL characters are not allowed")
    total = 0
    attachments = []
    for i, a in enumerate(req.attachments):
        content = _base64(a.content, ("attachments", i, "content"), limit - total)
        total += len(content)
        compose.content_type(a.content_type, ("attachments", i, "content_type"))
        attachments.append(compose.Attachment(a.filename, a.content_type, content))
    return compose.Draft(
        sender=sender,
        to=tuple(_mailbox(a, ("to", i)) for i, a in enumerate(req.to)),
        cc=tuple(_mailbox(a, ("cc", i)) for i, a in enumerate(req.cc)),
        reply_to=None if req.reply_to is None else _reply_to(req.reply_to),
        subject=req.subject,
        text=req.text,
        html=req.html,
        headers=tuple(req.headers.items()),
        attachments=tuple(attachments),
    )
