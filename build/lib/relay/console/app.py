"""Mounting the console on the private app: its routers, static files, the security headers,
and error pages instead of JSON for everything under /ui."""

from __future__ import annotations

import importlib
import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from relay.auth import Authenticator
from relay.config import Config
from relay.console import dashboard, messages, pages, web
from relay.logstore import LogStore
from relay.model import CONSOLE_ROLES

log = logging.getLogger(__name__)

_STATUS_TEXT = {
    400: "That request could not be understood.",
    403: "You may not do this.",
    404: "There is no such page.",
    405: "This page cannot be used that way.",
}


def install(app: FastAPI, config: Config, store: LogStore, key: bytes, wake_delivery: Callable[[], None]) -> None:
    """The console on ``app`` (the private side only): /ui/..., signed with ``key``
    (web.console_key of the tracking secret)."""
    authenticator = Authenticator(lambda name: store.password_hash(name, CONSOLE_ROLES))
    app.state.console = web.Console(config, store, key, authenticator, wake_delivery)
    app.mount(web.PREFIX + "/static", StaticFiles(directory=Path(__file__).parent / "static"), name="console-static")
    app.include_router(pages.router)
    app.include_router(messages.router)
    app.include_router(dashboard.router)
    for router in _more_routers():
        app.include_router(router)
    app.add_middleware(web.SecurityHeaders)
    app.add_exception_handler(web.SignInRequired, _sign_in)
    app.add_exception_handler(web.ConsoleError, _console_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)


def _more_routers() -> list[APIRouter]:
    """cases_pages.router (the cases, audit and users pages), when that module is present."""
    try:
        module = importlib.import_module("relay.console.cases_pages")
    except ModuleNotFoundError as exc:
        if exc.name != "relay.console.cases_pages":
            raise
        return []
    router: APIRouter = module.router
    return [router]


def _is_console(request: Request) -> bool:
    return request.url.path == web.PREFIX or request.url.path.startswith(web.PREFIX + "/")


async def _sign_in(request: Request, exc: Exception) -> Response:
    target = web.PREFIX + "/login"
    if request.method == "GET":
        wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target += "?" + urllib.parse.urlencode({"next": web.local_path(wanted)})
    response = web.redirect(request, target)
    if web.SESSION_COOKIE in request.cookies:  # forged, expired or signed out: forget it
        web.clear_cookie(request, response, web.SESSION_COOKIE)
    return response


async def _console_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, web.ConsoleError)
    return web.render(request, "error.html", {"status": exc.status, "message": exc.message}, status=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if not _is_console(request):
        return await http_exception_handler(request, exc)
    message = _STATUS_TEXT.get(exc.status_code, "Something went wrong.")
    if exc.status_code == 404 and isinstance(exc.detail, str) and exc.detail != "Not Found":
        message = exc.detail
    return web.render(request, "error.html", {"status": exc.status_code, "message": message}, status=exc.status_code)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if not _is_console(request):
        return await request_validation_exception_handler(request, exc)
    fields = sorted({str(e.get("loc", ("", "?"))[-1]) for e in exc.errors()})
    message = "Please check: " + ", ".join(fields) + "." if fields else _STATUS_TEXT[400]
    return web.render(request, "error.html", {"status": 400, "message": message}, status=400)
