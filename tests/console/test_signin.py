"""Sign-in, sessions and cookies, over real HTTP."""

from __future__ import annotations

from conftest import Console, sign_in


async def test_root_redirects_to_sign_in_then_search(console: Console) -> None:
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
        assert "relay_session=" in cookie
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Path=/ui" in cookie
        assert "Secure" not in cookie
        r = await client.get("/ui/messages")
        assert r.status_code == 200
        assert "sam" in r.text
        assert "Sign out" in r.text
