"""Outbound SMTP on aiosmtplib: routes, MX fallback, STARTTLS policy, connection reuse.

The only module that imports aiosmtplib. ``Transport.send`` makes one delivery attempt for
one message to the recipients of one domain and returns each recipient's reply (a
``relay.errors.Reply``); it never raises for a delivery problem. Library errors become
failures in ``_failure``, and a failure's reply is what the recipients get.

Connection-level trouble (refused, timed out, non-2xx greeting, dropped, EHLO/STARTTLS/AUTH
failing) moves on to the next address, at most ``MAX_ADDRESSES`` of them; when none takes
the mail, every recipient gets the last such failure as a temporary reply. Replies to
MAIL, RCPT and DATA are the destination's word and are final for this attempt.

A server that offers PIPELINING (RFC 2920; Postfix, Exim, Exchange and Gmail do) gets MAIL,
every RCPT and DATA in one write and answers them together: two round trips per message
instead of three plus one per recipient. aiosmtplib reads one reply per command and drops
replies that come early, so ``_Replies`` stands in for its protocol while they are read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from relay.config import Config
from relay.errors import DeliveryFailure, PermanentFailure, Reply, TemporaryFailure
from relay.mx import MxResolver

log = logging.getLogger(__name__)

MAX_ADDRESSES = 5


@dataclass(frozen=True, slots=True)
class Hop:
    """Where an attempt went."""

    host: str | None = None
    ip: str | None = None
    port: int | None = None
    tls: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    replies: dict[str, Reply]  # recipient -> the reply that decides it
    hop: Hop
    tried: tuple[str, ...] = ()  # addresses that failed before, with why


@dataclass(frozen=True, slots=True)
class _Target:
    host: str  # the name we expect on the certificate
    ip: str
    port: int
    tls: str  # none | opportunistic | required
    username: str = ""
    password: str = ""


@dataclass(slots=True)
class _Connection:
    smtp: aiosmtplib.SMTP
    target: _Target
    tls: str | None
    esmtp: set[str]
    uses: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    listener: _Replies | None = None  # in aiosmtplib's place after an exchange, to hear what comes unasked
    said_more: bool = False  # a listener heard something, before it was taken away

    @property
    def spoiled(self) -> bool:
        """The server said more than it was asked: its next words could pass for the reply to
        our next command, so the connection is never used again."""
        return self.said_more or (self.listener is not None and self.listener.extra)

    def library_protocol(self) -> None:
        """Give the connection back to aiosmtplib's protocol, for a command sent through it."""
        listener, self.listener = self.listener, None
        if listener is None:
            return
        self.said_more = self.said_more or listener.extra
        transport, inner = self.smtp.transport, self.smtp.protocol
        if transport is not None and inner is not None and not transport.is_closing():
            transport.set_protocol(inner)


MAX_REPLY_LINE = 8192  # aiosmtplib's limits, kept when the replies are read here
MAX_REPLY_LINES = 4 * 8192 // 64
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command's argument (aiosmtplib's rule)


