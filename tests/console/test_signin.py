"""Sign-in, sessions and cookies, over real HTTP: what gets in, what does not, and what is recorded."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import sqlalchemy as sa
from helpers import make_config, raw_sql, running_relay
from helpers.console import LOGIN_FIELD, PASSWORD, Console, console_with, csrf_of, sign_in

from relay.auth import Throttle
from relay.console import web
from relay.store.schema import console_sessions


async def _session_rows(console: Console) -> list[tuple[str, float]]:
    def read(conn: sa.Connection) -> list[tuple[str, float]]:
        return [(r.username, float(r.seen_at)) for r in conn.execute(sa.select(console_sessions))]

    return await raw_sql(console.relay.config.store.url, read)


async def test_root_redirects_to_sign_in_then_back(console: Console) -> None:
    async with console.client() as client:
        r = await client.get("/ui/")
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/messages"
        r = await client.get("/ui/messages?q=to%3Ajane")
        assert r.status_code == 303
        assert r.headers["location"].startswith("/ui/login?next=")
        r = await sign_in(client, "sam", next="/ui/messages?q=to%3Ajane")
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/messages?q=to%3Ajane"
        cookie = r.headers["set-cookie"]
        for part in ("relay_session=", "HttpOnly", "Path=/ui"):
            assert part in cookie
        assert "samesite=strict" in cookie.lower()
        assert "Secure" not in cookie  # plain http on loopback; https would add it
        r = await client.get("/ui/messages")
        assert r.status_code == 200
        assert "Sign out" in r.text
        assert ">sam <" in r.text


async def test_every_role_signs_in_and_smtp_users_cannot(console: Console) -> None:
    for name in ("vera", "sam", "ada"):
        async with console.signed_in(name) as client:
            assert (await client.get("/ui/messages")).status_code == 200
    async with console.client() as client:
        r = await sign_in(client, "smitty")  # role smtp: sends mail, never signs in
        assert r.status_code == 401
        assert "Wrong user name or password" in r.text
        assert "relay_session" not in client.cookies
    # and a console user cannot send mail: SMTP AUTH asks for role smtp only
    assert await console.store.password_hash("sam") is None


async def test_wrong_password_unknown_user_and_hostile_names(console: Console) -> None:
    auth = _app(console).state.console.authenticator
    async with console.client() as client:
        for name, password in (("sam", "wrong"), ("nobody", PASSWORD), ("sam\x00", PASSWORD), ("x" * 900, "y")):
            auth.throttle = Throttle()  # each failure here first of its kind: no wait
            r = await sign_in(client, name, password)
            assert r.status_code == 401, name
            assert "relay_session" not in client.cookies
    failures, _ = await console.store.audit_entries(action="signin_failed")
    assert {e.actor for e in failures} >= {"sam", "nobody", "sam?"}
    assert all(e.ip == "127.0.0.1" for e in failures)


async def test_failed_sign_ins_are_throttled_like_smtp_auth(console: Console) -> None:
    async with console.client() as client:
        for _ in range(2):  # the first failure costs nothing, the second waits 1 s
            assert (await sign_in(client, "ada", "wrong")).status_code == 401
    auth = _app(console).state.console.authenticator
    # the third failure for this user, from another IP, would wait 2 s: counted per user and per IP
    assert auth.throttle.failed("192.0.2.9", "ada") == 2.0
    assert auth.throttle.failed("127.0.0.1", "someone-else") == 2.0
    # a success clears the user's count, not the IP's
    async with console.signed_in("ada"):
        pass
    assert auth.throttle.failed("192.0.2.10", "ada") == 0.0


def _app(console: Console):  # type: ignore[no-untyped-def]
    server = console.relay.http
    assert server is not None
    return server.app


async def test_login_form_needs_its_pre_session_token(console: Console) -> None:
    """Login CSRF: a form posted from elsewhere (no cookie, or another token) signs nobody in."""
    async with console.client() as client:
        r = await client.post("/ui/login", data={"username": "sam", "password": PASSWORD, "login_token": "x" * 43})
        assert r.status_code == 400
        assert "relay_session" not in client.cookies
        form = await client.get("/ui/login")
        token = LOGIN_FIELD.search(form.text)
        assert token is not None
        r = await client.post("/ui/login", data={"username": "sam", "password": PASSWORD, "login_token": "y" * 43})
        assert r.status_code == 400
        assert "relay_session" not in client.cookies


async def test_next_never_leaves_the_console(console: Console) -> None:
    async with console.client() as client:
        for target in ("https://evil.example/", "//evil.example/ui/", "/ui/../api", "/\\evil.example", "/api/v1/x"):
            client.cookies.clear()
            r = await sign_in(client, "sam", next=target)
            assert r.status_code == 303
            location = r.headers["location"]
            assert location.startswith("/ui/"), (target, location)
            assert not location.startswith("//")


async def test_forged_tampered_and_unknown_cookies_redirect(console: Console) -> None:
    async with console.signed_in("sam") as good:
        real = good.cookies["relay_session"]
    token, _, mac = real.rpartition(".")
    forged = [
        "garbage",
        "",
        ".",
        token,  # no signature
        token + "." + "0" * 64,  # wrong signature
        token[:-1] + ("A" if token[-1] != "A" else "B") + "." + mac,  # another token under the old signature
        web.sign(b"not the key", token),
        "x" * 5000,
        "\u00e9\u00e9.\u00e9",
    ]
    for value in forged:
        async with console.client() as client:
            r = await client.get("/ui/messages", headers={"cookie": f"relay_session={value}".encode()})
            assert r.status_code == 303, value
            assert r.headers["location"].startswith("/ui/login")
            r = await client.post(
                "/ui/logout", headers={"cookie": f"relay_session={value}".encode()}, data={"csrf": "x"}
            )
            assert r.status_code == 303
    # a cookie signed right but naming no session (deleted at sign-out)
    async with console.client() as client:
        r = await client.get("/ui/messages", headers={"cookie": f"relay_session={web.sign(_key(console), 'a' * 43)}"})
        assert r.status_code == 303


def _key(console: Console) -> bytes:
    key: bytes = _app(console).state.console.key
    return key


async def test_sign_out_deletes_the_session(console: Console) -> None:
    async with console.signed_in("vera") as client:
        cookie = client.cookies["relay_session"]
        assert [n for n, _ in await _session_rows(console)] == ["vera"]
        csrf = await csrf_of(client)
        r = await client.post("/ui/logout", data={"csrf": csrf})
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login"
        assert await _session_rows(console) == []
    async with console.client() as replay:  # the old cookie is worthless now
        r = await replay.get("/ui/messages", headers={"cookie": f"relay_session={cookie}"})
        assert r.status_code == 303
    actions = [e.action for e in (await console.store.audit_entries(actor="vera"))[0]]
    assert actions[:2] == ["signout", "signin"]


async def test_idle_session_expires(console: Console) -> None:
    async with console.signed_in("sam") as client:
        assert (await client.get("/ui/messages")).status_code == 200
        idle = console.relay.config.console.session_idle

        def age(conn: sa.Connection) -> None:
            conn.execute(sa.update(console_sessions).values(seen_at=time.time() - idle - 5))

        await raw_sql(console.relay.config.store.url, age, write=True)
        r = await client.get("/ui/messages")
        assert r.status_code == 303
        assert r.headers["location"].startswith("/ui/login")


async def test_use_moves_seen_at_at_most_once_a_minute(console: Console) -> None:
    async with console.signed_in("sam") as client:
        ((_, first),) = await _session_rows(console)
        for _ in range(3):
            assert (await client.get("/ui/messages")).status_code == 200
        assert await _session_rows(console) == [("sam", first)]

        def back(conn: sa.Connection) -> None:
            conn.execute(sa.update(console_sessions).values(seen_at=first - 120))

        await raw_sql(console.relay.config.store.url, back, write=True)
        assert (await client.get("/ui/messages")).status_code == 200
        ((_, seen),) = await _session_rows(console)
        assert seen >= first


async def test_removed_user_loses_their_session(console: Console) -> None:
    async with console.signed_in("vera") as client:
        await console.store.remove_user("vera")
        r = await client.get("/ui/messages")
        assert r.status_code == 303


async def test_sign_in_and_out_are_audited(console: Console) -> None:
    async with console.signed_in("ada") as client:
        await client.post("/ui/logout", data={"csrf": await csrf_of(client)})
    entries, _ = await console.store.audit_entries(actor="ada")
    assert [e.action for e in entries] == ["signout", "signin"]
    assert entries[1].details == {"role": "admin"}
    assert entries[1].ip == "127.0.0.1"


async def test_security_headers_on_every_console_response(console: Console) -> None:
    async with console.client() as anonymous:
        pages = [await anonymous.get("/ui/login"), await anonymous.get("/ui/messages"), await anonymous.get("/ui/nope")]
    async with console.signed_in("sam") as client:
        pages += [await client.get("/ui/messages"), await client.get("/ui/static/console.css")]
    for r in pages:
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cache-control"] == "no-store"
    assert pages[2].status_code == 404
    assert "text/html" in pages[2].headers["content-type"]


async def test_api_errors_stay_json(console: Console) -> None:
    async with console.client() as client:
        r = await client.get("/api/v1/messages")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/json"
        assert "content-security-policy" not in r.headers


async def test_console_is_not_on_the_tracking_listener(tmp_path: Path) -> None:
    config = make_config(tmp_path, tracking={"base_url": "http://track.example.test", "listen": "127.0.0.1:0"})
    async with running_relay(config) as relay:
        assert relay.tracking_address is not None
        assert relay.http_address is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.tracking_address.port}") as public:
            for path in ("/ui/", "/ui/login", "/ui/messages", "/ui/static/console.css"):
                assert (await public.get(path)).status_code == 404, path
            assert (await public.post("/ui/login", data={"username": "a"})).status_code == 404
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}") as private:
            assert (await private.get("/ui/login")).status_code == 200


async def test_session_idle_setting_is_used(tmp_path: Path) -> None:
    async with console_with(tmp_path, console={"session_idle": "2m"}) as c, c.signed_in("sam") as client:

        def age(conn: sa.Connection) -> None:
            conn.execute(sa.update(console_sessions).values(seen_at=time.time() - 150))

        await raw_sql(c.relay.config.store.url, age, write=True)
        assert (await client.get("/ui/messages")).status_code == 303


async def test_cookies_are_secure_behind_an_https_proxy(console: Console) -> None:
    """A TLS-terminating proxy on the same host (uvicorn trusts X-Forwarded-Proto from loopback):
    the cookies get ``Secure``."""
    async with console.client() as client:
        client.headers["x-forwarded-proto"] = "https"
        form = await client.get("/ui/login")
        assert "Secure" in form.headers["set-cookie"]
        token = LOGIN_FIELD.search(form.text)
        assert token is not None
        r = await client.post(
            "/ui/login",
            data={"username": "sam", "password": PASSWORD, "login_token": token.group(1)},
            headers={"cookie": f"relay_login={token.group(1)}"},  # a Secure cookie: httpx keeps it for https
        )
        assert r.status_code == 303
        session = [c for c in r.headers.get_list("set-cookie") if c.startswith("relay_session=")]
        assert session
        assert "Secure" in session[0]
