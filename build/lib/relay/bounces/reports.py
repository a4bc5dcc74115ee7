"""Reading what comes back to the bounce listener: DSNs, ARF complaints, auto-replies, other bounces.

``parse`` is a pure function over the raw bytes of one message. It never raises: a report from the
internet is hostile input, so every size is capped and only linear-time regular expressions run over
it. What a report *means* (reason, hard or soft) is ``classify``'s job; this module only reads it.

Detection order matters because the markers overlap: Postfix and Exim bounces carry
``Auto-Submitted: auto-replied`` too, so DSN and ARF come first, then text bounces with strong markers
(a MAILER-DAEMON sender, ``X-Failed-Recipients``, an MTA's own wording), then auto-replies, then text
bounces recognised only by their subject.
"""

from __future__ import annotations

import dataclasses
import email
import email.header
import email.message
import email.parser
import email.policy
import logging
import re
from typing import Any, Literal

log = logging.getLogger(__name__)

ReportKind = Literal["dsn", "arf", "auto_reply", "bounce", "unknown"]

MAX_RECIPIENTS = 1000
MAX_RELAY_REFS = 10
MAX_DIAGNOSTIC = 1000  # characters
_MAX_PARTS = 200  # MIME parts looked at; a report has three or four
_MAX_TEXT = 256 * 1024  # characters of a text part scanned for addresses and quoted headers
_MAX_FIELD_TEXT = 4 * 1024 * 1024  # characters of a delivery-status part (10,000 blocks fit)
_MAX_FLUFL = 64 * 1024  # octets of a text bounce given to flufl.bounce
_MAX_HEADER_VALUE = 4000  # characters kept of one header value before any work on it
_MAX_REF = 500  # characters of one X-Relay-Ref value


@dataclasses.dataclass(frozen=True, slots=True)
class RecipientStatus:
    action: str | None  # failed | delayed | delivered | relayed | expanded (lower case)
    status: str | None  # enhanced status code, "5.1.1"
    code: int | None  # the SMTP reply code in the diagnostic, 550
    diagnostic: str  # without its "smtp;" type, unfolded, whitespace collapsed; "" if none
    final_recipient: str | None  # address only, as given
    original_recipient: str | None
    remote_mta: str | None  # host only
    command: str | None = None  # the SMTP command refused (MAIL | RCPT | DATA), when the notice says


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    kind: ReportKind
    recipients: tuple[RecipientStatus, ...]
    reporting_mta: str | None
    subject: str
    feedback_type: str | None  # arf only, lower case
    user_agent: str | None
    source_ip: str | None
    arf_recipient: str | None  # arf Original-Rcpt-To (the first)
    relay_refs: tuple[str, ...]  # X-Relay-Ref values found, deduplicated, in order
    original_message_id: str | None  # without <>
    auto_reply_reason: str | None  # "vacation" | "auto_replied"


# --- text helpers -------------------------------------------------------------------------------

_WS = re.compile(r"\s+")
_TYPED = re.compile(r"^\s*[A-Za-z][A-Za-z0-9-]{0,30}\s*;\s*")  # "rfc822;", "smtp;", "dns;"
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_CODE = re.compile(r"(?<![\w.#-])([245][0-9][0-9])(?=[ :-]|$)")
_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?){1,10}"
)
_RELAY_REF_LINE = re.compile(r"^[ \t>]{0,10}X-Relay-Ref:[ \t]*([^\r\n]{1,500})", re.I | re.M)
_MESSAGE_ID_LINE = re.compile(r"^[ \t>]{0,10}Message-ID:[ \t]*<([^<>\s]{1,500})>", re.I | re.M)


