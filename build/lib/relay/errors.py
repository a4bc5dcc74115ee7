"""Relay's exceptions: one small tree, so callers catch by meaning, not by library.

    RelayError
    ├── ConfigError            bad configuration; names the key
    ├── StoreError             the log store failed; nothing of the operation was written
    ├── NotFound               no message, user or token matches
    ├── Conflict               the thing exists already (a user name)
    ├── StartError             Relay cannot start (a listener, the TLS files, the store); one line
    ├── ReasonRequired         removing a complaint's suppression entry needs a reason
    ├── InvalidMessage         content refused at intake; carries the SMTP reply
    │   └── TooManyHops        more Received headers than [smtp] max_hops: a mail loop
    └── DeliveryFailure        one delivery attempt failed; carries the SMTP reply
        ├── TemporaryFailure   4xx, timeouts, refused connections, DNS trouble: try again later
        └── PermanentFailure   5xx, NXDOMAIN, null MX: do not try again

Both that carry an SMTP reply are ``SmtpReplyError``s: ``exc.reply`` is a ``Reply``, the same
value that delivery records for every recipient, and ``str(exc.reply)`` is the wire line.

Library exceptions (SQLAlchemy, aiosmtplib, dnspython) are mapped to these at the one
module that imports the library, with the cause kept (``raise ... from exc``).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field


class RelayError(Exception):
    """Relay failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or type(self).__name__)


class ConfigError(RelayError):
    """The configuration is invalid."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class StoreError(RelayError):
    """The log store failed; the operation was rolled back."""


class NotFound(RelayError):
    """Nothing matches."""


class Conflict(RelayError):
    """It exists already."""


class StartError(RelayError):
    """Relay cannot start (a listener, the TLS files, the store); the message is one line."""


class ReasonRequired(RelayError):
    """Removing this entry needs a reason: it was added for a complaint."""


_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*")  # an enhanced status code (RFC 3463) opening the text


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: a server's, or one Relay gives in its place (``code`` None: no server answered)."""

    code: int | None
    enhanced: str | None
    text: str
    temporary: bool = False  # Relay treats it as temporary whatever the code (e.g. a 535 from a smarthost)
    command: str | None = field(default=None, compare=False)  # what it answered: MAIL, RCPT, DATA (a server's)

    @classmethod
    def parse(cls, code: int, message: str, command: str | None = None) -> Reply:
        text = " ".join(message.split())
        m = _ENHANCED.match(text)
        if m:
            return cls(code, m.group(1), text[m.end() :], command=command)
        return cls(code, None, text, command=command)

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        if self.temporary:
            return False
        if self.code is not None:
            return self.code >= 500
        return (self.enhanced or "").startswith("5")

    def __str__(self) -> str:
        """The wire line: "554 5.4.6 Too many hops" (the parts that are present)."""
        return " ".join(str(p) for p in (self.code, self.enhanced, self.text) if p)


class SmtpReplyError(RelayError):
    """A failure that is answered with an SMTP reply (``reply``)."""

    def __init__(self, code: int | None, enhanced: str | None, text: str, *, temporary: bool = False) -> None:
        self.reply = Reply(code, enhanced, text, temporary)
        super().__init__(str(self.reply))


class InvalidMessage(SmtpReplyError):
    """The message content was refused at intake."""


class TooManyHops(InvalidMessage):
    """The message has passed through more hosts than ``[smtp] max_hops`` allows."""

    def __init__(self) -> None:
        super().__init__(554, "5.4.6", "Too many hops")


class DeliveryFailure(SmtpReplyError):
    """A delivery attempt failed."""

    permanent = False

    def __init__(self, code: int | None, enhanced: str | None, text: str) -> None:
        super().__init__(code, enhanced, text, temporary=not self.permanent)


class TemporaryFailure(DeliveryFailure):
    """The attempt failed for now; a later one may succeed."""


class PermanentFailure(DeliveryFailure):
    """The attempt failed for good."""

    permanent = True


def one_line(exc: BaseException, *, filename: bool = True) -> str:
    """An error in one line, for a person: an OSError as a few lowercase words ("address
    already in use", "connection refused"), with its file name first unless ``filename`` is
    false; anything else as the first line of its text."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        reason = os.strerror(exc.errno).lower()
        return f"{exc.filename}: {reason}" if filename and exc.filename else reason
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
