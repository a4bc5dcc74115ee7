"""SMTP intake: the aiosmtpd adapter and the relay policy (AUTH, who may relay, limits), then
``LogStore.enqueue``. ``intake`` (the message's header section) and ``auth`` (users, throttle)
sit beside it and know nothing of aiosmtpd.

The only module that imports aiosmtpd, pinned in pyproject.toml to the version ``RelaySMTP``
was written against: tests/smtp checks that a session gets every attribute aiosmtpd's own
``SMTP.__init__`` sets. Every reply carries an enhanced status code
(RFC 2034); aiosmtpd's own texts are mapped to ours in ``RelaySMTP.push`` and no internal
detail reaches a client: an unexpected error is ``451 4.3.0``, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import socket
import ssl
import time
from base64 import b64decode
from binascii import Error as Base64Error
from collections.abc import Sequence
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax
from ulid import ULID

from relay import intake, metrics
from relay.auth import Authenticator
from relay.bounces.inbound import BounceInbox
from relay.config import Config, IPNetwork, Listen
from relay.errors import InvalidMessage, StoreError, StoreUnavailable
from relay.logs import with_ids
from relay.logstore import LogStore
from relay.model import NewMessage
from relay.net import bind, bound_address

log = logging.getLogger(__name__)

REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_TLS_FIRST = "538 5.7.11 Encryption required for requested authentication mechanism"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_BAD_SENDER = "501 5.1.3 Bad sender address syntax"
REPLY_BAD_RCPT = "501 5.1.3 Bad recipient address syntax"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_STORE_FAILED = "451 4.3.0 Temporary failure storing the message, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure"
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, closing transmission channel"
REPLY_DOMAIN_LITERAL = "550 5.7.1 Domain literals are not accepted"
REPLY_NULL_SENDER = "550 5.7.1 Null sender not accepted"
REPLY_NOT_UTF8 = "501 5.5.2 Argument is not valid UTF-8"
REPLY_BAD_HELO = "501 5.5.4 Bad EHLO/HELO hostname"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections"
REPLY_TOO_MANY_COMMANDS = "421 4.7.0 Too many commands"
REPLY_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
REPLY_SUPPRESSED = "550 5.1.1 Recipient address suppressed"
REPLY_NO_AUTH = "502 5.5.1 AUTH not available here"
REPLY_UNKNOWN_BOUNCE = "550 5.1.1 Unknown bounce address"
REPLY_RELAY_DENIED = "550 5.7.1 Relay access denied"

# Content bigger than this is checked and scanned in a worker thread, off the event loop.
HEAVY_CONTENT = 256 * 1024
_MAX_LINE = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)

# Default enhanced codes (RFC 3463) for replies that come without one.
_ENHANCED = {
    221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 252: "2.0.0",
    421: "4.3.2", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 552: "5.3.4",
    553: "5.1.3", 554: "5.7.0", 555: "5.5.4",
}  # fmt: skip
# aiosmtpd texts we word differently.
_REWRITE = {
    "552 Error: Too much mail data": REPLY_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": REPLY_TOO_BIG,
    "500 Error: strict ASCII mode": "500 5.6.7 Non-ASCII data requires SMTPUTF8",
    "501 Error: SMTPUTF8 disabled": "501 5.6.7 SMTPUTF8 disabled",
    "553 5.1.3 Error: malformed address": "553 5.1.3 Malformed address",
}
_REPLY = re.compile(r"^(\d{3})([ -])(?:([245]\.\d{1,3}\.\d{1,3})(?: |$))?(.*)$", re.DOTALL)
_NO_ENHANCED = {220, 334, 354}

# RFC 5321 reverse-path / forward-path with optional parameters; a source route is ignored.
_PATH = re.compile(r'^<(?:@[^:<>\s]+:)?((?:"(?:[^"\\\r\n]|\\.)*"|[^\s<>@"]+)@[^\s<>@]+)>(?:\s+(.*))?$')
_BARE_PATH = re.compile(r"^([^\s<>@]+@[^\s<>@]+)(?:\s+(.*))?$")
_LOCAL = re.compile(r"^[^\s@<>()\[\],;:\\\"\x00-\x1f\x7f]+$|^\"(?:[^\"\\\x00-\x1f]|\\.)*\"$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}(?<!-)$")
# aiosmtpd decodes arguments with surrogateescape: a lone surrogate is a byte that was not UTF-8.
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_address(address: str) -> bool:
    """RFC 5321 mailbox syntax, kept practical: local@domain, with the usual length limits."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address.encode()) > 254 or len(local.encode()) > 64:
        return False
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1].removeprefix("IPv6:")
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return False
        return True
    return len(domain) <= 253 and all(_LABEL.match(label) for label in domain.split("."))