def _unescape(value: str) -> str:
    """The parser keeps non-ASCII header bytes as surrogates; read them as UTF-8 (else U+FFFD)."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8", "replace")


def _collapse(value: str, limit: int = MAX_DIAGNOSTIC) -> str:
    return _WS.sub(" ", value[: limit * 4]).strip()[:limit]


def _untyped(value: str) -> str:
    """ "rfc822; <a@b>" -> "a@b"; "smtp; 550 ..." -> "550 ..."."""
    return _TYPED.sub("", value, count=1).strip()


def _address(value: str | None) -> str | None:
    if value is None:
        return None
    text = _collapse(_untyped(value), 500).strip("<> ")
    return text or None


def _host(value: str | None) -> str | None:
    if value is None:
        return None
    text = _collapse(_untyped(value), 500)
    if not text:
        return None
    host = text.split(" ", 1)[0].strip("[]").rstrip(".")
    return host or None


def _status_in(text: str) -> str | None:
    match = _STATUS.search(text)
    return ".".join(match.groups()) if match else None


def _code_in(text: str) -> int | None:
    match = _CODE.search(text)
    return int(match.group(1)) if match else None


def _header(msg: email.message.Message, name: str) -> str | None:
    """The first header `name`, unescaped and unfolded, or None. raw_items: no policy surprises."""
    wanted = name.lower()
    for key, value in msg.raw_items():
        if key.lower() == wanted:
            return _collapse(_unescape(str(value)), _MAX_HEADER_VALUE)
    return None


def _headers(msg: email.message.Message, name: str) -> list[str]:
    wanted = name.lower()
    return [_collapse(_unescape(str(v)), _MAX_HEADER_VALUE) for k, v in msg.raw_items() if k.lower() == wanted]


def _decoded_subject(msg: email.message.Message) -> str:
    raw = _header(msg, "subject")
    if raw is None:
        return ""
    try:
        text = str(email.header.make_header(email.header.decode_header(raw)))
    except Exception:  # an unknown charset or a broken encoded word: keep the raw text
        text = raw
    return _collapse(text)


# --- MIME helpers -------------------------------------------------------------------------------


class _BoundedMessage(email.message.Message):
    """A Message whose header values are cut to _MAX_HEADER_VALUE characters when read.

    The stdlib's parameter parser (get_param, get_boundary, get_content_charset; the parser itself
    asks for the boundary) is quadratic in the number of ";" and quotes in a Content-Type, so a
    2 MB one would take hours. Nothing Relay reads needs more of a header than that.
    """

    def get(self, name: str, failobj: Any = None) -> Any:
        value = super().get(name, failobj)
        if value is failobj or value is None:
            return value
        text = value if isinstance(value, str) else str(value)
        return text[:_MAX_HEADER_VALUE] if len(text) > _MAX_HEADER_VALUE else value


def _message(raw: bytes, *, headers_only: bool = False) -> email.message.Message:
    parser = email.parser.BytesParser(_BoundedMessage, policy=email.policy.compat32)
    return parser.parsebytes(raw, headersonly=headers_only)


def _parts(msg: email.message.Message) -> list[email.message.Message]:
    """Every part, depth first, without recursion and at most _MAX_PARTS of them."""
    out: list[email.message.Message] = []
    stack = [msg]
    while stack and len(out) < _MAX_PARTS:
        part = stack.pop()
        out.append(part)
        payload = part.get_payload()
        ctype = part.get_content_type()
        # The sub-messages of a message/rfc822 are the original: looked at separately, not walked.
        if isinstance(payload, list) and ctype not in ("message/delivery-status", "message/rfc822"):
            stack.extend(reversed([p for p in payload if isinstance(p, email.message.Message)]))
    return out


def _bytes_of(part: email.message.Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # a broken transfer encoding
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    return _unescape(payload).encode() if isinstance(payload, str) else b""


def _text_of(part: email.message.Message, limit: int = _MAX_TEXT) -> str:
    """A leaf part's text, decoded from its transfer encoding and charset (UTF-8 when unknown)."""
    data = _bytes_of(part)[: limit * 4]
    charset = part.get_content_charset() or "utf-8"
    try:
        text = data.decode(charset, "replace")
    except (LookupError, ValueError):
        text = data.decode("utf-8", "replace")
    return text[:limit]


