"""Writing an RFC 3464 delivery status notification for the original sender.

``build_dsn`` returns the bytes of one DSN in the shape Postfix writes (RFC 6522 multipart/report
with a human part, a message/delivery-status part and the original's header section). Every
argument may carry text from a remote server or a client, so each is made one safe line: control
characters go, lines stay within RFC 5322's 998 octets, and the original's body is never copied.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from datetime import UTC, datetime
from email.utils import format_datetime

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
MAX_DIAGNOSTIC = 1000  # characters; what relay.bounces.reports keeps of one
MAX_ORIGINAL_HEADERS = 64 * 1024  # octets of the original's header section returned
_MAX_LINE = 998  # octets, RFC 5322 2.1.1
_FOLD_AT = 76
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_WS = re.compile(r"\s+")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_STATUS_IN = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_SMTP_REPLY = re.compile(r"^[245]\d\d(?:[ -]|$)")


def _line(value: str, limit: int = 500) -> str:
    """One line of printable ASCII: no CR/LF (header injection), no other controls, no non-ASCII
    (message/delivery-status is 7-bit; RFC 6533's UTF-8 variant is not needed for Relay's own)."""
    text = _CONTROL.sub(" ", value)
    text = text.encode("ascii", "replace").decode("ascii")
    return _WS.sub(" ", text).strip()[:limit]


def _address(value: str) -> str:
    return _line(value, 320).strip("<>").replace(" ", "")


def _host(value: str) -> str:
    host = re.sub(r"[^A-Za-z0-9.:\[\]-]", "", _line(value, 255))[:255]
    return host or "localhost"


def _fold(name: str, value: str) -> list[str]:
    """A field folded at spaces to about 76 columns; a word too long for one line is cut into
    pieces (only hostile input has 900 characters without a space)."""
    words: list[str] = []
    piece = _MAX_LINE - 100
    for word in value.split(" "):
        words.extend(word[i : i + piece] for i in range(0, len(word), piece))
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(current) + 1 + len(word) > _FOLD_AT and current.strip() not in (f"{name}:", ""):
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return lines


def _header_section(original: bytes) -> bytes:
    """The original's header section only, CRLF line ends, no line over 998 octets."""
    data = original.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    end = data.find(b"\n\n")
    section = (data[:end] if end >= 0 else data).replace(b"\x00", b"")
    truncated = len(section) > MAX_ORIGINAL_HEADERS
    lines = [line[:_MAX_LINE] for line in section[:MAX_ORIGINAL_HEADERS].split(b"\n")]
    if truncated:  # drop the half line the cut left
        lines = lines[:-1]
    lines = [line for line in lines if line.strip()]
    # A folded line cannot start the section.
    while lines and lines[0][:1] in (b" ", b"\t"):
        lines.pop(0)
    return b"".join(line + b"\r\n" for line in lines)


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _explanation(*, hostname: str, recipient: str, action: str, diagnostic: str, remote_mta: str | None) -> list[str]:
    if action == "delayed":
        intro = [
            f"This is the mail system at host {hostname}.",
            "",
            "Your message has not been delivered yet to the recipient below. Relay will keep",
            "trying; this is only a warning, and you do not need to send the message again.",
        ]
    elif action == "failed":
        intro = [
            f"This is the mail system at host {hostname}.",
            "",
            "Your message could not be delivered to the recipient below, and Relay gave up.",
            "The header section of your message is attached.",
        ]
    else:
        intro = [
            f"This is the mail system at host {hostname}.",
            "",
            f"A delivery status notification for your message: {action}.",
        ]
    said = f"host {remote_mta} said: " if remote_mta else ""
    detail = f"<{recipient}>: {said}{diagnostic}" if diagnostic else f"<{recipient}>"
    wrapped = textwrap.wrap(detail, width=_FOLD_AT, subsequent_indent="    ", break_on_hyphens=False)
    return [*intro, "", "                   The mail system", "", *wrapped]


def build_dsn(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    recipient: str,
    status: str,
    diagnostic: str,
    remote_mta: str | None,
    arrival: float,
    at: float,
    original_headers: bytes,
    action: str = "failed",
) -> bytes:
    """One RFC 3464 DSN about one recipient of one message, as bytes with CRLF line ends."""
    host = _host(hostname)
    rcpt = _address(recipient)
    to = _address(sender)
    action = _line(action, 20).lower()
    if action not in ACTIONS:
        action = "failed"
    diag = _line(diagnostic, MAX_DIAGNOSTIC)
    status = _line(status, 20)
    if not _STATUS.match(status):
        found = _STATUS_IN.search(diag)
        status = found.group(1) if found else ("4.0.0" if action == "delayed" else "5.0.0")
    mta = _host(remote_mta) if remote_mta and _line(remote_mta) else None
    queue = _line(queue_id, 100)
    headers = _header_section(original_headers)

    token = re.sub(r"[^A-Za-z0-9._-]", "", queue)[:40] or "dsn"  # for the boundary and Message-ID
    boundary = f"{token}.{secrets.token_hex(8)}/{host}"[:70]
    while boundary.encode() in headers:  # the header section is the only outside text in the body
        boundary = f"{secrets.token_hex(16)}/{host}"[:70]
    eight_bit = any(byte > 0x7F for byte in headers)

    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{to}>",
        "Subject: " + ("Delayed Mail (still being retried)" if action == "delayed" else _SUBJECT),
        f"Date: {_date(at)}",
        f"Message-ID: <{secrets.token_hex(12)}.{token}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
    ]
    if eight_bit:
        top.append("Content-Transfer-Encoding: 8bit")

    human = _explanation(hostname=host, recipient=rcpt, action=action, diagnostic=diag, remote_mta=mta)
    per_message = [f"Reporting-MTA: dns; {host}", *_fold("X-Relay-Queue-ID", queue), f"Arrival-Date: {_date(arrival)}"]
    per_recipient = [*_fold("Final-Recipient", f"rfc822; {rcpt}"), f"Action: {action}", f"Status: {status}"]
    if mta:
        per_recipient.append(f"Remote-MTA: dns; {mta}")
    if diag:
        kind = "smtp" if _SMTP_REPLY.match(diag) else "X-Relay"
        per_recipient += _fold("Diagnostic-Code", f"{kind}; {diag}")
    per_recipient.append(f"Last-Attempt-Date: {_date(at)}")

    lines = [
        *top,
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        *per_message,
        "",
        *per_recipient,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        *(["Content-Transfer-Encoding: 8bit"] if eight_bit else []),
        "",
    ]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    return head + headers + f"\r\n--{boundary}--\r\n".encode("ascii")


_SUBJECT = "Undelivered Mail Returned to Sender"
