"""A hand-written SMTP server on a raw socket, for what aiosmtpd never does: answer with a line
that is not an SMTP reply, a 9,000-byte line, a greeting with Relay's own name, a stall, or
AUTH without STARTTLS. Unscripted, it behaves as a plain sink and records what it accepts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import ClassVar, Self


@dataclass
class Accepted:
    mail_from: str
    rcpts: list[str]
    data: bytes
    at: float = field(default_factory=time.time)  # when the end of DATA arrived
    began: float = 0.0  # when we answered DATA with 354: the client was alive then


@dataclass
class RawPeer:
    """A server on a raw socket, on loopback; a subclass answers in ``_handle``."""

    ip: str
    port: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)
    _read_limit: ClassVar[int] = 1 << 16

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._handle, self.ip, self.port, limit=self._read_limit)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class ScriptedPeer(RawPeer):
    _read_limit: ClassVar[int] = 1 << 26
    name: str = "peer.test"  # in the greeting
    ehlo_name: str | None = None  # in the EHLO reply; None: the same as the greeting
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 52428800")
    replies: dict[str, bytes] = field(default_factory=dict)  # verb -> raw bytes sent instead of the reply
    stall: set[str] = field(default_factory=set)  # verbs never answered
    data_delay: float = 0.0  # seconds before the reply to the end of DATA
    messages: list[Accepted] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    in_data: int = 0  # sessions between the end of DATA and our reply to it

    def heal(self) -> None:
        """From now on, a well-behaved sink."""
        self.replies.clear()
        self.stall.clear()

    @property
    def rcpts(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpts]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            await self._session(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        await say(f"220 {self.name} ESMTP\r\n".encode())
        mail_from, rcpts = "", []
        while line := await reader.readline():
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            if verb in self.stall:
                await asyncio.sleep(3600)
            if verb in self.replies:
                await say(self.replies[verb])
                continue
            if verb == "EHLO":
                lines = [self.ehlo_name or self.name, *self.extensions]
                await say(
                    "".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n" for i, x in enumerate(lines)).encode()
                )
            elif verb == "HELO":
                await say(f"250 {self.ehlo_name or self.name}\r\n".encode())
            elif verb == "MAIL":
                mail_from, rcpts = command.partition(":")[2].split(">")[0].lstrip(" <"), []
                await say(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                rcpts.append(command.partition(":")[2].split(">")[0].lstrip(" <"))
                await say(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                began = time.time()
                await say(b"354 go ahead\r\n")
                data = await reader.readuntil(b"\r\n.\r\n")
                arrived = time.time()
                self.in_data += 1
                try:
                    if self.data_delay:
                        await asyncio.sleep(self.data_delay)
                    content = data[:-5].replace(b"\r\n..", b"\r\n.")
                    self.messages.append(Accepted(mail_from, rcpts, content, arrived, began))
                finally:
                    self.in_data -= 1
                mail_from, rcpts = "", []
                await say(b"250 2.0.0 Ok: queued\r\n")
            elif verb in ("RSET", "NOOP"):
                mail_from, rcpts = "", []
                await say(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                await say(b"221 2.0.0 Bye\r\n")
                return
            else:
                await say(b"502 5.5.2 Command not recognized\r\n")