def _structured_text(part: email.message.Message) -> str:
    """The text of a message/delivery-status or message/feedback-report part.

    The stdlib parser splits message/delivery-status into one Message per block and other message/*
    types into one Message with a body; put them back together as field text so that one reader
    handles every shape (and base64 parts, which it leaves alone).
    """
    payload = part.get_payload()
    if not isinstance(payload, list):
        return _text_of(part, _MAX_FIELD_TEXT)
    chunks: list[str] = []
    size = 0
    for block in payload:
        if not isinstance(block, email.message.Message):
            continue
        lines = [f"{k}: {_unescape(str(v))}" for k, v in block.raw_items()]
        body = block.get_payload()
        if isinstance(body, str) and body.strip():
            lines.append("")
            lines.append(_unescape(body))
        chunk = "\n".join(lines)
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_FIELD_TEXT:
            break
    return "\n\n".join(chunks)


def _field_blocks(text: str, max_blocks: int) -> list[dict[str, str]]:
    """Blank-line separated blocks of "Name: value" fields (RFC 3464, RFC 5965); first value wins."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
                if len(blocks) >= max_blocks:
                    return blocks
            current, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None and len(current[last]) < _MAX_HEADER_VALUE:
                current[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or " " in name:
            last = None
            continue
        if name in current:
            last = None  # a repeated field: keep the first, drop this one's continuation lines
            continue
        current[name] = value.strip()
        last = name
    if current:
        blocks.append(current)
    return blocks


def _original(parts: list[email.message.Message]) -> email.message.Message | None:
    """The enclosed original: a message/rfc822 part, or the header section in text/rfc822-headers."""
    for part in parts:
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
                return payload[0]
            return _headers_from(_text_of(part))
        if ctype in ("text/rfc822-headers", "text/global-headers"):
            return _headers_from(_text_of(part))
    return None


def _headers_from(text: str) -> email.message.Message:
    parser = email.parser.HeaderParser(_BoundedMessage, policy=email.policy.compat32)
    return parser.parsestr(text.lstrip("\r\n"), headersonly=True)


# --- relay refs ---------------------------------------------------------------------------------


class _Refs:
    def __init__(self) -> None:
        self.values: list[str] = []

    def add(self, value: str) -> None:
        value = value.strip()[:_MAX_REF].strip()
        if value and value not in self.values and len(self.values) < MAX_RELAY_REFS:
            self.values.append(value)

    def from_headers(self, msg: email.message.Message | None) -> None:
        if msg is not None:
            for value in _headers(msg, "x-relay-ref"):
                self.add(value)

    def from_text(self, text: str) -> None:
        for match in _RELAY_REF_LINE.finditer(text):
            if len(self.values) >= MAX_RELAY_REFS:
                return
            self.add(match.group(1))


# --- the report kinds ---------------------------------------------------------------------------


def _dsn_recipients(text: str) -> tuple[str | None, list[RecipientStatus]]:
    reporting_mta: str | None = None
    recipients: list[RecipientStatus] = []
    for block in _field_blocks(text, MAX_RECIPIENTS + 1):
        if reporting_mta is None and "reporting-mta" in block:
            reporting_mta = _host(block["reporting-mta"])
        if not ({"final-recipient", "original-recipient", "action"} & block.keys()):
            continue  # the per-message block
        if len(recipients) >= MAX_RECIPIENTS:
            break
        recipients.append(_recipient(block))
    return reporting_mta, recipients


def _embedded_fields(raw: bytes) -> list[RecipientStatus]:
    """Per-recipient DSN fields written into the body as text (broken MIME, forwarded reports)."""
    head_end = raw.find(b"\n\n")
    body = raw[head_end + 2 :] if head_end >= 0 else b""
    if b"final-recipient:" not in body[:_MAX_FIELD_TEXT].lower():
        return []
    text = body[:_MAX_FIELD_TEXT].decode("utf-8", "replace")
    return [
        _recipient(block)
        for block in _field_blocks(text, 10 * MAX_RECIPIENTS)
        if "final-recipient" in block and ("action" in block or "status" in block)
    ][:MAX_RECIPIENTS]


def _recipient(block: dict[str, str]) -> RecipientStatus:
    diagnostic = _collapse(_untyped(block.get("diagnostic-code", "")))
    status = _status_in(block.get("status", "")) or _status_in(diagnostic)
    action = _collapse(block["action"], 50).lower().split(" ", 1)[0] if "action" in block else None
    return RecipientStatus(
        action=action or None,
        status=status,
        code=_code_in(diagnostic),
        diagnostic=diagnostic,
        final_recipient=_address(block.get("final-recipient")),
        original_recipient=_address(block.get("original-recipient")),
        remote_mta=_host(block.get("remote-mta")),
    )


_VACATION_SUBJECT = re.compile(
    r"out of (?:the )?office|\bOOO\b|automatic reply|auto(?:matic)?[ -]?repl|autoreply|autorespon|"
    r"\bvacation\b|\baway\b|abwesen|absence|\babsent\b|\bauto:|r[ée]ponse automatique|"
    r"automatische antwort|respuesta autom|risposta automatica",
    re.I,
)
_VACATION_BODY = re.compile(
    r"out of (?:the )?office|on vacation|on holiday|on leave|currently away|away from (?:the|my) "
    r"(?:office|desk)|limited access to (?:e-?mail|my e-?mail)|will be back|return(?:ing)? (?:to the office )?on",
    re.I,
)
_AUTO_REPLY_SUBJECT = re.compile(
    r"^(?:out of (?:the )?office|automatic reply|auto(?:matic)?[ -]?reply|autoreply|"
    r"auto[ -]?response|autoresponse|vacation|away)\b|^auto:",
    re.I,
)


def _auto_reply(msg: email.message.Message, subject: str) -> str | None:
    """ "vacation", "auto_replied", or None when the message is not an auto-reply."""
    auto_submitted = (_header(msg, "auto-submitted") or "").lower()
    precedence = (_header(msg, "precedence") or "").lower()
    markers = (
        auto_submitted.startswith("auto-replied")
        or precedence.startswith("auto_reply")
        or any(_header(msg, h) is not None for h in ("x-autoreply", "x-autorespond", "x-autoresponder"))
        or (_header(msg, "x-apple-action") or "").upper() == "VACATION"
        or (_header(msg, "x-ms-exchange-inbox-rules-loop") is not None and bool(_VACATION_SUBJECT.search(subject)))
        or bool(_AUTO_REPLY_SUBJECT.search(subject))
    )
    if not markers:
        return None
    if (_header(msg, "x-apple-action") or "").upper() == "VACATION" or _VACATION_SUBJECT.search(subject):
        return "vacation"
    for part in _parts(msg)[:5]:
        if part.get_content_maintype() == "text":
            if _VACATION_BODY.search(_text_of(part, 4000)):
                return "vacation"
            break
    return "auto_replied"


_DAEMON_FROM = re.compile(
    r"mailer-daemon|post_?master|mail delivery (?:system|subsystem)|mail\.?daemon|"
    r"microsoftexchange[0-9a-f]{10,40}|^[^@]*\bbounces?\b",
    re.I,
)
# Wording only an MTA writes: enough on its own, even with Auto-Submitted: auto-replied beside it.
_MTA_BODY = re.compile(
    r"this is the qmail-send program|created automatically by mail delivery software|"
    r"could not be delivered to one or more|following addresses had permanent fatal errors|"
    r"delivery to the following recipients? failed|delivery has failed to these recipients|"
    r"i'm afraid i wasn't able to deliver|transcript of session follows|"
    r"this is the mail system at host|this is the postfix program|"
    r"the following recipient\(s\) could not be reached|this is the mailer-daemon",
    re.I,
)
# Wording a person might use too: a bounce only from the null sender.
_BOUNCE_BODY = re.compile(
    r"your message (?:could not|cannot|was not) (?:be )?delivered|unable to deliver your message|"
    r"delivery (?:status notification|failure)|message delivery has failed|permanent error|"
    r"undeliverable|returned mail|could not be delivered to|error delivering your mail",
    re.I,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered mail|mail delivery fail|delivery status notification|failure notice|"
    r"returned mail|delivery fail|returned to sender|non remis|unzustellbar|non recapitabile|"
    r"no entregado|mail system error|delivery notification|could not be delivered|"
    r"mail delivery problem|nondeliverable|bounce",
    re.I,
)
_COPY_MARKERS = re.compile(
    r"^-{2,} ?below this line is a copy of the message|^-+ ?this is a copy of the message|"
    r"^-+ ?original message|^-+ ?the header of the original message|^-+ ?original message follows|"
    r"^-+ ?forwarded message|^-+ ?message headers? follow|^-+ ?returned message|^original message follows|"
    r"^[ \t]*-+ ?unsent message follows|^[ \t]*-+ ?original message",
    re.I | re.M,
)


def _is_strong_bounce(msg: email.message.Message, notice: str) -> bool:
    sender = (_header(msg, "from") or "") + " " + (_header(msg, "sender") or "")
    return (
        _header(msg, "x-failed-recipients") is not None
        or bool(_DAEMON_FROM.search(sender))
        or bool(_MTA_BODY.search(notice[:20000]))
    )


def _is_weak_bounce(msg: email.message.Message, notice: str, subject: str) -> bool:
    # No Return-Path at all is how a report arrives over SMTP, before a delivery adds one.
    null_sender = (_header(msg, "return-path") or "").strip() in ("<>", "")
    return bool(_BOUNCE_SUBJECT.search(subject)) or (null_sender and bool(_BOUNCE_BODY.search(notice[:20000])))


def _notice_text(parts: list[email.message.Message]) -> str:
    """The human-readable part of a text bounce: text parts, up to where the quoted copy starts."""
    chunks: list[str] = []
    for part in parts:
        is_text = part.get_content_maintype() == "text" and part.get_content_subtype() in ("plain", "html")
        # A multipart whose boundary the parser could not find is text to us.
        broken = part.get_content_maintype() == "multipart" and isinstance(part.get_payload(), str)
        if is_text or broken:
            text = _text_of(part)
            if part.get_content_subtype() == "html":
                text = re.sub(r"<[^<>]{0,2000}>", " ", text)
            chunks.append(text)
        if sum(len(c) for c in chunks) > _MAX_TEXT:
            break
    text = "\n".join(chunks)[:_MAX_TEXT]
    copy = _COPY_MARKERS.search(text)
    return text[: copy.start()] if copy else text


def _bounce_recipients(msg: email.message.Message, raw: bytes, notice: str) -> list[RecipientStatus]:
    """The failed addresses of a text bounce (flufl.bounce when installed, else the notice's own
    address lines), each with the reply text near it."""
    own = {a.lower() for h in ("from", "to", "return-path", "sender") for a in _ADDRESS.findall(_header(msg, h) or "")}
    found: list[tuple[str, str]] = []  # (address, action)
    failed_header = _header(msg, "x-failed-recipients")
    if failed_header:
        found += [(a, "failed") for a in _ADDRESS.findall(failed_header)]
    # flufl.bounce's generic heuristics also return Message-IDs and the original's own addresses:
    # keep the addresses that the notice names outside a quoted header line.
    named = "\n".join(line for line in notice.lower().splitlines()[:5000] if not _HEADER_LINE.match(line))
    found += [(a, action) for a, action in _flufl(raw) if a.lower() in named]
    if not found:
        found = [(a, "failed") for a in _address_lines(notice)]
    wanted: dict[str, tuple[str, str]] = {}  # lower-cased address -> (address, action), in order
    for address, action in found:
        key = address.lower()
        if key not in wanted and key not in own and not _DAEMON_FROM.search(address.split("@", 1)[0]):
            wanted[key] = (address, action)
            if len(wanted) >= MAX_RECIPIENTS:
                break
    candidates = set(wanted)
    lines = notice.splitlines()[:5000]
    lowered = [line.lower() for line in lines]
    recipients: list[RecipientStatus] = []
    for key, (address, action) in wanted.items():
        diagnostic = _near(lines, lowered, address, candidates - {key})
        if len(candidates) == 1 and not (_code_in(diagnostic) or _status_in(diagnostic)):
            # One recipient and no reply beside it: the notice's SMTP reply line is about it.
            reply = next((line for line in lines if _REPLY_LINE.match(line)), "")
            diagnostic = _collapse(f"{reply} {diagnostic}")
        recipients.append(
            RecipientStatus(
                action=action,
                status=_status_in(diagnostic),
                code=_code_in(diagnostic),
                diagnostic=diagnostic,
                final_recipient=address,
                original_recipient=None,
                remote_mta=None,
            )
        )
    return recipients


def _flufl(raw: bytes) -> list[tuple[str, str]]:
    try:
        from flufl.bounce import all_failures
    except ImportError:  # optional: the notice's own address lines still work without it
        return []
    try:
        # Its heuristics run many regular expressions per line: a bounded input keeps them fast,
        # and a text bounce's notice comes first and is short.
        msg = _message(raw[:_MAX_FLUFL])
        temporary, permanent = all_failures(msg)
    except Exception:
        log.debug("flufl.bounce failed on a report", exc_info=True)
        return []
    out: list[tuple[str, str]] = []
    for action, addresses in (("failed", permanent), ("delayed", temporary)):
        for value in sorted(addresses):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            match = _ADDRESS.search(text)
            if match:
                out.append((match.group(0), action))
    return out


_REPLY_LINE = re.compile(r"^[ \t]*(?:<<<[ \t]*)?[245]\d\d[ -]")
_HEADER_LINE = re.compile(r"^[ \t>]*[A-Za-z][A-Za-z0-9-]{0,40}:")
# "-- a@b", "Recipient: <a@b>", ">>> RCPT TO:<a@b>", "Could not be delivered to: <a@b>",
# "554 <a@b>... Host unknown", "550 5.1.1 <a@b>... User unknown"
_LINE_PREFIX = re.compile(
    r"^[ \t]*(?:(?:<<<|>>>)[ \t]*)?(?:[245]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3}[ \t]+)?|-{1,3}[ \t]*|"
    r"[A-Za-z][A-Za-z \t]{0,40}:[ \t]*)?<?",
    re.I,
)
_AFTER_ADDRESS = re.compile(r">?[ \t]*(?::|\.\.\.|\(|on\b|$)", re.I)
_HELP_LINE = re.compile(r"contact|postmaster|support|assistance|help|send mail to|from:|sender", re.I)


def _address_lines(notice: str) -> list[str]:
    """The addresses a text bounce lists: first those standing at the start of a line ("<a@b>:",
    "a@b ... reason", "Recipient: <a@b>"), failing those any address in its prose."""
    leading: list[str] = []
    anywhere: list[str] = []
    for line in notice.splitlines()[:2000]:
        if _HEADER_LINE.match(line) and not line.lstrip().lower().startswith("recipient:"):
            continue  # a quoted header of the original
        prefix = _LINE_PREFIX.match(line)
        start = prefix.end() if prefix else 0
        match = _ADDRESS.match(line, start)
        if match and _AFTER_ADDRESS.match(line, match.end()):
            leading.append(match.group(0))
        elif not _HELP_LINE.search(line):
            anywhere.extend(_ADDRESS.findall(line))
    return leading or anywhere


def _near(lines: list[str], lowered: list[str], address: str, others: set[str]) -> str:
    """The reply text nearest to the address: its own line and the lines after it up to a blank
    line (or the next paragraph when the address stands alone); failing an SMTP code there, a
    transcript line elsewhere that names the address."""
    needle = address.lower()
    strip = re.compile(r"^[ \t]*(?:-{1,3}[ \t]*|recipient:[ \t]*)?<?" + re.escape(address) + r">?:?", re.I)
    best = ""
    for index, line in enumerate(lines):
        if needle not in lowered[index]:
            continue
        chunk = [strip.sub("", line, count=1)]
        follow = index + 1
        if not chunk[0].strip():
            while follow < len(lines) and follow < index + 3 and not lines[follow].strip():
                follow += 1
        for text, low in zip(lines[follow : follow + 8], lowered[follow : follow + 8], strict=True):
            if not text.strip() or text.startswith("<") or any(o in low for o in others):
                break  # the end of the paragraph, or the next recipient's entry
            chunk.append(text)
        found = _collapse(" ".join(chunk))
        if _code_in(found) or _status_in(found):
            return found
        if not best and found:
            best = found
    return best


def _arf(parts: list[email.message.Message]) -> dict[str, str] | None:
    for part in parts:
        if part.get_content_type() == "message/feedback-report":
            blocks = _field_blocks(_structured_text(part), 2)
            merged: dict[str, str] = {}
            for block in blocks:
                for key, value in block.items():
                    merged.setdefault(key, value)
            return merged
    return None


def _arf_report(base: Report, fields: dict[str, str]) -> Report:
    def field(name: str) -> str | None:
        value = fields.get(name)
        return (_collapse(value, 500) or None) if value is not None else None

    feedback_type = field("feedback-type")
    return dataclasses.replace(
        base,
        kind="arf",
        feedback_type=feedback_type.lower().split(" ", 1)[0] if feedback_type else None,
        user_agent=field("user-agent"),
        source_ip=field("source-ip"),
        arf_recipient=_address(field("original-rcpt-to")),
        reporting_mta=_host(fields.get("reporting-mta")),
    )


# --- parse ----------------------------------------------------------------------------------------


def _empty(kind: ReportKind = "unknown", subject: str = "") -> Report:
    return Report(kind, (), None, subject, None, None, None, None, (), None, None)


def parse(raw: bytes) -> Report:
    """Read one message that came back; any bytes in, never an exception out."""
    try:
        return _parse(raw)
    except Exception:  # the last line of defence against a hostile report; _parse should not raise
        log.warning("unreadable report (%d bytes)", len(raw), exc_info=True)
        return _empty()


def _parse(raw: bytes) -> Report:
    # Old Mac mail (CR) and CRLF files read like LF ones; the regular expressions expect "\n".
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        msg = _message(raw)
    except RecursionError:  # the stdlib parser recurses once per nested multipart: read the headers
        log.debug("multiparts nested too deep in a report (%d bytes)", len(raw))
        msg = _message(raw, headers_only=True)
    subject = _decoded_subject(msg)
    parts = _parts(msg)
    report_type = (
        str(msg.get_param("report-type") or "").lower() if msg.get_content_type() == "multipart/report" else ""
    )

    original = _original(parts)
    refs = _Refs()
    refs.from_headers(original)
    refs.from_headers(msg)
    base = _empty(subject=subject)
    base = dataclasses.replace(base, original_message_id=_message_id(original))

    status_parts = [
        p for p in parts if p.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
    ]
    arf_fields = _arf(parts)
    if status_parts or (report_type == "delivery-status" and arf_fields is None):
        report = _dsn(base, msg, raw, parts, status_parts)
    elif arf_fields is not None or report_type == "feedback-report":
        report = _arf_report(base, arf_fields or {})
    elif original is not None and _header(original, "x-hmxmroriginalrecipient") is not None:
        # Hotmail's older complaint format (JMRP): the original, with the complainant in a header.
        recipient = _address(_header(original, "x-hmxmroriginalrecipient"))
        report = dataclasses.replace(base, kind="arf", feedback_type="abuse", arf_recipient=recipient)
    else:
        report = _text_report(base, msg, raw, parts, subject)
    if report.kind in ("bounce", "auto_reply", "unknown") or not refs.values:
        # The original's headers quoted in the text (text bounces; some reports attach nothing).
        for part in parts:
            if part.get_content_maintype() == "text":
                refs.from_text(_text_of(part))
    return dataclasses.replace(report, relay_refs=tuple(refs.values))


def _dsn(
    base: Report,
    msg: email.message.Message,
    raw: bytes,
    parts: list[email.message.Message],
    status_parts: list[email.message.Message],
) -> Report:
    reporting_mta: str | None = None
    recipients: list[RecipientStatus] = []
    for part in status_parts:
        mta, found = _dsn_recipients(_structured_text(part))
        reporting_mta = reporting_mta or mta
        recipients.extend(found[: MAX_RECIPIENTS - len(recipients)])
    notice = _notice_text(parts)
    if not recipients:
        # A multipart/report whose delivery-status part the parser did not find (a boundary that
        # does not match, some appliances): its fields in the text, else the notice's wording.
        recipients = _embedded_fields(raw) or _bounce_recipients(msg, raw, notice)
    recipients = [_with_command(r, notice, alone=len(recipients) == 1) for r in recipients]
    return dataclasses.replace(base, kind="dsn", recipients=tuple(recipients), reporting_mta=reporting_mta)


# Which command a notice says was refused: Postfix "(in reply to RCPT TO command)", Exim "after
# RCPT TO:<...>", Sendmail's transcript ">>> RCPT To:<...>". A "user unknown" means something
# else after DATA (a filter) than after RCPT (no such mailbox): the classifier asks.
_COMMAND = re.compile(
    r"in\s+reply\s+to\s+(?:the\s+)?(rcpt\s+to|mail\s+from|end\s+of\s+data|data)\b"
    r"|\bafter\s+(rcpt\s+to|mail\s+from|end\s+of\s+data|data)\b"
    r"|^>>> (rcpt|mail|data)\b",
    re.I | re.M,
)
_COMMANDS = {"rcpt": "RCPT", "mail": "MAIL", "end": "DATA", "data": "DATA"}


def _command_in(text: str) -> str | None:
    m = _COMMAND.search(text)
    if m is None:
        return None
    word = next(g for g in m.groups() if g).lower().split(None, 1)[0]
    return _COMMANDS.get(word)


def _with_command(r: RecipientStatus, notice: str, *, alone: bool) -> RecipientStatus:
    """The recipient's block, with the command its notice says was refused (if it says)."""
    if r.command is not None or not notice:
        return r
    text = ""
    if r.final_recipient:
        at = notice.lower().find(r.final_recipient.lower())
        if at >= 0:
            text = notice[at : at + 1000]
    if not text and alone:
        text = notice[:5000]
    command = _command_in(text) if text else None
    return r if command is None else dataclasses.replace(r, command=command)


