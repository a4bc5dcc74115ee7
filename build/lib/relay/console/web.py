"""What every console page shares: the templates, the signed session cookie, the signed-in user
and their role, the CSRF check, flash messages, the access audit, and the security headers.

A page is a FastAPI route under /ui that takes ``user: Viewer`` (or ``Support``, ``Admin``) and
returns ``render(request, "page.html", {...})``; a POST route also takes ``CSRF``
(``dependencies=[CSRF]``) and answers with ``redirect(url, flash="...")``. Without a valid session
a page redirects to /ui/login; with a role too low, or a form without the session's CSRF token,
it answers a 403 page. Nothing here raises a 500 for a bad cookie or a bad form.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.auth import Authenticator
from relay.config import Config
from relay.logstore import LogStore
from relay.model import CONSOLE_ROLES, Role
from relay.store.sessions import ConsoleSession

log = logging.getLogger(__name__)

PREFIX = "/ui"
SESSION_COOKIE = "relay_session"
LOGIN_COOKIE = "relay_login"  # the pre-session token of the sign-in form (login CSRF)
FLASH_COOKIE = "relay_flash"
ROLE_RANK: Mapping[str, int] = {"viewer": 1, "support": 2, "admin": 3}
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; frame-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def console_key(secret: bytes) -> bytes:
    """The key that signs session cookies, derived from the tracking secret (its own context)."""
    return hmac.new(secret, b"relay console session", hashlib.sha256).digest()


# -- the console's state on the app


@dataclass(slots=True)
class Console:
    """What the routes need, kept on ``app.state.console``."""

    config: Config
    store: LogStore
    key: bytes
    authenticator: Authenticator
    wake_delivery: Callable[[], None]


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def store_of(request: Request) -> LogStore:
    return console_of(request).store


def config_of(request: Request) -> Config:
    return console_of(request).config


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


# -- the session cookie


def sign(key: bytes, token: str) -> str:
    return token + "." + hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def unsign(key: bytes, cookie: str) -> str | None:
    """The token of a cookie whose signature is right; None for anything else."""
    token, dot, mac = cookie.rpartition(".")
    if not dot or not token or len(cookie) > 200:
        return None
    expected = hmac.new(key, token.encode(), hashlib.sha256).hexdigest()
    return token if hmac.compare_digest(mac.encode(), expected.encode()) else None


def set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int | None = None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def clear_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(
        name, path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )  # fmt: skip


# -- the signed-in user


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    name: str
    role: Role
    csrf: str
    session_id: str
    ip: str

    def has(self, role: Role) -> bool:
        return ROLE_RANK.get(self.role, 0) >= ROLE_RANK[role]

    @property
    def can_act(self) -> bool:
        """support and admin: read bodies, act on messages."""
        return self.has("support")

    @property
    def is_admin(self) -> bool:
        return self.has("admin")


class SignInRequired(Exception):
    """No valid session: the page redirects to the sign-in form."""


class ConsoleError(Exception):
    """An error page (403, 404, 400...) with a sentence for the person reading it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def session_of(request: Request) -> ConsoleSession | None:
    """The valid session the request's cookie names, if any (a forged, unknown or idle one: None)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    console = console_of(request)
    token = unsign(console.key, cookie)
    if token is None:
        return None
    return await console.store.session_get(token, idle=console.config.console.session_idle)


async def current_user(request: Request) -> ConsoleUser:
    """The signed-in user (cached on the request); SignInRequired without a valid session."""
    cached = getattr(request.state, "console_user", None)
    if isinstance(cached, ConsoleUser):
        return cached
    session = await session_of(request)
    if session is None or session.role not in CONSOLE_ROLES:
        raise SignInRequired
    now = time.time()
    if now - session.seen_at >= 60:  # idle expiry counts from here; written at most once a minute
        await console_of(request).store.session_touch(session.id, now)
    user = ConsoleUser(session.username, session.role, session.csrf, session.id, client_ip(request))
    request.state.console_user = user
    return user


def require_role(role: Role) -> Callable[..., Awaitable[ConsoleUser]]:
    async def dependency(user: Annotated[ConsoleUser, Depends(current_user)]) -> ConsoleUser:
        if not user.has(role):
            raise ConsoleError(403, f"This page is for the {role} role or above; you are signed in as {user.role}.")
        return user

    dependency.__name__ = f"require_{role}"
    return dependency


Viewer = Annotated[ConsoleUser, Depends(require_role("viewer"))]
Support = Annotated[ConsoleUser, Depends(require_role("support"))]
Admin = Annotated[ConsoleUser, Depends(require_role("admin"))]


async def check_csrf(request: Request, user: Annotated[ConsoleUser, Depends(current_user)]) -> None:
    """Every POST: the form's "csrf" field must be the session's token (compared in constant time)."""
    try:
        form = await request.form()
    except Exception as exc:  # a body that is not a form at all (multipart garbage, a bad boundary)
        raise ConsoleError(400, "The form could not be read.") from exc
    given = form.get("csrf")
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), user.csrf.encode()):
        log.warning("console: CSRF token missing or wrong for %s from %s on %s", user.name, user.ip, request.url.path)
        raise ConsoleError(
            403, "This form has expired or did not come from this console. Go back, reload the page and try again."
        )


CSRF = Depends(check_csrf)


# -- the access audit


async def audit(
    request: Request, *, actor: str, action: str, target: str = "", details: Mapping[str, Any] | None = None
) -> None:
    """One line of the access audit (sign-ins, body views, downloads). A failure to write it
    fails the request: nothing is shown that is not recorded."""
    await store_of(request).audit(actor=actor, ip=client_ip(request), action=action, target=target, details=details)


# -- pages


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    """A plain duration: "45 s", "12 min", "3 h 5 min", "2 days"."""
    if seconds is None or math.isnan(seconds):
        return "-"
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s // 60:.0f} min"
    if s < 86400:
        h, m = divmod(int(s // 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    days = s / 86400
    return f"{days:.0f} days" if days >= 2 else f"{days:.1f} days"


def _ago(ts: float | None) -> str:
    return "-" if ts is None else _duration(time.time() - ts) + " ago"


def _number(n: int | float | None) -> str:
    return "-" if n is None else f"{n:,}"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(when=_when, ago=_ago, duration=_duration, number=_number, percent=_percent)


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """A page: ``name`` under templates/, with ``request``, ``user`` (the signed-in one or None),
    ``flash`` (the message of the last redirect) and ``path`` added to ``context``."""
    values: dict[str, Any] = {"user": getattr(request.state, "console_user", None), "path": request.url.path}
    flash = request.cookies.get(FLASH_COOKIE)
    values["flash"] = urllib.parse.unquote(flash)[:500] if flash else None
    values.update(context)
    values["request"] = request
    response = HTMLResponse(templates.get_template(name).render(values), status_code=status)
    if flash:
        clear_cookie(request, response, FLASH_COOKIE)
    return response


def redirect(request: Request, url: str, *, flash: str | None = None, error: bool = False) -> RedirectResponse:
    """303 to a console page, with a message for it to show once (in red when ``error``)."""
    response = RedirectResponse(url, status_code=303)
    if flash:
        text = ("!" if error else "") + flash[:500]
        set_cookie(request, response, FLASH_COOKIE, urllib.parse.quote(text), max_age=60)
    return response


def local_path(url: str | None, default: str = PREFIX + "/messages") -> str:
    """``url`` when it is a console page of this site (a redirect target from a form), else ``default``."""
    if not url or not url.startswith(PREFIX + "/") or url.startswith("//") or "\\" in url:
        return default
    if any(ord(c) < 0x21 for c in url):
        return default
    return url


def new_token() -> str:
    return secrets.token_urlsafe(32)


# -- security headers on every /ui response


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response under /ui (a response's own header wins: the
    sandboxed HTML body has a stricter CSP of its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