class _Replies(asyncio.Protocol):
    """Reads the replies to pipelined commands while it stands in for aiosmtplib's protocol
    (``transport.set_protocol``); what ends the connection is passed on to that protocol."""

    def __init__(self, inner: asyncio.BaseProtocol, owed: int) -> None:
        self._inner = inner
        self._owed = owed
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self.replies: list[aiosmtplib.SMTPResponse] = []
        self.failure: aiosmtplib.SMTPException | None = None
        self.extra = False  # the server said more than it was asked
        self._progress: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def complete(self) -> bool:
        return self.failure is not None or len(self.replies) >= self._owed

    async def progress(self) -> None:
        """Until the next reply (or the end)."""
        if not self.complete():
            await self._progress
            self._progress = asyncio.get_running_loop().create_future()

    def _step(self) -> None:
        if not self._progress.done():
            self._progress.set_result(None)

    def _fail(self, exc: aiosmtplib.SMTPException) -> None:
        if self.failure is None and not self.complete():
            self.failure = exc
        self._step()

    def data_received(self, data: bytes) -> None:
        if self.complete():
            self.extra = True
            return
        self._buffer += data
        while (end := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > MAX_REPLY_LINE or len(self._lines) >= MAX_REPLY_LINES:
                self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
                return
            if not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                text = line.decode("utf-8", "replace").strip()
                self._fail(aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {text}"))
                return
            self._lines.append(line)
            if line[3:4] == b"-":
                continue
            text = b"\n".join(x[4:].strip(b" \t\r\n") for x in self._lines).decode("utf-8", "surrogateescape")
            self._lines = []
            self.replies.append(aiosmtplib.SMTPResponse(int(line[:3]), text))
            self._step()
            if self.complete():
                self.extra = bool(self._buffer)
                return
        if len(self._buffer) > MAX_REPLY_LINE:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Unusable(Exception):
    """This address cannot take mail now; try the next one."""

    def __init__(self, failure: DeliveryFailure) -> None:
        super().__init__(str(failure.reply))
        self.failure = failure


class _Stale(Exception):
    """A kept connection was closed by the server before MAIL was answered; nothing was sent."""


class _Loop(Exception):
    """The destination is this relay itself."""


class Transport:
    def __init__(self, config: Config, resolver: MxResolver) -> None:
        self.config = config
        self.resolver = resolver
        self._idle: dict[_Target, list[_Connection]] = {}
        self._verify_ctx: ssl.SSLContext | None = None
        self._loose_ctx: ssl.SSLContext | None = None

    async def send(self, domain: str, mail_from: str, recipients: Sequence[str], data: bytes) -> Result:
        try:
            targets = await self._targets(domain)
        except DeliveryFailure as failure:
            return Result(dict.fromkeys(recipients, failure.reply), Hop())
        tried: list[str] = []
        last: DeliveryFailure = TemporaryFailure(None, "4.4.1", f"no usable address for {domain}")
        hop = Hop()
        for target in targets[:MAX_ADDRESSES]:
            hop = Hop(target.host, target.ip, target.port)
            try:
                conn = await self._checkout(target)
                hop = Hop(target.host, target.ip, target.port, conn.tls)
                try:
                    replies = await self._transaction(conn, mail_from, recipients, data)
                except _Stale:  # a kept connection the server had closed: nothing was sent, so again
                    conn = await self._connect(target)
                    hop = Hop(target.host, target.ip, target.port, conn.tls)
                    replies = await self._transaction(conn, mail_from, recipients, data)
            except _Loop:
                log.warning("%s [%s]:%d is this relay (%s): mail loop", target.host, target.ip, target.port,
                            self.config.server.hostname)  # fmt: skip
                loop = Reply(None, "5.4.6", f"mail for {domain} loops back to myself")
                return Result(dict.fromkeys(recipients, loop), hop, tuple(tried))
            except _Unusable as exc:
                last = exc.failure
                tried.append(str(exc.failure.reply))
                log.info("%s [%s]:%d unusable: %s", target.host, target.ip, target.port, exc.failure.reply)
                continue
            return Result(replies, hop, tuple(tried))
        return Result(dict.fromkeys(recipients, last.reply), hop, tuple(tried[:-1]))

    async def _targets(self, domain: str) -> list[_Target]:
        route = self.config.route_for(domain)
        if route is not None:
            mode = route.tls or self.config.delivery.tls
            addresses = await self.resolver.addresses(route.host)
            if not addresses:
                raise TemporaryFailure(None, "4.4.3", f"route host {route.host} has no address")
            return [_Target(route.host, ip, route.port, mode, route.username, route.password) for ip in addresses]
        hosts = await self.resolver.mx_hosts(domain)
        implicit = len(hosts) == 1 and hosts[0].name == domain
        targets: list[_Target] = []
        errors: list[DeliveryFailure] = []
        for mx in hosts[: 2 * MAX_ADDRESSES]:  # a domain publishing a thousand dead MX costs a few lookups only
            if len(targets) >= MAX_ADDRESSES:
                break
            try:
                addresses = await self.resolver.addresses(mx.name)
            except DeliveryFailure as failure:
                errors.append(failure)
                continue
            d = self.config.delivery
            targets.extend(_Target(mx.name, ip, d.port, d.tls) for ip in addresses)
        if targets:
            return targets
        if implicit and errors and errors[0].permanent:
            raise errors[0]
        if implicit and not errors:
            raise PermanentFailure(None, "5.1.2", f"{domain} has no MX and no address records")
        raise TemporaryFailure(None, "4.4.3", f"no address for the mail exchangers of {domain}")

    # -- connections

    async def _checkout(self, target: _Target) -> _Connection:
        """A kept connection to the target, or a new one. A kept one ended its last transaction
        cleanly (a final reply to DATA, or RSET), so no RSET is spent on it: if the server closed
        it meanwhile, MAIL finds out (``_Stale``) before anything of the message was sent."""
        pool = self._idle.get(target)
        while pool:
            conn = pool.pop()
            if (
                time.monotonic() - conn.idle_since < self.config.delivery.idle_connection_timeout
                and conn.smtp.is_connected
                and not conn.spoiled
            ):
                return conn
            conn.smtp.close()
        return await self._connect(target)

    def _checkin(self, conn: _Connection) -> None:
        conn.uses += 1
        if conn.spoiled or conn.uses >= self.config.delivery.messages_per_connection or not conn.smtp.is_connected:
            asyncio.get_running_loop().create_task(self._quit(conn))
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.target, []).append(conn)

    async def _connect(self, target: _Target) -> _Connection:
        d = self.config.delivery
        smtp = aiosmtplib.SMTP(
            hostname=target.ip,
            port=target.port,
            local_hostname=self.config.helo,
            timeout=d.command_timeout,
            start_tls=False,
            use_tls=False,
        )
        try:
            greeting = await smtp.connect(timeout=d.connect_timeout)
            self._check_not_myself(greeting.message)
            try:
                self._check_not_myself((await smtp.ehlo()).message)
            except aiosmtplib.SMTPHeloError:
                self._check_not_myself((await smtp.helo()).message)
            tls = None
            if target.tls != "none" and smtp.supports_extension("starttls"):
                await smtp.starttls(server_hostname=target.host, tls_context=self._tls_context(target.tls))
                await smtp.ehlo()
                obj = smtp.get_transport_info("ssl_object")
                tls = obj.version() if obj is not None else "TLS"
            elif target.tls == "required":
                raise TemporaryFailure(None, "4.7.4", "TLS is required, but the server did not offer STARTTLS")
            if target.username:
                if tls is None:  # Postfix's smtp_sasl_security_options = noplaintext
                    raise TemporaryFailure(None, "4.7.0", "refusing to send credentials without TLS")
                await self._login(smtp, target)
        except _Loop:
            smtp.close()
            raise
        except Exception as exc:  # every library error (and a garbage reply) means: not this address
            smtp.close()
            raise _Unusable(_failure(exc, target)) from exc
        return _Connection(smtp, target, tls, set(smtp.esmtp_extensions))

    def _check_not_myself(self, reply_text: str) -> None:
        """A server that greets or answers EHLO with our own name is this relay: a mail loop
        (an MX or route pointing back at us). Postfix: "mail for ... loops back to myself"."""
        words = reply_text.split(None, 1)
        if words and words[0].rstrip(".").lower() == self.config.server.hostname:
            raise _Loop

    @staticmethod
    async def _login(smtp: aiosmtplib.SMTP, target: _Target) -> None:
        mechanisms = smtp.server_auth_methods
        if "plain" in mechanisms:
            await smtp.auth_plain(target.username, target.password)
        elif "login" in mechanisms:
            await smtp.auth_login(target.username, target.password)
        else:
            raise TemporaryFailure(None, "4.7.0", f"{target.host} offers no AUTH PLAIN or LOGIN")

    def _tls_context(self, mode: str) -> ssl.SSLContext:
        if mode == "required":
            if self._verify_ctx is None:
                self._verify_ctx = ssl.create_default_context()
            return self._verify_ctx
        if self._loose_ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._loose_ctx = ctx
        return self._loose_ctx

    async def _quit(self, conn: _Connection) -> None:
        conn.library_protocol()
        try:
            await asyncio.wait_for(conn.smtp.quit(), 5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            conn.smtp.close()

    def sweep(self) -> None:
        """Close connections idle for longer than the configured time."""
        now = time.monotonic()
        limit = self.config.delivery.idle_connection_timeout
        for target, pool in list(self._idle.items()):
            keep = [c for c in pool if now - c.idle_since < limit]
            for conn in pool:
                if conn not in keep:
                    asyncio.get_running_loop().create_task(self._quit(conn))
            if keep:
                self._idle[target] = keep
            else:
                del self._idle[target]

    async def close(self) -> None:
        pools, self._idle = self._idle, {}
        await asyncio.gather(*(self._quit(c) for pool in pools.values() for c in pool))

    # -- one transaction

    async def _transaction(
        self, conn: _Connection, mail_from: str, recipients: Sequence[str], data: bytes
    ) -> dict[str, Reply]:
        try:
            options = self._mail_options(conn, mail_from, recipients, data)
            if isinstance(options, Reply):
                self._checkin(conn)
                return dict.fromkeys(recipients, options)
            if "pipelining" in conn.esmtp:
                replies = await self._pipelined(conn, mail_from, recipients, data, options)
            else:
                replies = await self._one_by_one(conn, mail_from, recipients, data, options)
        except (_Unusable, _Stale):
            conn.smtp.close()
            raise
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            # The connection is in an unknown state (a garbage or oversized reply, a drop, a
            # timeout, an address the library refuses): close it; the attempt is temporary.
            conn.smtp.close()
            raise _Unusable(_failure(exc, conn.target)) from exc
        return replies

    async def _one_by_one(
        self, conn: _Connection, mail_from: str, recipients: Sequence[str], data: bytes, options: list[bytes]
    ) -> dict[str, Reply]:
        smtp = conn.smtp
        reply = await self._mail(conn, mail_from, options)
        if reply.code != 250:
            await self._reset(conn)
            return dict.fromkeys(recipients, Reply.parse(reply.code, reply.message, "MAIL"))
        replies: dict[str, Reply] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            reply = await smtp.execute_command(b"RCPT", f"TO:<{rcpt}>".encode())
            if reply.code == 421:
                raise _Unusable(TemporaryFailure(421, None, reply.message))
            replies[rcpt] = Reply.parse(reply.code, reply.message, "RCPT")
            if reply.code in (250, 251):
                accepted.append(rcpt)
        if not accepted:
            await self._reset(conn)
            return replies
        reply = await smtp.execute_command(b"DATA")
        done = await self._content(conn, data) if reply.code == 354 else Reply.parse(reply.code, reply.message, "DATA")
        for rcpt in accepted:
            replies[rcpt] = done
        self._checkin(conn)
        return replies

    async def _pipelined(
        self, conn: _Connection, mail_from: str, recipients: Sequence[str], data: bytes, options: list[bytes]
    ) -> dict[str, Reply]:
        """MAIL, the RCPTs and DATA in one write (RFC 2920), then their replies in order."""
        commands = [b" ".join([b"MAIL", f"FROM:<{mail_from}>".encode(), *options])]
        commands += [f"RCPT TO:<{rcpt}>".encode() for rcpt in recipients]
        if any(_CONTROL.search(c) for c in commands):
            raise ValueError("Command arg contains a prohibited control character")
        got = await self._exchange(conn, b"\r\n".join([*commands, b"DATA", b""]), len(commands) + 1)
        mail, rcpt_replies, data_reply = got[0], got[1:-1], got[-1]
        if mail.code == 421:
            if conn.uses:  # e.g. the server's idle timeout, answered to our next command
                raise _Stale
            raise _Unusable(TemporaryFailure(421, None, mail.message))
        if any(r.code == 421 for r in (*rcpt_replies, data_reply)):
            bad = next(r for r in (*rcpt_replies, data_reply) if r.code == 421)
            raise _Unusable(TemporaryFailure(421, None, bad.message))
        if mail.code != 250:
            replies = dict.fromkeys(recipients, Reply.parse(mail.code, mail.message, "MAIL"))
            accepted: list[str] = []
        else:
            replies = {
                rcpt: Reply.parse(r.code, r.message, "RCPT") for rcpt, r in zip(recipients, rcpt_replies, strict=True)
            }
            accepted = [rcpt for rcpt, r in zip(recipients, rcpt_replies, strict=True) if r.code in (250, 251)]
        if not accepted:
            if data_reply.code == 354:  # it wants content for nobody: the session is not worth saving
                conn.smtp.close()
                return replies
            await self._reset(conn)
            return replies
        if data_reply.code == 354:
            done = await self._content(conn, data)
        else:
            done = Reply.parse(data_reply.code, data_reply.message, "DATA")
        for rcpt in accepted:
            replies[rcpt] = done
        self._checkin(conn)
        return replies

    async def _exchange(
        self, conn: _Connection, payload: bytes, owed: int, *, stale: bool = True
    ) -> list[aiosmtplib.SMTPResponse]:
        """Write ``payload``; its ``owed`` replies. With ``stale``, a kept connection found closed
        before any reply is ``_Stale`` (only before content: after it, the message may be in)."""
        transport, inner = conn.smtp.transport, conn.smtp.protocol
        stale = stale and conn.uses > 0
        if transport is None or inner is None or transport.is_closing():
            raise _Stale if stale else aiosmtplib.SMTPServerDisconnected("Connection lost")
        if conn.spoiled:
            raise _Stale if stale else aiosmtplib.SMTPResponseException(-1, "unexpected data from the server")
        reader = _Replies(inner, owed)
        transport.set_protocol(reader)
        conn.listener = reader
        transport.write(payload)  # type: ignore[attr-defined]
        while not reader.complete():
            try:
                async with asyncio.timeout(self.config.delivery.command_timeout):
                    await reader.progress()
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
        if reader.failure is not None:
            first = reader.replies[0].code if reader.replies else None
            if stale and first in (None, 421) and isinstance(reader.failure, aiosmtplib.SMTPServerDisconnected):
                raise _Stale from reader.failure
            raise reader.failure
        return reader.replies  # the reader stays in place: it hears anything said unasked

    @staticmethod
    async def _mail(conn: _Connection, mail_from: str, options: list[bytes]) -> aiosmtplib.SMTPResponse:
        if conn.spoiled:
            raise _Stale if conn.uses else aiosmtplib.SMTPResponseException(-1, "unexpected data from the server")
        conn.library_protocol()
        try:
            reply = await conn.smtp.execute_command(b"MAIL", f"FROM:<{mail_from}>".encode(), *options)
        except ConnectionError as exc:  # aiosmtplib's SMTPServerDisconnected is one
            if conn.uses:
                raise _Stale from exc
            raise
        if reply.code == 421:
            if conn.uses:  # e.g. the server's idle timeout, answered to our next command
                raise _Stale
            raise _Unusable(TemporaryFailure(421, None, reply.message))
        return reply

    async def _content(self, conn: _Connection, data: bytes) -> Reply:
        """The content after 354, already CRLF-terminated (intake made it so): only
        dot-stuffing is left to do, in C, instead of aiosmtplib's per-line regexes. Its reply is
        read here too, so that anything the server adds after it spoils the connection instead
        of passing for the next command's reply."""
        stuffed = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
        end = b".\r\n" if stuffed.endswith(b"\r\n") or not stuffed else b"\r\n.\r\n"
        (final,) = await self._exchange(conn, stuffed + end, 1, stale=False)
        return Reply.parse(final.code, final.message, "DATA")

    def _mail_options(
        self, conn: _Connection, mail_from: str, recipients: Sequence[str], data: bytes
    ) -> list[bytes] | Reply:
        options = [f"SIZE={len(data)}".encode()] if "size" in conn.esmtp else []
        if not data.isascii() and "8bitmime" in conn.esmtp:
            options.append(b"BODY=8BITMIME")
        if not (mail_from.isascii() and all(r.isascii() for r in recipients)):
            if "smtputf8" not in conn.esmtp:
                return Reply(None, "5.6.7", "SMTPUTF8 is required, but was not offered by the server")
            options.append(b"SMTPUTF8")
        return options

    async def _reset(self, conn: _Connection) -> None:
        conn.library_protocol()
        try:
            await conn.smtp.execute_command(b"RSET")
        except aiosmtplib.SMTPException:
            conn.smtp.close()
            return
        self._checkin(conn)


def _failure(exc: BaseException, target: _Target) -> DeliveryFailure:
    """Map a connection-level library error to a temporary failure with the server's words."""
    if isinstance(exc, DeliveryFailure):
        return exc
    where = f"{target.host} [{target.ip}]:{target.port}"
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code < 200:  # not an SMTP reply at all
        text = " ".join(exc.message.removeprefix("Malformed SMTP response line:").split())[:200]
        return TemporaryFailure(None, "4.5.0", f"{where} sent a malformed reply: {text}")
    code = exc.code if isinstance(exc, aiosmtplib.SMTPResponseException) else None
    message = exc.message if isinstance(exc, aiosmtplib.SMTPResponseException) else str(exc)
    for kinds, enhanced, template in _FAILURES:
        if isinstance(exc, kinds):
            return TemporaryFailure(code, enhanced, template.format(where=where, message=message, reason=_reason(exc)))
    return TemporaryFailure(None, "4.4.2", f"{where}: {type(exc).__name__}: {str(exc)[:200]}")


# (exception types, enhanced code, text): the first match wins, so the most specific come first.
_FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str | None, str], ...] = (
    (aiosmtplib.SMTPConnectResponseError, None, "{where} greeted with: {message}"),
    (aiosmtplib.SMTPAuthenticationError, "4.7.8", "{where} refused our credentials: {message}"),
    (aiosmtplib.SMTPResponseException, None, "{where} said: {message}"),
    ((aiosmtplib.SMTPConnectTimeoutError, TimeoutError), "4.4.1", "connection to {where} timed out"),
    (aiosmtplib.SMTPConnectError, "4.4.1", "connection to {where} failed: {reason}"),
    ((ssl.SSLError, ssl.CertificateError), "4.7.5", "TLS with {where} failed: {reason}"),
    (aiosmtplib.SMTPTimeoutError, "4.4.2", "{where} timed out"),
    ((aiosmtplib.SMTPServerDisconnected, ConnectionError), "4.4.2", "{where} dropped the connection"),
)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return str(exc)
