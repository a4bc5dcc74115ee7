"""Real peers on loopback for delivery tests: a DNS server whose zone a test can change while
Relay runs (dnslib), SMTP sinks (aiosmtpd) with scripted replies, and a raw server that greets
with whatever a test needs."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSLabel
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Zone(BaseResolver):  # type: ignore[misc]
    """A zone that answers from a dict; tests change it while Relay runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: dict[tuple[str, str], list[RR]] = {}
        self.rcodes: dict[str, int] = {}
        self.queries: list[tuple[str, str]] = []

    @staticmethod
    def _key(name: str) -> str:
        return name.rstrip(".").lower() + "."

    def mx(self, domain: str, *hosts: tuple[int, str], ttl: int = 0) -> None:
        with self._lock:
            self.records[(self._key(domain), "MX")] = [
                RR(self._key(domain), QTYPE.MX, rdata=MX(self._key(h) if h != "." else ".", pref), ttl=ttl)
                for pref, h in hosts
            ]
            self.rcodes.pop(self._key(domain), None)

    def a(self, host: str, *ips: str, ttl: int = 0) -> None:
        with self._lock:
            key = self._key(host)
            self.records[(key, "A")] = [RR(key, QTYPE.A, rdata=A(ip), ttl=ttl) for ip in ips if ":" not in ip]
            self.records[(key, "AAAA")] = [RR(key, QTYPE.AAAA, rdata=AAAA(ip), ttl=ttl) for ip in ips if ":" in ip]
            self.rcodes.pop(key, None)

    def txt(self, name: str, *values: str, ttl: int = 0) -> None:
        """TXT records at ``name`` (none: the name has no TXT); a value over 255 bytes is split
        into several strings, as a zone file does for a DKIM key."""
        with self._lock:
            key = self._key(name)
            self.records[(key, "TXT")] = [
                RR(key, QTYPE.TXT, rdata=TXT([v[i : i + 255] for i in range(0, len(v), 255)] or [""]), ttl=ttl)
                for v in values
            ]
            self.rcodes.pop(key, None)

    def servfail(self, name: str) -> None:
        with self._lock:
            self.rcodes[self._key(name)] = RCODE.SERVFAIL

    def heal(self, name: str) -> None:
        with self._lock:
            self.rcodes.pop(self._key(name), None)

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(DNSLabel(request.q.qname)).lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
            if qname in self.rcodes:
                reply.header.rcode = self.rcodes[qname]
                return reply
            for rr in self.records.get((qname, qtype), []):
                reply.add_answer(rr)
            if not any(name == qname and rrs for (name, _), rrs in self.records.items()):
                reply.header.rcode = RCODE.NXDOMAIN
        return reply


@contextlib.contextmanager
def dns_server() -> Any:
    zone = Zone()
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    # The TCP side takes the port the kernel gave the UDP side; another test may hold it on TCP.
    for _ in range(20):
        udp = DNSServer(zone, address="127.0.0.1", port=0, logger=quiet)
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(zone, address="127.0.0.1", port=port, tcp=True, logger=quiet)
        except OSError:
            udp.server.server_close()
            continue
        break
    else:
        raise OSError("no free port for a DNS server on both UDP and TCP")
    udp.start_thread()
    tcp.start_thread()
    zone.port = port  # type: ignore[attr-defined]
    try:
        yield zone
    finally:
        udp.stop()
        tcp.stop()
        udp.server.server_close()
        tcp.server.server_close()


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes
    peer: str
    login: str | None
    tls: bool


@dataclass
class SinkBehaviour:
    rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    data: list[str] = field(default_factory=list)  # replies to DATA in turn; then 250
    data_delay: float = 0.0


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.sink.behaviour.rcpt.get(address)
        if reply and not reply.startswith("250"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.behaviour.data_delay:
            await asyncio.sleep(self.sink.behaviour.data_delay)
        if self.sink.behaviour.data:
            reply = self.sink.behaviour.data.pop(0)
            if not reply.startswith("250"):
                return reply
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self.sink.messages.append(
            Received(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.content or b"", session.peer[0], login,
                     session.ssl is not None)
        )  # fmt: skip
        self.sink.arrived.set()
        return "250 2.0.0 OK: queued as SINK"


class _SinkSMTP(SMTP):
    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(_SinkHandler(sink), **kwargs)
        self.sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.sink.connections += 1
            self.sink.active += 1
            self.sink.max_active = max(self.sink.max_active, self.sink.active)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink.active -= 1
        super().connection_lost(error)


class Sink:
    """An aiosmtpd server that records what it accepts."""

    def __init__(
        self,
        ip: str,
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
        behaviour: SinkBehaviour | None = None,
    ) -> None:
        self.ip = ip
        self.port = port
        self.tls = tls
        self.users = users
        self.behaviour = behaviour or SinkBehaviour()
        self.messages: list[Received] = []
        self.arrived = asyncio.Event()
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._server: asyncio.Server | None = None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.users is not None
            and self.users.get(data.login.decode()) == data.password.decode()
        )
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            return _SinkSMTP(
                self,
                hostname=f"sink-{self.ip}",
                tls_context=self.tls,
                auth_require_tls=False,
                authenticator=self._authenticate if self.users is not None else None,
                auth_required=self.users is not None,
                enable_SMTPUTF8=True,
            )

        self._server = await loop.create_server(factory, self.ip, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def rcpts(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpts]


class Greeter:
    """A raw TCP server that greets with a fixed line (e.g. 554) and then hangs up."""

    def __init__(self, ip: str, port: int, greeting: bytes) -> None:
        self.ip, self.port, self.greeting = ip, port, greeting
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(self.greeting)
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await writer.drain()
            await asyncio.wait_for(reader.readline(), 2)
            writer.write(b"221 bye\r\n")
            await writer.drain()
        writer.close()

    async def start(self) -> Greeter:
        self._server = await asyncio.start_server(self._handle, self.ip, self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def sinks(*ips: str, **kwargs: Any) -> AsyncIterator[list[Sink]]:
    """Sinks on several loopback addresses sharing one ephemeral port."""
    first = await Sink(ips[0], 0, **kwargs).start()
    started = [first]
    try:
        for ip in ips[1:]:
            started.append(await Sink(ip, first.port, **kwargs).start())
        yield started
    finally:
        for s in started:
            await s.close()
