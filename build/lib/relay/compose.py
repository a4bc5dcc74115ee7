"""Build an RFC 5322 message from the parts the HTTP send API takes (``Draft``), with the
stdlib ``email`` package: text and HTML as multipart/alternative, attachments in
multipart/mixed, non-ASCII header text as RFC 2047 encoded words, bodies 7-bit clean (quoted-
printable or base64), CRLF line ends. Message-ID and Date are left to intake, as for SMTP.

Knows nothing of HTTP: bad input raises ``ComposeError`` naming the field at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import errors as email_errors
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage

# Header fields Relay owns, or that would break the message's structure if set by hand.
RESERVED_HEADERS = frozenset(
    {"bcc", "received", "return-path", "content-type", "mime-version", "content-transfer-encoding",
     "dkim-signature", "from", "to", "cc", "reply-to", "subject"}
)  # fmt: skip
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a tab is fine in a header value
_MAILBOX = re.compile(r"\s*(?:(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]+)>|(?P<bare>[^<>]+?))\s*")
_TYPE = re.compile(r"([A-Za-z0-9!#$&^_.+-]{1,64})/([A-Za-z0-9!#$&^_.+-]{1,64})")
# Bodies 7-bit clean: delivery needs no 8BITMIME. A message with a non-ASCII local part needs
# SMTPUTF8 at delivery anyway, and is written as RFC 6532 UTF-8 headers.
_ASCII = policy.SMTP.clone(cte_type="7bit")
_UTF8 = policy.SMTPUTF8


class ComposeError(ValueError):
    """A part of the draft cannot make a message; ``field`` names it (as the API spells it)."""

    def __init__(self, field: str | tuple[str | int, ...], problem: str) -> None:
        self.field: tuple[str | int, ...] = (field,) if isinstance(field, str) else field
        self.problem = problem
        super().__init__(f"{'.'.join(map(str, self.field))}: {problem}")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """An address as a header shows it ("Name <addr>") and the bare address the envelope uses."""

    name: str
    address: str

    @property
    def utf8(self) -> bool:
        return not self.address.rpartition("@")[0].isascii()


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Draft:
    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...] = ()
    reply_to: Mailbox | None = None
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()


def mailbox(text: str, field: tuple[str | int, ...]) -> Mailbox:
    """``addr`` or ``Name <addr>`` (the name may be quoted); ComposeError otherwise. The
    address's own syntax is the caller's to check (SMTP's rule)."""
    if _CONTROL.search(text) or "\t" in text:
        raise ComposeError(field, "control characters are not allowed in an address")
    m = _MAILBOX.fullmatch(text)
    if m is None:
        raise ComposeError(field, 'expected "addr@example.com" or "Name <addr@example.com>"')
    name = (m.group("name") or "").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return Mailbox(name, m.group("addr") or m.group("bare"))


def check_header(name: str, value: str) -> str | None:
    """Why the extra header field ``name: value`` is refused, or None."""
    if not _FIELD_NAME.fullmatch(name):
        return "not a header field name (printable ASCII without colon, at most 76 characters)"
    lname = name.lower()
    if lname in RESERVED_HEADERS or lname.startswith(("x-relay-", "content-")):
        return f"{name} is set by Relay or from its own field, not by hand"
    if _CONTROL.search(value):
        return "control characters (CR, LF, ...) are not allowed in a header value"
    return None


def content_type(text: str, field: tuple[str | int, ...]) -> tuple[str, str]:
    m = _TYPE.fullmatch(text.strip())
    if m is None:
        raise ComposeError(field, 'expected a MIME type such as "application/pdf"')
    main, sub = m.group(1).lower(), m.group(2).lower()
    if main in ("multipart", "message"):
        raise ComposeError(field, f"{main}/* cannot be attached as content; send a whole message as raw")
    return main, sub


def build(draft: Draft) -> bytes:
    """The message, with CRLF line ends; ComposeError naming the field that cannot be written."""
    everyone = (draft.sender, *draft.to, *draft.cc, *((draft.reply_to,) if draft.reply_to else ()))
    pol = _UTF8 if any(m.utf8 for m in everyone) else _ASCII
    msg = EmailMessage(policy=pol)
    _set(msg, "From", _address(draft.sender, pol, ("from",)), ("from",))
    if draft.to:
        _set(msg, "To", [_address(m, pol, ("to", i)) for i, m in enumerate(draft.to)], ("to",))
    if draft.cc:
        _set(msg, "Cc", [_address(m, pol, ("cc", i)) for i, m in enumerate(draft.cc)], ("cc",))
    if draft.reply_to is not None:
        _set(msg, "Reply-To", _address(draft.reply_to, pol, ("reply_to",)), ("reply_to",))
    if draft.subject.strip():
        _set(msg, "Subject", " ".join(draft.subject.split()), ("subject",))  # folding keeps no stray blanks
    for name, value in draft.headers:
        _set(msg, name, value, ("headers", name))
    _body(msg, draft)
    for i, a in enumerate(draft.attachments):
        main, sub = content_type(a.content_type, ("attachments", i, "content_type"))
        try:
            msg.add_attachment(a.content, maintype=main, subtype=sub, filename=a.filename)
        except (ValueError, LookupError, TypeError, email_errors.MessageError) as exc:
            raise ComposeError(("attachments", i), f"cannot be attached: {exc}") from exc
    try:
        return msg.as_bytes(policy=pol)
    except (ValueError, LookupError, TypeError, IndexError, email_errors.MessageError) as exc:
        # The email package checks some header values only when it writes them.
        raise ComposeError("headers", f"the message cannot be written: {exc}") from exc


def _body(msg: EmailMessage, draft: Draft) -> None:
    try:
        if draft.text is not None:
            msg.set_content(draft.text)
            if draft.html is not None:
                msg.add_alternative(draft.html, subtype="html")
        elif draft.html is not None:
            msg.set_content(draft.html, subtype="html")
        else:
            raise ComposeError("text", "text or html is required")
    except (ValueError, LookupError) as exc:
        if isinstance(exc, ComposeError):
            raise
        raise ComposeError("text", f"cannot be encoded: {exc}") from exc


def _address(m: Mailbox, pol: policy.Policy, field: tuple[str | int, ...]) -> Address:
    local, _, domain = m.address.rpartition("@")
    if pol is _ASCII and not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")  # headers of a 7-bit message: A-labels
        except UnicodeError as exc:
            raise ComposeError(field, "the domain is not a valid internationalised domain name") from exc
    try:
        if local.startswith('"'):  # quoted already: parsed as it is
            return Address(display_name=m.name, addr_spec=f"{local}@{domain}")
        return Address(display_name=m.name, username=local, domain=domain)
    except (ValueError, IndexError, email_errors.MessageError) as exc:
        raise ComposeError(field, f"not an address a header can hold: {exc}") from exc


def _set(msg: EmailMessage, name: str, value: object, field: tuple[str | int, ...]) -> None:
    try:
        msg[name] = value
    except (ValueError, TypeError, IndexError, LookupError, email_errors.MessageError) as exc:
        raise ComposeError(field, f"not a valid header value: {exc}") from exc