def _text_report(
    base: Report, msg: email.message.Message, raw: bytes, parts: list[email.message.Message], subject: str
) -> Report:
    """A message without a machine-readable report: a text bounce, an auto-reply, or neither."""
    notice = _notice_text(parts)
    if not _is_strong_bounce(msg, notice):
        reason = _auto_reply(msg, subject)
        if reason is not None:
            return dataclasses.replace(base, kind="auto_reply", auto_reply_reason=reason)
        if not _is_weak_bounce(msg, notice, subject):
            return base
    recipients = _embedded_fields(raw) or _bounce_recipients(msg, raw, notice)
    recipients = [_with_command(r, notice, alone=len(recipients) == 1) for r in recipients]
    message_id = base.original_message_id
    if message_id is None:  # the original quoted in the text rather than attached
        texts = "\n".join(_text_of(p) for p in parts if p.get_content_maintype() == "text")
        quoted = _MESSAGE_ID_LINE.search(texts)
        message_id = quoted.group(1) if quoted else None
    return dataclasses.replace(base, kind="bounce", recipients=tuple(recipients), original_message_id=message_id)


def _message_id(msg: email.message.Message | None) -> str | None:
    if msg is None:
        return None
    value = _header(msg, "message-id")
    if not value:
        return None
    value = value.strip().strip("<>").strip()
    return value[:500] or None
