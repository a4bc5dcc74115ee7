"""The HTTP side, in the same process and event loop as SMTP and delivery: /metrics,
/healthz and /readyz, the tracking endpoints (/t/o/{token}, /t/c/{token}) and the JSON API
(relay.api). FastAPI on uvicorn; the OpenAPI document is at /api/openapi.json."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from relay import api, metrics, tracking
from relay.config import Config
from relay.errors import StoreError
from relay.logstore import LogStore

log = logging.getLogger(__name__)

PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
NO_CACHE = {"Cache-Control": "no-store, no-cache, must-revalidate, private, max-age=0", "Pragma": "no-cache"}


@dataclass
class HttpContext:
    config: Config
    store: LogStore
    signer: tracking.TokenSigner
    ready: Callable[[], list[str]]  # what is not ready; empty when all is well
    wake_delivery: Callable[[], None]


def create_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(
        title="Relay",
        summary="The delivery log of a transactional SMTP relay",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.store = ctx.store
    app.state.tokens = api.Tokens(ctx.config.http.api_tokens)
    app.state.wake_delivery = ctx.wake_delivery
    app.include_router(api.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        problems = list(ctx.ready())
        try:
            await ctx.store.ping()
        except StoreError:
            problems.append("store unreachable")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        try:
            queue = await ctx.store.queue_summary(active_only=True)
        except StoreError:
            return Response("store unreachable\n", status_code=503, media_type="text/plain")
        return Response(metrics.render(queue), media_type=metrics.CONTENT_TYPE)

    async def hit(token: str, kind: str, request: Request) -> tracking.Hit | Response:
        try:
            found = await tracking.record_hit(ctx.store, ctx.signer, token, kind, _client(request))
        except StoreError:
            log.exception("could not record a %s", kind)
            return Response("try again later\n", status_code=503, media_type="text/plain")
        if found is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        metrics.TRACKING.labels(kind, "true" if found.machine else "false").inc()
        return found

    @app.api_route("/t/o/{token}", methods=["GET", "HEAD"], include_in_schema=False)
    async def opened(token: str, request: Request) -> Response:
        found = await hit(token, "open", request)
        if isinstance(found, Response):
            return found
        return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)

    @app.api_route("/t/c/{token}", methods=["GET", "HEAD"], include_in_schema=False)
    async def clicked(token: str, request: Request) -> Response:
        found = await hit(token, "click", request)
        if isinstance(found, Response):
            return found
        assert found.url is not None
        return RedirectResponse(found.url, status_code=302, headers=NO_CACHE)

    return app


def _client(request: Request) -> tracking.Client:
    return tracking.Client(
        ip=request.client.host if request.client else "",
        user_agent=request.headers.get("user-agent", ""),
        method=request.method,
        at=time.time(),
    )


class _Server(uvicorn.Server):
    """uvicorn inside Relay's own lifecycle: Relay handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False)
        self._server = _Server(config)
        self._task: asyncio.Task[Any] | None = None

    async def start(self, sockets: list[socket.socket]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=sockets), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what went wrong
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
