"""The apps and the server, in the same process and event loop as SMTP and delivery.

The private side (``[http] listen``): /metrics (with ``[http] metrics_token``, a bearer token),
/healthz, /readyz, the JSON API (relay.http.api), its OpenAPI document at /api/openapi.json,
Swagger UI at /api/docs, and the support console at /ui (relay.console).
The public side: the tracking endpoints (/t/o/{token}, /t/c/{token}),
on ``[tracking] listen`` when set (and then only there), else beside the private side.
FastAPI on uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastapi_offline
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from relay import metrics, tracking
from relay.config import Config
from relay.console import app as console
from relay.errors import StoreError
from relay.http import api, cases, send
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
    console_key: bytes = b""  # signs the console's session cookies (console.web.console_key); empty: a random one


def create_app(ctx: HttpContext, *, private: bool = True, public: bool = True) -> FastAPI:
    """The private side (metrics, health, the API and its docs) and/or the public side
    (tracking). Separate apps on separate listeners when ``[tracking] listen`` is set."""
    app = FastAPI(
        title="Relay",
        summary="The delivery log of a transactional SMTP relay",
        version="1",
        openapi_url="/api/openapi.json" if private else None,
        docs_url=None,  # served below, with assets from Relay instead of a CDN
        redoc_url=None,
    )
    if private:
        _private_routes(app, ctx)
    if public:
        _public_routes(app, ctx)
    return app


def _private_routes(app: FastAPI, ctx: HttpContext) -> None:
    app.state.store = ctx.store
    app.state.tokens = api.Tokens(ctx.config.http.api_tokens, ctx.config.http.api_tokens_readonly)
    app.state.wake_delivery = ctx.wake_delivery
    app.state.config = ctx.config
    app.include_router(api.router)
    app.include_router(send.router)
    app.include_router(cases.router)
    _docs_routes(app)
    # The console (/ui) lives on the private side only, never on [tracking] listen.
    console.install(app, ctx.config, ctx.store, ctx.console_key or secrets.token_bytes(32), ctx.wake_delivery)
    metrics_token = ctx.config.http.metrics_token.encode()

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
    async def metrics_endpoint(request: Request) -> Response:
        if metrics_token and not _bearer_matches(request, metrics_token):
            return Response(
                "a bearer token is required\n", status_code=401, media_type="text/plain",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )  # fmt: skip
        try:
            queue = await ctx.store.queue_summary(active_only=True)
            entries = await ctx.store.suppression_count()
            case_counts = await ctx.store.case_counts()
        except StoreError:
            return Response("store unreachable\n", status_code=503, media_type="text/plain")
        return Response(metrics.render(queue, entries, cases=case_counts), media_type=metrics.CONTENT_TYPE)


def _bearer_matches(request: Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of the token was right
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


DOCS_URL = "/api/docs"
_DOCS_ASSETS = "/api/docs/assets"


def _docs_routes(app: FastAPI) -> None:
    """Swagger UI at /api/docs (and /docs), its JavaScript and CSS served by Relay itself: the
    page works without Internet access and loads nothing from a third party."""
    app.mount(_DOCS_ASSETS, StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"), name="docs-assets")

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/api/openapi.json",
            title="Relay - API",
            swagger_js_url=f"{_DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url=None,
        )

    for path in (DOCS_URL, "/docs"):
        app.add_api_route(path, docs, methods=["GET"], include_in_schema=False)


def _public_routes(app: FastAPI, ctx: HttpContext) -> None:
    async def hit(token: str, kind: str, request: Request) -> tracking.Hit | Response:
        try:
            found = await tracking.record_hit(ctx.store, ctx.signer, token, kind, _client(request))
        except StoreError:
            log.exception("could not record a %s", kind)
            return Response("try again later\n", status_code=503, media_type="text/plain")
        if found is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        if found.coalesced:
            metrics.TRACKING_COALESCED.inc()
        else:
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
        self.app = app  # the ASGI app this server serves
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
