"""The console's own pages: sign-in and sign-out, search, a message (timeline, headers, body,
actions), held messages and the dashboard."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math
import re
import urllib.parse
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from relay.console import web
from relay.console.web import CSRF, Viewer
from relay.model import SearchPage
from relay.search import QueryError

log = logging.getLogger(__name__)

router = APIRouter(prefix=web.PREFIX, include_in_schema=False)

_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _actor_name(text: str) -> str:
    """A user name as typed, fit for the audit (no NUL, no control characters, bounded)."""
    return _PRINTABLE.sub("?", text)[:128]


# -- sign-in, sign-out


@router.get("", name="console_root")
@router.get("/", name="console_home")
async def home() -> RedirectResponse:
    return RedirectResponse(web.PREFIX + "/messages", status_code=303)


@router.get("/login", name="login")
async def login_form(request: Request, next: Annotated[str, Query(max_length=2000)] = "") -> Response:
    if await web.session_of(request) is not None:
        return web.redirect(request, web.local_path(next))
    return _login_page(request, next=next)


def _login_page(
    request: Request, *, next: str = "", error: str = "", username: str = "", status: int = 200
) -> Response:
    # Login CSRF: the form carries the token of a pre-session cookie (SameSite=Strict, HttpOnly), so
    # another site can neither read it nor post it: nobody is signed in to someone else's account.
    token = request.cookies.get(web.LOGIN_COOKIE) or ""
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", token):
        token = web.new_token()
    response = web.render(
        request, "login.html",
        {"login_token": token, "next": web.local_path(next), "error": error, "username": username},
        status=status,
    )  # fmt: skip
    web.set_cookie(request, response, web.LOGIN_COOKIE, token, max_age=3600)
    return response


@router.post("/login")
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=1000)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    login_token: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    console = web.console_of(request)
    ip = web.client_ip(request)
    cookie = request.cookies.get(web.LOGIN_COOKIE, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), login_token.encode()):
        return _login_page(request, next=next, username=username, status=400,
                           error="The sign-in form had expired. Please sign in again.")  # fmt: skip
    ok = await console.authenticator.check(username, password, ip)
    role = await console.store.user_role(username) if ok else None
    if not ok or role not in web.ROLE_RANK:
        await web.audit(request, actor=_actor_name(username), action="signin_failed")
        return _login_page(request, next=next, username=username, status=401,
                           error="Wrong user name or password.")  # fmt: skip
    old = await web.session_of(request)
    if old is not None:
        await console.store.session_delete(old.id)
    token, _ = await console.store.session_create(username, ip, idle=console.config.console.session_idle)
    await web.audit(request, actor=username, action="signin", details={"role": role})
    log.info("console: %s signed in from %s", username, ip)
    response = web.redirect(request, web.local_path(next))
    web.set_cookie(request, response, web.SESSION_COOKIE, web.sign(console.key, token))
    web.clear_cookie(request, response, web.LOGIN_COOKIE)
    return response


@router.post("/logout", dependencies=[CSRF])
async def logout(request: Request, user: Viewer) -> Response:
    await web.store_of(request).session_delete(user.session_id)
    await web.audit(request, actor=user.name, action="signout")
    log.info("console: %s signed out", user.name)
    response = web.redirect(request, web.PREFIX + "/login", flash="You are signed out.")
    web.clear_cookie(request, response, web.SESSION_COOKIE)
    return response


# -- search


PAGE_SIZE = 50


def _cursor(after: tuple[float, str] | None) -> str:
    if after is None:
        return ""
    return base64.urlsafe_b64encode(f"{after[0]!r}|{after[1]}".encode()).decode().rstrip("=")


def _parse_cursor(text: str) -> tuple[float, str] | None:
    """A cursor this page made; None for anything else (the first page then)."""
    try:
        at, _, last = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().partition("|")
        value = (float(at), last)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not re.fullmatch(r"[0-9A-Za-z]{1,32}", last) or not math.isfinite(value[0]):
        return None
    return value


@router.get("/messages", name="search")
async def search_page(
    request: Request,
    user: Viewer,
    q: Annotated[str, Query(max_length=2000)] = "",
    after: Annotated[str, Query(max_length=200)] = "",
    n: Annotated[str, Query(max_length=20, pattern=r"^[0-9,]*\+?$")] = "",
) -> Response:
    store = web.store_of(request)
    count = n  # the first page's count, carried by the "next page" links
    error = ""
    page = SearchPage((), 0, False, None)
    query = q.replace("\x00", " ")
    try:
        cursor = _parse_cursor(after) if after else None
        # Counted on the first page only: a later page keeps the count its link carries.
        page = await store.search_messages(query, limit=PAGE_SIZE, after=cursor, count=cursor is None)
    except QueryError as exc:  # written for the person who typed the query
        error = str(exc)
    if page.total >= 0:
        count = f"{page.total:,}+" if page.total_capped else f"{page.total:,}"
    next_url = ""
    if page.next is not None:
        args = {"q": query, "after": _cursor(page.next), "n": count}
        next_url = web.PREFIX + "/messages?" + urllib.parse.urlencode(args)
    return web.render(
        request, "search.html",
        {"q": query, "page": page, "count": count, "error": error, "next_url": next_url, "paged": bool(after),
         "first_url": web.PREFIX + "/messages?" + urllib.parse.urlencode({"q": query})},
    )  # fmt: skip