def client_ip(session: Session) -> str:
    return _peer_ip(session.peer)


def _peer_ip(peer: object) -> str:
    host = peer[0] if isinstance(peer, tuple) else str(peer)
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host


def _address_problem(arg: str, bad: str) -> str | None:
    """The reply refusing a MAIL/RCPT argument for its bytes alone, before any parsing."""
    if _NOT_UTF8.search(arg):
        return REPLY_NOT_UTF8
    if "\r" in arg or "\n" in arg:
        return bad  # quoted or escaped, a line break never belongs in an address
    return None


def long_line(content: bytes) -> bool:
    """True when a line is longer than 1000 octets: one pass, each find bounded, no copies."""
    pos, end = 0, len(content)
    while end - pos > _MAX_LINE:
        nl = content.find(b"\n", pos, pos + _MAX_LINE + 1)
        if nl < 0:
            return True
        pos = nl + 1
    return False


class _CrlfReader(asyncio.StreamReader):
    """Command lines end at CRLF only: a bare CR or LF stays inside the line, where the command's
    checks refuse it, instead of starting a command of its own (SMTP smuggling)."""

    async def readuntil(self, separator: bytes = b"\r\n") -> bytes:  # type: ignore[override]  # bytes only here
        return await super().readuntil(separator)


class SessionTemplate:
    """What aiosmtpd's SMTP.__init__ computes by introspection on every connection, computed
    once per server: the handler's hooks and AUTH mechanisms, and the SMTP verbs."""

    def __init__(self, handler: RelayHandler, *, implicit_tls: bool = False, **options: Any) -> None:
        probe = SMTP(handler, loop=asyncio.get_running_loop(), **options)  # aiosmtpd's own view, once
        self.handler = handler
        self.options = options
        self.implicit_tls = implicit_tls  # sessions of a listen_tls listener: TLS from the first byte
        self.auth_methods = probe._auth_methods
        self.handle_hooks = probe._handle_hooks
        self.ehlo_hook_ver = probe._ehlo_hook_ver
        self.verbs = tuple(name for name in dir(RelaySMTP) if name.startswith("smtp_"))
        self.auth_require_tls = probe._auth_require_tls


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with Relay's replies, AUTH rule, session bookkeeping, and a faster
    start (``SessionTemplate``) and DATA reader (``smtp_DATA``) for the hot path."""

    def __init__(
        self, template: SessionTemplate, *, sessions: set[RelaySMTP], per_ip: collections.Counter[str]
    ) -> None:
        # The attributes SMTP.__init__ sets (aiosmtpd 1.4.6, pinned), without its per-connection introspection.
        o = template.options
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            _CrlfReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.__ident__ = o["ident"]
        self.event_handler = template.handler
        self.data_size_limit = o["data_size_limit"]
        self.enable_SMTPUTF8 = o["enable_SMTPUTF8"]
        self._decode_data = False
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = o["hostname"]
        self.tls_context = o["tls_context"]
        self.require_starttls = False
        self._timeout_duration = o["timeout"]
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = template.auth_require_tls
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = template.auth_methods
        self._handle_hooks = template.handle_hooks
        self._ehlo_hook_ver = template.ehlo_hook_ver
        self._smtp_methods = {name[5:]: getattr(self, name) for name in template.verbs}
        self._enforce_call_limit = False
        self._sessions = sessions
        self._per_ip = per_ip
        self._raw_replies = False
        self._cork: list[str] | None = None  # EHLO's lines, gathered into one write
        self._counted = False
        self._refused = False
        self._ip = ""
        self._junk = 0  # NOOP/RSET/VRFY/HELP since the last MAIL
        self.refused_rcpts = 0  # the bounce listener's refused recipients in this session
        self.trusted = False
        self.implicit_tls = template.implicit_tls

    @property
    def secure(self) -> bool:
        """The session is encrypted: after STARTTLS, or on an implicit TLS listener."""
        return self.implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            smtp = self.event_handler.config.smtp
            ip = _peer_ip(transport.get_extra_info("peername"))
            if len(self._sessions) >= smtp.max_sessions or self._per_ip[ip] >= smtp.max_sessions_per_ip:
                self._refuse(transport, ip)
                return
        super().connection_made(transport)
        if first and self.session is not None:
            self._sessions.add(self)
            self._ip = client_ip(self.session)
            self._per_ip[self._ip] += 1
            self._counted = True
            metrics.SESSIONS.inc()
            handler: RelayHandler = self.event_handler
            self.trusted = handler.is_trusted(self._ip)

    def _refuse(self, transport: asyncio.BaseTransport, ip: str) -> None:
        """Answer 421 and close, without starting a session. Only write() and close(): they are
        all a uvloop transport offers here, and aiosmtpd's machinery never runs."""
        self._refused = True
        log.info("refused a connection from %s: too many connections", ip)  # a flood must not flood the log
        metrics.REJECTIONS.labels("too_many_connections").inc()
        transport.write(REPLY_TOO_MANY_CONNECTIONS.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._counted = False
            metrics.SESSIONS.dec()
            self._per_ip[self._ip] -= 1
            if self._per_ip[self._ip] <= 0:
                del self._per_ip[self._ip]
        self._sessions.discard(self)
        super().connection_lost(error)

    @property
    def busy(self) -> bool:
        """In a mail transaction (between MAIL and the reply to DATA)."""
        return bool(self.envelope is not None and self.envelope.mail_from)

    @property
    def tls_info(self) -> str | None:
        if not self.secure or self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return f"{obj.version()} with cipher {cipher[0]}" if cipher else str(obj.version())

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Address and parameters of a MAIL/RCPT argument; (None, None) when malformed."""
        arg = arg.strip()
        if not arg:
            return "", ""
        if arg == "<>" or arg.startswith("<> "):
            return "<>", arg[2:].strip()  # the null reverse-path; handle_MAIL decides
        m = _PATH.match(arg) or _BARE_PATH.match(arg)
        if m is None:
            return None, None
        return m.group(1), m.group(2) or ""

    async def push(self, status: str | bytes) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if self._cork is not None:
            self._cork.append(text)
            return
        if not self._raw_replies:
            text = enhance(text)
            if text[:1] in ("4", "5"):
                parts = text.split(" ", 2)
                enhanced = parts[1] if len(parts) > 1 and parts[1][:1].isdigit() else None
                metrics.REJECTIONS.labels(metrics.rejection_reason(int(text[:3]), enhanced, text)).inc()
        await super().push(text)

    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname and (problem := _helo_problem(hostname)):
            await self.push(problem)
            return
        # aiosmtpd pushes EHLO's lines one by one: a write (a system call) each. One write.
        self._raw_replies, self._cork = True, []
        try:
            await super().smtp_EHLO(hostname)
            lines = self._cork
        finally:
            self._raw_replies, self._cork = False, None
        if lines:
            await super().push("\r\n".join(lines))

    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and (problem := _helo_problem(hostname)):
            await self.push(problem)
            return
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if arg is not None and (problem := _address_problem(arg, REPLY_BAD_SENDER)):
            await self.push(problem)
            return
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from:
            self._junk = 0

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if arg is not None and (problem := _address_problem(arg, REPLY_BAD_RCPT)):
            await self.push(problem)
            return
        await super().smtp_RCPT(arg)

    async def _junk_command(self) -> bool:
        """Count a command that moves no mail; past the limit, 421 and close (True)."""
        self._junk += 1
        if self._junk <= self.event_handler.config.smtp.max_junk_commands:
            return False
        log.warning("closing a session from %s: too many commands without mail", self._ip)
        await self.push(REPLY_TOO_MANY_COMMANDS)
        self.close_now()
        return True

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_VRFY(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_HELP(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.event_handler.offers_auth:
            await self.push(REPLY_NO_AUTH)
            return
        if self.session is not None and self.session.extended_smtp and not self.secure and not self.trusted:
            await self.push(REPLY_TLS_FIRST)
            return
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the content in chunks instead of line by line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, problem = await self._read_content()
        if problem is None and len(content) > _MAX_LINE:
            if len(content) > HEAVY_CONTENT:
                too_long = await asyncio.to_thread(long_line, content)
            else:
                too_long = long_line(content)
            problem = REPLY_LINE_TOO_LONG if too_long else None
        if problem is not None:
            self.envelope = self._create_envelope()
            await self.push(problem)
            return
        # The envelope holds the only reference, so that intake can let go of it once prepared.
        self.envelope.content = self.envelope.original_content = content
        del content
        self._junk = 0
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_content(self) -> tuple[bytes, str | None]:
        """Read up to the lone dot; undo dot-stuffing; check size. Returns (content, None) or
        (b"", the reply that refuses it). The idle timeout restarts at every chunk, so a slow
        upload that keeps sending is never cut off."""
        reader = self._reader
        limit = self.data_size_limit
        buf = bytearray(b"\r\n")  # as if after a line end, so an empty message is found too
        discarded = 0  # bytes dropped once the message is known to be too big
        scan = 0
        while (end := buf.find(b"\r\n.\r\n", scan)) < 0:
            if limit and discarded + len(buf) > limit + 6:
                discarded += len(buf) - 4
                del buf[:-4]  # the end marker may start in what is kept
            scan = max(len(buf) - 4, 0)
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            buf += chunk
        # Whatever came after the dot (pipelined commands) goes back to the command loop.
        reader._buffer[:0] = buf[end + 5 :]  # type: ignore[attr-defined]
        if discarded or (limit and end > limit):
            return b"", REPLY_TOO_BIG
        start = 3 if buf.startswith(b"\r\n.") else 2
        with memoryview(buf) as view:
            content = bytes(view[start : end + 2])  # the one copy; the buffer goes right after
        del buf
        return content.replace(b"\r\n.", b"\r\n"), None

    def close_now(self, reply: str | None = None) -> None:
        # Duck-typed: uvloop's transports are not asyncio.WriteTransport instances.
        transport: Any = self.transport
        if transport is None or transport.is_closing():
            return
        if reply is not None:
            transport.write(reply.encode() + b"\r\n")
        transport.close()


def _helo_problem(hostname: str) -> str | None:
    if _NOT_UTF8.search(hostname):
        return REPLY_NOT_UTF8
    return REPLY_BAD_HELO if _CONTROL.search(hostname) else None


def enhance(text: str) -> str:
    """Give a reply its enhanced status code, and aiosmtpd's texts Relay's wording."""
    text = _REWRITE.get(text, text)
    m = _REPLY.match(text)
    if not m:
        return text
    code, sep, enhanced, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if enhanced or code in _NO_ENHANCED:
        return text
    default = _ENHANCED.get(code)
    if default is None:
        return text
    rest = rest.removeprefix("Error: ")
    return f"{code}{sep}{default} {rest}".rstrip()


class RelayHandler:
    """aiosmtpd hooks: who may relay, what is accepted, and storing it."""

    offers_auth = True

    def __init__(self, config: Config, store: LogStore, authenticator: Authenticator) -> None:
        self.config = config
        self.store = store
        self.authenticator = authenticator
        self._trusted: tuple[IPNetwork, ...] = config.smtp.trusted_networks
        self._trusted_ips: dict[str, bool] = {}

    def is_trusted(self, ip: str) -> bool:
        # Asked for every connection and every message; parsing the address is most of the work.
        known = self._trusted_ips.get(ip)
        if known is not None:
            return known
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        trusted = any(addr in net for net in self._trusted)
        if len(self._trusted_ips) >= 4096:  # a flood from many addresses stays bounded
            self._trusted_ips.clear()
        self._trusted_ips[ip] = trusted
        return trusted

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # AUTH only where it may be used: over TLS, or in plain text from a trusted network
        # (Postfix's smtpd_tls_auth_only); smtp_AUTH answers 538 otherwise.
        auth_offered = server.secure or server.trusted
        lines = [r[4:] for r in responses[1:] if r[4:] != "HELP" and (auth_offered or not r[4:].startswith("AUTH "))]
        lines = [
            "PIPELINING",
            *(("AUTH PLAIN LOGIN" if x.startswith("AUTH ") else x) for x in lines),
            "ENHANCEDSTATUSCODES",
        ]
        lines.insert(0, responses[0][4:])
        return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if address == "<>":
            return REPLY_NULL_SENDER  # a submission listener: bounces come from Relay itself
        if not (session.authenticated or server.trusted):
            return REPLY_AUTH_REQUIRED
        if not valid_address(address):
            return REPLY_BAD_SENDER
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not valid_address(address):
            return REPLY_BAD_RCPT
        local, _, domain = address.rpartition("@")
        if domain.startswith("["):
            return REPLY_DOMAIN_LITERAL  # mail goes to domains, by their MX, nowhere else
        address = f"{local}@{domain.lower()}"
        if address.lower() in (a.lower() for a in envelope.rcpt_tos):
            return "250 2.1.5 Ok"  # a duplicate is delivered once
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        if self.config.suppression.reject_at_rcpt and (refusal := await self._suppressed(address)):
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def _suppressed(self, address: str) -> str | None:
        """The refusal of a suppressed recipient (``[suppression] reject_at_rcpt``), if it is."""
        try:
            entry = await self.store.suppression_check(address)
        except StoreUnavailable as exc:  # the store logged the outage once
            log.debug("could not read the suppression list: %s", exc)
            return REPLY_STORE_FAILED
        except StoreError:
            log.exception("could not read the suppression list")
            return REPLY_STORE_FAILED
        if entry is None:
            return None
        metrics.SUPPRESSED.labels(entry.reason).inc()
        log.info("refused suppressed recipient <%s> (entry %s, %s)", address, entry.address, entry.reason)
        return REPLY_SUPPRESSED

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        queue_id = str(ULID())
        with with_ids(queue_id=queue_id):
            return await self._accept(server, session, envelope, queue_id)

    async def _accept(self, server: RelaySMTP, session: Session, envelope: Envelope, queue_id: str) -> str:
        ip = client_ip(session)
        user = session.auth_data if session.authenticated else None
        tls = server.tls_info
        protocol = ("ESMTP" if session.extended_smtp else "SMTP") + ("S" if tls else "") + ("A" if user else "")
        received_at = time.time()
        arrival = intake.Arrival(
            queue_id=queue_id,
            hostname=self.config.server.hostname,
            helo=session.host_name or "unknown",
            client_ip=ip,
            protocol=protocol,
            tls=tls,
            recipients=tuple(envelope.rcpt_tos),
            at=received_at,
        )
        content = envelope.content
        assert isinstance(content, bytes)
        # Hand the content over: from here the box holds the only reference, and inspect
        # drops it once the prepared copy exists, so a big message is in memory about once.
        box = [content]
        envelope.content = envelope.original_content = None
        heavy = len(content) > HEAVY_CONTENT
        del content
        try:
            hops, tracking_config = self.config.smtp.max_hops, self.config.tracking
            if heavy:
                prepared, track, links = await asyncio.to_thread(intake.inspect, box, arrival, hops, tracking_config)
            else:
                prepared, track, links = intake.inspect(box, arrival, hops, tracking_config)
        except InvalidMessage as exc:
            reply = str(exc.reply)
            log.info("refused message from %s: %s", ip, reply)
            return reply
        msg = NewMessage(
            queue_id=queue_id,
            message_id=prepared.message_id,
            mail_from=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            subject=prepared.subject,
            tags=prepared.tags,
            user=user,
            client_ip=ip,
            received_at=received_at,
            raw=prepared.raw,
            details={"client_ip": ip, "helo": arrival.helo, "protocol": protocol, "tls": tls, "user": user,
                     "size": len(prepared.raw), "recipients": len(envelope.rcpt_tos)},
            track=track,
            links=links,
        )  # fmt: skip
        try:
            await self.store.enqueue(msg)
        except StoreUnavailable as exc:  # the store logged the outage once
            log.debug("could not store message from %s: %s", ip, exc)
            return REPLY_STORE_FAILED
        except StoreError:
            log.exception("could not store message from %s", ip)
            return REPLY_STORE_FAILED
        metrics.RECEIVED.inc()
        log.info(
            "accepted from=<%s> rcpts=%d size=%d client=%s user=%s",
            msg.mail_from,
            len(msg.recipients),
            msg.size,
            ip,
            user,
        )
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        log.error("unexpected error in SMTP session", exc_info=error)
        return REPLY_INTERNAL

    # AUTH mechanisms: aiosmtpd calls these instead of its built-in ones.

    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        blob = await _first_response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Malformed AUTH PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._verify(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        login = await _first_response(server, args, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._verify(server, login, password)

    async def _verify(self, server: RelaySMTP, login: bytes, password: bytes) -> AuthResult:
        assert server.session is not None
        try:
            user, secret = login.decode(), password.decode()
        except UnicodeDecodeError:
            user, secret = "", ""
        try:
            ok = await self.authenticator.check(user, secret, client_ip(server.session))
        except StoreError as exc:  # the users are out of reach: neither yes nor no (RFC 4954)
            if isinstance(exc, StoreUnavailable):
                log.debug("cannot check the password of %r: %s", user, exc)  # the store logged the outage once
            else:
                log.exception("cannot check the password of %r", user)
            await server.push(REPLY_AUTH_TEMPORARY)
            return AuthResult(success=False, handled=True)
        if ok:
            log.info("authenticated %r from %s", user, client_ip(server.session))
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


class BounceHandler(RelayHandler):
    """The bounce listener's hooks: anyone may connect without AUTH and send from any sender,
    the null sender included (DSNs come from it), but only to a valid return path address
    of ``[bounces] domain``. It never relays and never delivers anything: a report goes to
    ``BounceInbox.receive``."""

    offers_auth = False

    def __init__(self, config: Config, store: LogStore, inbox: BounceInbox) -> None:
        super().__init__(config, store, Authenticator(_no_password))
        self.inbox = inbox
        self._trusted = ()  # nobody relays through here

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        lines = [r[4:] for r in responses[1:] if r[4:] != "HELP" and not r[4:].startswith("AUTH")]
        lines = [responses[0][4:], "PIPELINING", *lines, "ENHANCEDSTATUSCODES"]
        return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if address != "<>" and not valid_address(address):
            return REPLY_BAD_SENDER
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = self._refusal(address)
        if refusal is not None:
            # Guessing tokens is the one thing a stranger can do here: past [smtp]
            # max_junk_commands refused recipients (never reset: not by MAIL, not by RSET), the
            # session ends, logged once.
            server.refused_rcpts += 1
            if server.refused_rcpts > self.config.smtp.max_junk_commands:
                log.warning("closing a bounce session from %s: too many refused recipients", client_ip(session))
                asyncio.get_running_loop().call_soon(server.close_now)
                return REPLY_TOO_MANY_COMMANDS
            return refusal
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    def _refusal(self, address: str) -> str | None:
        if not valid_address(address):
            return REPLY_BAD_RCPT
        return_path = self.inbox.return_path
        if address.rpartition("@")[2].lower().rstrip(".") != return_path.domain:
            return REPLY_RELAY_DENIED
        if return_path.recipient_of(address) is None:
            return REPLY_UNKNOWN_BOUNCE
        return None

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        envelope.content = envelope.original_content = None
        ids = [i for a in envelope.rcpt_tos if (i := self.inbox.return_path.recipient_of(a)) is not None]
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        return await self.inbox.receive(content, mail_from=sender, recipient_ids=ids, client_ip=client_ip(session))


async def _no_password(_name: str) -> str | None:
    return None


async def _first_response(server: RelaySMTP, args: list[str], prompt: str) -> bytes | None:
    """The client's first AUTH response, decoded: from the AUTH line (the initial response), else
    asked for with ``prompt``. None once answered with a 501: cancelled, or not base64."""
    if len(args) == 1:
        blob = await server.challenge_auth(prompt)  # answers a cancel or bad base64 itself
        return blob if isinstance(blob, bytes) else None
    try:
        return b64decode(args[1].encode(), validate=True)
    except (Base64Error, ValueError):
        await server.push("501 5.5.2 Cannot decode base64")
        return None


class SmtpServer:
    """The SMTP listeners and their sessions: start, then shutdown(grace)."""

    def __init__(self, config: Config, store: LogStore, authenticator: Authenticator) -> None:
        self.config = config
        self.handler: RelayHandler = RelayHandler(config, store, authenticator)
        self.sessions: set[RelaySMTP] = set()
        self.per_ip: collections.Counter[str] = collections.Counter()  # open sessions by client IP
        self._servers: list[asyncio.Server] = []
        self._tls = _tls_context(config) if config.smtp.tls_enabled else None
        self._template: SessionTemplate | None = None
        self._tls_template: SessionTemplate | None = None  # implicit TLS sessions: no STARTTLS to offer

    def session_options(self) -> dict[str, Any]:
        """The keyword arguments of aiosmtpd's ``SMTP`` for these listeners' sessions."""
        return {
            "hostname": self.config.server.hostname,
            "ident": "ESMTP Relay",
            "data_size_limit": self.config.smtp.max_message_size,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "tls_context": self._tls,
            "auth_require_tls": False,
            "timeout": self.config.smtp.timeout,
        }

    def _factory(self) -> RelaySMTP:
        assert self._template is not None
        return RelaySMTP(self._template, sessions=self.sessions, per_ip=self.per_ip)

    def _tls_factory(self) -> RelaySMTP:
        assert self._tls_template is not None
        return RelaySMTP(self._tls_template, sessions=self.sessions, per_ip=self.per_ip)

    def listen(self) -> tuple[Listen, ...]:
        return self.config.smtp.listen

    async def start(
        self, sockets: Sequence[socket.socket] | None = None, tls_sockets: Sequence[socket.socket] = ()
    ) -> list[Listen]:
        """Listen on ``sockets`` if given, else on its configured addresses, and with implicit
        TLS (RFC 8314) on ``tls_sockets``. Returns the bound addresses, the TLS ones last."""
        loop = asyncio.get_running_loop()
        self._template = SessionTemplate(self.handler, **self.session_options())
        if sockets is None:
            sockets = [bind(listen) for listen in self.listen()]
        for sock in sockets:
            self._servers.append(await loop.create_server(self._factory, sock=sock))
        if tls_sockets:
            assert self._tls is not None
            options = {**self.session_options(), "tls_context": None}  # TLS already: no STARTTLS
            self._tls_template = SessionTemplate(self.handler, implicit_tls=True, **options)
            # The handshake comes before the session exists (and before the session limits count
            # it): bound how long a client may take over it.
            handshake = min(30.0, self.config.smtp.timeout)
            for sock in tls_sockets:
                server = await loop.create_server(self._tls_factory, sock=sock, ssl=self._tls,
                                                  ssl_handshake_timeout=handshake)  # fmt: skip
                self._servers.append(server)
        return [bound_address(sock) for sock in (*sockets, *tls_sockets)]

    @property
    def listening(self) -> bool:
        return bool(self._servers) and all(server.is_serving() for server in self._servers)

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    async def shutdown(self, grace: float) -> None:
        """Stop listening; close idle sessions with 421; give sessions in a transaction up to
        ``grace`` seconds to finish it, then close them too."""
        self.stop_listening()
        deadline = time.monotonic() + grace
        while self.sessions:
            for session in list(self.sessions):
                if not session.busy:
                    session.close_now(REPLY_SHUTDOWN)
                    self.sessions.discard(session)
            if not self.sessions or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        for session in list(self.sessions):
            log.warning("closing a session still in a transaction after %.0fs", grace)
            session.close_now(REPLY_SHUTDOWN)
        self.sessions.clear()
        for server in self._servers:
            await server.wait_closed()


class BounceServer(SmtpServer):
    """The bounce listener (``[bounces] listen``): the MX of the return path domain."""

    def __init__(self, config: Config, store: LogStore, inbox: BounceInbox) -> None:
        super().__init__(config, store, Authenticator(_no_password))
        self.handler = BounceHandler(config, store, inbox)

    def listen(self) -> tuple[Listen, ...]:
        return self.config.bounces.listen

    def session_options(self) -> dict[str, Any]:
        return {**super().session_options(), "data_size_limit": self.config.bounces.max_message_size}


def _tls_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.smtp.tls_cert, config.smtp.tls_key)
    return ctx
