"""A webhook receiver on loopback: a raw HTTP/1.1 server (keep-alive, Content-Length bodies)
that verifies every request with the `standardwebhooks` reference library, answers as the
test says (an answer per request: a status, a stall, a 10 MB body, a redirect), and records
what came."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    stall: bool = False  # never answer


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: list[bool]  # one per secret the receiver checks with
    answered: int | None = None

    @property
    def payload(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.body)
        return doc

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    secrets: Sequence[str]
    answer: Callable[[Request], Reply] = lambda _req: Reply()
    requests: list[Request] = field(default_factory=list)
    stalling: int = 0  # requests being held right now
    host: str = "127.0.0.1"
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/hooks") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def on(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def ok(self, path: str | None = None) -> list[Request]:
        """Requests answered 2xx (to ``path``)."""
        return [r for r in self.requests if r.answered is not None and 200 <= r.answered < 300
                and (path is None or r.path == path)]  # fmt: skip

    def types(self, path: str | None = None) -> list[str]:
        return [r.payload["type"] for r in self.ok(path)]

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._closing.set()  # stalled requests end, unanswered
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                verified = []
                for secret in self.secrets:
                    try:
                        Webhook(secret).verify(body, headers)
                        verified.append(True)
                    except WebhookVerificationError:
                        verified.append(False)
                req = Request(line.split(" ")[1], headers, body, verified)
                self.requests.append(req)
                reply = self.answer(req)
                if reply.stall:
                    self.stalling += 1
                    await self._closing.wait()
                    self.stalling -= 1
                    return
                req.answered = reply.status
                reason = {200: "OK", 204: "No Content", 302: "Found", 410: "Gone"}.get(reply.status, "Status")
                out = [f"HTTP/1.1 {reply.status} {reason}", f"content-length: {len(reply.body)}",
                       *(f"{k}: {v}" for k, v in reply.headers)]  # fmt: skip
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode())
                with contextlib.suppress(ConnectionError):
                    for start in range(0, len(reply.body), 65536):
                        writer.write(reply.body[start : start + 65536])
                        await writer.drain()
                    await writer.drain()
        finally:
            self._handlers.discard(task)
            writer.close()


@asynccontextmanager
async def receiver(secrets: Sequence[str], answer: Callable[[Request], Reply] | None = None) -> AsyncIterator[Receiver]:
    r = Receiver(secrets) if answer is None else Receiver(secrets, answer)
    await r.start()
    try:
        yield r
    finally:
        await r.close()
