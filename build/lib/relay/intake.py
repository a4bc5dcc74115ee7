"""What Relay reads and changes in a message's header section when it accepts it.

Works on bytes and touches only the header section: checks it, reads Message-ID, Subject
and X-Relay-Tag, strips X-Relay-* control headers, adds Message-ID and Date when missing and
prepends a Received header. The body passes through unchanged. Bad input raises
``InvalidMessage`` with the SMTP reply to give. ``inspect`` is the whole step that SMTP and
the HTTP send API share: prepare, then what to track.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import format_datetime

from relay import tracking
from relay.config import TrackingConfig
from relay.errors import InvalidMessage, TooManyHops

MAX_TAGS = 20
MAX_TAG_LENGTH = 100
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_MSGID = re.compile(r"<?\s*([^<>\s]{1,900})\s*>?")
_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TRACK_VALUES = {"none", "opens", "clicks"}
_CRLF = re.compile(rb"\r\n|\r|\n")
_CONTROL_HEADERS = (b"x-relay-tag", b"x-relay-track", b"x-relay-ref")  # read or set by Relay, never passed on


def _reject(text: str) -> InvalidMessage:
    return InvalidMessage(554, "5.6.0", text)


@dataclass(frozen=True, slots=True)
class Prepared:
    raw: bytes  # the message as it will be stored and sent
    message_id: str  # without <>
    subject: str
    tags: tuple[str, ...]
    track: frozenset[str] | None  # from X-Relay-Track; None when the header is absent


@dataclass(frozen=True, slots=True)
class Arrival:
    """Who handed the message over, for the Received header."""

    queue_id: str
    hostname: str
    helo: str
    client_ip: str
    protocol: str  # SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA
    tls: str | None  # e.g. "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"
    recipients: tuple[str, ...]
    at: float  # seconds since the epoch


def prepare(raw: bytes, arrival: Arrival, max_hops: int = 50) -> Prepared:
    """Check and complete the header section. Linear in the size, and the body is never copied
    but once, into the result (large messages run this in a worker thread)."""
    if b"\0" in raw:
        raise _reject("Message contains NUL characters")
    body_start = 0  # where the body (with the blank line before it) starts in raw
    if not raw or raw.startswith(b"\r\n"):
        header = b""
    else:
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            header, body_start = raw, len(raw)
            if not header.endswith(b"\r\n"):
                header += b"\r\n"
        else:
            header, body_start = raw[: end + 2], end + 2

    fields = _fields(header)
    if sum(1 for n, _ in fields if n.lower() == b"received") > max_hops:
        raise TooManyHops()  # a mail loop, as Postfix's hopcount_limit sees it
    message_id, subject, tags, track = _read_fields(fields)
    strip = any(n.lower() in _CONTROL_HEADERS for n, _ in fields)
    unique_tags = tuple(dict.fromkeys(tags))
    if len(unique_tags) > MAX_TAGS:
        raise _reject(f"Too many X-Relay-Tag values (at most {MAX_TAGS})")

    added: list[bytes] = []
    if message_id is None:
        message_id = f"{arrival.queue_id}@{arrival.hostname}"
        added.append(f"Message-ID: <{message_id}>\r\n".encode())
    if not any(n.lower() == b"date" for n, _ in fields):
        added.append(f"Date: {rfc5322_date(arrival.at)}\r\n".encode())
    if strip:
        header = b"".join(n + b":" + v for n, v in fields if n.lower() not in _CONTROL_HEADERS)
    crlf = raw.count(b"\r\n", body_start)
    rest: bytes | memoryview = memoryview(raw)[body_start:]  # a view: no copy of the body
    if raw.count(b"\n", body_start) != crlf or raw.count(b"\r", body_start) != crlf:
        rest = _CRLF.sub(b"\r\n", rest)  # bare LF or CR in the body: store canonical CRLF line ends
    out = b"".join((_received(arrival), header, *added, rest))
    return Prepared(out, message_id, subject, unique_tags, None if track is None else frozenset(track))


def inspect(
    box: list[bytes], arrival: Arrival, max_hops: int, tracking_config: TrackingConfig
) -> tuple[Prepared, str, tuple[str, ...]]:
    """The intake step SMTP and HTTP share: ``prepare`` the message (taken out of ``box``, so
    the caller's reference goes and a big message is in memory about once), then what to track
    and its trackable links. Linear work: big messages run this in a worker thread."""
    prepared = prepare(box.pop(), arrival, max_hops)
    track = ""
    if tracking_config.enabled:  # off until [tracking] base_url says where recipients reach Relay
        track = tracking.tracking_choice(prepared.track, tracking_config.opens, tracking_config.clicks)
    links: tuple[str, ...] = ()
    if track and tracking.has_html(prepared.raw):
        links = tuple(tracking.trackable_links(prepared.raw)) if "clicks" in track else ()
    else:
        track = ""
    return prepared, track, links


def _read_fields(fields: list[tuple[bytes, bytes]]) -> tuple[str | None, str, list[str], set[str] | None]:
    message_id: str | None = None
    subject = ""
    tags: list[str] = []
    track: set[str] | None = None
    for name, value in fields:
        lname = name.lower()
        if lname == b"message-id":
            if message_id is not None:
                raise _reject("More than one Message-ID header")
            m = _MSGID.fullmatch(_unfold(value).strip())
            if not m:
                raise _reject("Malformed Message-ID header")
            message_id = m.group(1)
        elif lname == b"subject" and not subject:
            subject = _decode_subject(value)
        elif lname == b"x-relay-tag":
            tags.extend(_tags(value))
        elif lname == b"x-relay-track":
            track = (track or set()) | _track(value)
    return message_id, subject, tags, track


def _fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """Split the header section into (name, raw value incl. folding and CRLF)."""
    if not header:
        return []
    if b"\r" in header.replace(b"\r\n", b"") or b"\n" in header.replace(b"\r\n", b""):
        raise _reject("Malformed header section: bare CR or LF")
    # Each field's lines are collected and joined once: appending to the value line by line
    # would be quadratic in a long folded field.
    parts: list[tuple[bytes, list[bytes]]] = []
    for number, line in enumerate(header[:-2].split(b"\r\n"), 1):
        if line[:1] in (b" ", b"\t"):
            if not parts:
                raise _reject("Malformed header section: continuation line first")
            parts[-1][1].append(line)
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise _reject(f"Malformed header field on line {number}")
        parts.append((name, [value]))
    return [(name, b"\r\n".join(lines) + b"\r\n") for name, lines in parts]


def _unfold(value: bytes) -> str:
    return value.replace(b"\r\n", b"").decode("utf-8", errors="replace")


def _decode_subject(value: bytes) -> str:
    text = _unfold(value).strip()
    with contextlib.suppress(ValueError, LookupError, UnicodeError):
        text = str(make_header(decode_header(text)))
    return _CONTROL.sub(" ", text)[:998]


def _tags(value: bytes) -> list[str]:
    try:
        text = value.replace(b"\r\n", b"").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _reject("Invalid X-Relay-Tag: not UTF-8") from exc
    out = []
    for part in text.split(","):
        tag = part.strip()
        if not tag:
            continue
        if len(tag) > MAX_TAG_LENGTH or _CONTROL.search(tag):
            raise _reject(f"Invalid X-Relay-Tag: at most {MAX_TAG_LENGTH} printable characters each")
        out.append(tag)
    return out


def _track(value: bytes) -> set[str]:
    words = {w.strip().lower() for w in _unfold(value).split(",") if w.strip()}
    if not words or not words <= _TRACK_VALUES or ("none" in words and len(words) > 1):
        raise _reject("Invalid X-Relay-Track: expected none, opens, clicks or opens,clicks")
    return words - {"none"}


def _received(a: Arrival) -> bytes:
    helo = _UNSAFE_HELO.sub("", a.helo)[:255] or "unknown"
    parts = [f"Received: from {helo} ([{a.client_ip}])\r\n"]
    if a.tls:
        parts.append(f"\t(using {a.tls})\r\n")
    parts.append(f"\tby {a.hostname} (Relay) with {a.protocol} id {a.queue_id}")
    if len(a.recipients) == 1:
        parts.append(f"\r\n\tfor <{_CONTROL.sub('', a.recipients[0])}>")  # never a line break
    parts.append(f"; {rfc5322_date(a.at)}\r\n")
    return "".join(parts).encode("utf-8", errors="replace")


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def rfc5322_date(ts: float) -> str:
    """e.g. "Mon, 23 Nov 2026 12:00:00 +0000"; computed once a second."""
    return _date_of_second(int(ts))
