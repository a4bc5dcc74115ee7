"""The message page over real HTTP: the timeline in words, roles (no body for viewers), the
sandboxed HTML, the .eml, hostile MIME, support's actions with CSRF, and the held page."""

from __future__ import annotations

import re
import time
from pathlib import Path

from helpers import new_message
from helpers.console import Console, console_with, csrf_of
from ulid import ULID

from relay.model import EventView, Imported

HTML_MESSAGE = (
    b"From: App <app@example.com>\r\nTo: jane@example.com\r\nSubject: Your invoice\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Jane, your invoice <b>is</b> ready.\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><head><meta http-equiv="refresh" content="0;url=https://evil.example/"><base href="https://evil.example/">'
    b'<link rel="stylesheet" href="https://evil.example/s.css"><script>document.title="pwned"</script></head>'
    b'<body onload="alert(1)"><p style="background:url(https://evil.example/bg.png)">Hi</p>'
    b'<a href="https://sender.example/track?u=1">Pay now</a><img src="https://sender.example/pixel.gif" width="1">'
    b'<img src="data:image/png;base64,iVBORw0KGgo=">'
    b'<form action="https://evil.example/"><input name="x"></form><iframe src="https://evil.example/"></iframe>'
    b"<svg><image href='https://evil.example/i.png'/></svg></body></html>\r\n--b1--\r\n"
)


def qid() -> str:
    return str(ULID())


async def _seed(console: Console, raw: bytes = HTML_MESSAGE, rcpts: tuple[str, ...] = ("jane@example.com",)) -> str:
    q = qid()
    await console.store.enqueue(new_message(q, rcpts, raw=raw, subject="Your invoice"))
    return q


async def test_timeline_in_plain_words(console: Console) -> None:
    q, now = qid(), time.time() - 3600
    msg = new_message(q, ("jane@example.com",), at=now, raw=HTML_MESSAGE, subject="Your invoice")
    events = (
        EventView(now, "received", None, {"client_ip": "10.1.2.3", "helo": "app.example", "protocol": "ESMTPSA",
                                          "tls": "TLSv1.3", "user": "app", "size": 900, "recipients": 1}),
        EventView(now + 1, "deferred", "jane@example.com", {
            "attempt": 1, "mx_host": "mx.example.com", "ip": "192.0.2.1", "port": 25, "tls": "none", "code": 451,
            "enhanced_code": "4.7.1", "reply": "greylisted, try later", "duration_ms": 312,
            "reason": "greylisted", "hard": False, "rule": "phrase: greylist",
            "next_attempt_at": "2026-12-04T12:00:00Z",
        }),
        EventView(now + 60, "delivered", "jane@example.com", {
            "attempt": 2, "mx_host": "mx.example.com", "ip": "192.0.2.1", "port": 25, "tls": "TLSv1.3", "code": 250,
            "enhanced_code": "2.0.0", "reply": "OK", "duration_ms": 812,
        }),
        EventView(now + 70, "opened", "jane@example.com", {"ip": "66.249.1.1", "user_agent": "GoogleImageProxy",
                                                           "machine": True}),
        EventView(now + 80, "clicked", "jane@example.com", {"ip": "198.51.100.7", "user_agent": "Firefox",
                                                            "machine": False, "url": "https://shop.example/pay",
                                                            "first": True}),
        EventView(now + 90, "bounced", "jane@example.com", {
            "async": True, "report": "dsn", "action": "failed", "status": "5.2.2", "code": 552,
            "enhanced_code": "5.2.2", "reply": "mailbox full", "remote_mta": "mx2.example.com",
            "reason": "mailbox_full", "hard": False, "rule": "status: 5.2.2", "report_id": 7,
        }),
        EventView(now + 95, "complained", "jane@example.com", {
            "async": True, "report": "arf", "feedback_type": "abuse", "user_agent": "Yahoo!-Mail-Feedback/2.0",
            "reason": "feedback", "hard": False, "rule": "feedback-type: abuse", "report_id": 8,
        }),
        EventView(now + 100, "commented", None, {"by": "sam", "text": "Customer called, checking", "case_id": 3}),
    )  # fmt: skip
    await console.store.bulk_import([Imported(msg, "bounced", 2, None, "552 5.2.2 mailbox full", events)])
    async with console.signed_in("vera") as client:
        r = await client.get(f"/ui/messages/{q}")
    assert r.status_code == 200
    page = _text(r.text)
    for expected in (
        "Received from 10.1.2.3 (which introduced itself as app.example) over TLSv1.3",
        "Sent by user app",
        "Could not deliver yet: mx.example.com [192.0.2.1] answered 451 4.7.1 greylisted, try later "
        "(without TLS, 0.3 s)",
        "Reason: greylisted (temporary); matched rule: phrase: greylist",
        "Delivered to mx.example.com [192.0.2.1] over TLSv1.3 in 0.8 s: 250 2.0.0 OK",
        "A machine (a mail proxy or a link scanner) opened the message",
        "The recipient clicked a link: https://shop.example/pay",
        "Bounced after delivery: a DSN report came back; mx2.example.com said: 552 5.2.2 mailbox full",
        "Reason: mailbox_full (temporary); matched rule: status: 5.2.2",
        "reported a complaint (abuse)",
        "Note by sam: Customer called, checking",
    ):
        assert expected in page, expected
    assert 'href="/ui/cases/3"' in r.text
    # the raw report is support's: it may quote the body
    assert "/ui/reports/7" not in r.text
    # oldest first
    assert page.index("Received from") < page.index("Could not deliver yet") < page.index("Delivered to")
    assert page.index("Delivered to") < page.index("Bounced after delivery") < page.index("Note by sam")


def _text(html: str) -> str:
    """The page's text, whitespace collapsed, entities of the few kinds used decoded."""
    text = re.sub(r"<[^>]+>", " ", html)
    text = text.replace("&#39;", "'").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return re.sub(r"\s+", " ", text)


async def test_viewer_sees_headers_but_no_body_and_no_actions(console: Console) -> None:
    q = await _seed(console)
    async with console.signed_in("vera") as client:
        r = await client.get(f"/ui/messages/{q}")
        assert r.status_code == 200
        assert "Subject</strong>: Your invoice" in r.text  # headers: everyone
        for absent in ("Hello Jane", "<iframe", "/eml", "Retry now", "Send again", "Add a note",
                       f"/ui/messages/{q}/retry"):  # fmt: skip
            assert absent not in r.text, absent
        for path in (f"/ui/messages/{q}/html", f"/ui/messages/{q}/eml", "/ui/reports/1"):
            r = await client.get(path)
            assert r.status_code == 403, path
            assert "Hello Jane" not in r.text
        csrf = await csrf_of(client)
        for action in ("retry", "cancel", "note", "release", "discard", "resend", "unsuppress"):
            form = {
                "csrf": csrf,
                "text": "x",
                "address": "jane@example.com",
                "new_address": "j@example.org",
                "reason": "x",
            }
            r = await client.post(f"/ui/messages/{q}/{action}", data=form)
            assert r.status_code == 403, action
    view = await console.store.get_message(q)
    assert view is not None
    assert [e.type for e in view.events] == ["received"]  # nothing happened
    assert view.recipients[0].status == "queued"
    entries, _ = await console.store.audit_entries(actor="vera", action="view_body")
    assert entries == []


async def test_support_reads_the_body_and_it_is_audited(console: Console) -> None:
    q = await _seed(console)
    async with console.signed_in("sam") as client:
        r = await client.get(f"/ui/messages/{q}")
        assert r.status_code == 200
        assert "Hello Jane, your invoice &lt;b&gt;is&lt;/b&gt; ready." in r.text  # the text part, as text
        assert f'<iframe class="body-html" sandbox src="/ui/messages/{q}/html"' in r.text
        html = await client.get(f"/ui/messages/{q}/html")
        eml = await client.get(f"/ui/messages/{q}/eml")
    assert html.status_code == 200
    csp = html.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "sandbox" in csp
    assert "img-src data:" in csp
    assert "script" not in csp
    assert "frame-ancestors 'self'" in csp
    body = html.text
    assert "Pay now" in body
    assert "Link (not followed in the console): https://sender.example/track?u=1" in body
    for gone in ("<script", "pwned", "onload", "http-equiv", "<base", "<link", "<form", "<iframe", "<svg",
                 'href="', 'src="https', "url(", "evil.example/i.png"):  # fmt: skip
        assert gone not in body, gone
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in body
    assert eml.status_code == 200
    assert eml.headers["content-type"] == "message/rfc822"
    assert eml.headers["content-disposition"] == f'attachment; filename="{q}.eml"'
    assert eml.content == HTML_MESSAGE
    entries, _ = await console.store.audit_entries(actor="sam")
    seen = [(e.action, e.target) for e in entries]
    assert ("download", q) in seen
    assert seen.count(("view_body", q)) == 2  # the page (text and html) and the frame
    assert all(e.ip == "127.0.0.1" for e in entries)


HOSTILE = {
    "unknown charset": b"Subject: x\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n\r\n\xff\xfe body\r\n",
    "bad encoded words": b"Subject: =?utf-8?B?////?= =?x-bad?Q?=ZZ?= =?utf-8?q?caf=C3?=\r\n"
    b"From: =?utf-8?b?\r\n\r\nhi\r\n",
    "8-bit headers": b"Subject: \xff\xfe\xfd caf\xc3\xa9\r\nTo: <\xe9@example.com>\r\n\r\nhi\r\n",
    "huge header": b"Subject: " + b"A" * 300_000 + b"\r\nX-Many: " + b"b, " * 50_000 + b"\r\n\r\nhi\r\n",
    "many headers": b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\nhi\r\n",
    "deep multipart": b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    + b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(400))
    + b"--b400\r\nContent-Type: text/html\r\n\r\n<p>deep</p>\r\n",
    "no boundary": b"Content-Type: multipart/alternative\r\n\r\n--x\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n",
    "bad base64": b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!%%%\r\n",
    "binary junk": bytes(range(256)) * 64,
    "NULs": b"Subject: a\x00b\r\nContent-Type: text/html\r\n\r\n"
    b"<p>a\x00b</p><a href='\x00javascript:alert(1)'>x</a>\r\n",
    "unclosed html": b"Content-Type: text/html\r\n\r\n<div><script>alert(1)<p><a href=https://x.example/>x<style>a{background:url(",
    "empty": b"",
}


async def test_hostile_mime_never_500(console: Console) -> None:
    seeded = {name: await _seed(console, raw) for name, raw in HOSTILE.items()}  # one relay for all: fast
    async with console.signed_in("sam") as client:
        for name, q in seeded.items():
            r = await client.get(f"/ui/messages/{q}")
            assert r.status_code == 200, name
            html = await client.get(f"/ui/messages/{q}/html")
            assert html.status_code in (200, 404), name
            if html.status_code == 200:
                for gone in ("<script", "href=", "url("):
                    assert gone not in html.text, (name, gone)
            assert (await client.get(f"/ui/messages/{q}/eml")).content == HOSTILE[name]


async def test_unknown_and_malformed_ids(console: Console) -> None:
    async with console.signed_in("sam") as client:
        for path in (
            f"/ui/messages/{qid()}",
            f"/ui/messages/{qid()}/html",
            f"/ui/messages/{qid()}/eml",
            "/ui/reports/99",
        ):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert "text/html" in r.headers["content-type"]
        for path in ("/ui/messages/not-an-id", "/ui/messages/%00", "/ui/reports/-1", "/ui/reports/abc"):
            assert (await client.get(path)).status_code in (400, 404), path


async def test_csrf_missing_or_wrong_is_refused_and_changes_nothing(console: Console) -> None:
    q = await _seed(console)
    async with console.signed_in("sam") as client:
        csrf = await csrf_of(client)
        for data in ({}, {"csrf": ""}, {"csrf": "x" * 43}, {"csrf": csrf[:-1]}, {"csrf": csrf + "x"}):
            for action in ("note", "cancel", "retry"):
                r = await client.post(f"/ui/messages/{q}/{action}", data={**data, "text": "should not be here"})
                assert r.status_code == 403, (action, data)
                assert "did not come from this console" in r.text
        r = await client.post(
            f"/ui/messages/{q}/note",
            content=b"\xff\x00garbage",
            headers={"content-type": "multipart/form-data; boundary=zz"},
        )
        assert r.status_code in (400, 403)
        r = await client.post("/ui/logout", data={"csrf": "wrong"})
        assert r.status_code == 403
    view = await console.store.get_message(q)
    assert view is not None
    assert [e.type for e in view.events] == ["received"]
    # another user's token is not this session's
    async with console.signed_in("ada") as other:
        their = await csrf_of(other)
    async with console.signed_in("sam") as client:
        r = await client.post(f"/ui/messages/{q}/note", data={"csrf": their, "text": "x"})
        assert r.status_code == 403


async def test_actions_with_csrf(console: Console) -> None:
    q = await _seed(console)
    async with console.signed_in("sam") as client:
        csrf = await csrf_of(client)
        r = await client.post(f"/ui/messages/{q}/note", data={"csrf": csrf, "text": "Customer says it never came"})
        assert r.status_code == 303
        assert r.headers["location"] == f"/ui/messages/{q}"
        page = await client.get(r.headers["location"])
        assert "Note added." in page.text
        assert "Note by sam: Customer says it never came" in page.text
        page = await client.get(f"/ui/messages/{q}")
        assert "Note added." not in page.text  # a flash shows once
        r = await client.post(f"/ui/messages/{q}/note", data={"csrf": csrf, "text": "   "})
        assert r.status_code == 303
        assert "a note needs some text" in (await client.get(r.headers["location"])).text
        form = {"csrf": csrf, "address": "jane@example.com", "new_address": "jane@example.org", "reason": "typo"}
        r = await client.post(f"/ui/messages/{q}/resend", data=form)
        assert r.status_code == 303
        new = r.headers["location"].rsplit("/", 1)[1]
        assert new != q
        new_page = await client.get(f"/ui/messages/{new}")
        assert f'href="/ui/messages/{q}"' in new_page.text
        assert "a copy sent again to a corrected address" in new_page.text
        old_page = await client.get(f"/ui/messages/{q}")
        assert f'href="/ui/messages/{new}"' in old_page.text
        assert "Sent again by sam to the corrected address jane@example.org" in _text(old_page.text)
        r = await client.post(f"/ui/messages/{q}/cancel", data={"csrf": csrf, "reason": "customer asked"})
        assert r.status_code == 303
        r = await client.post(f"/ui/messages/{q}/retry", data={"csrf": csrf, "case_id": "12"})
        assert r.status_code == 303
        flash = (await client.get(r.headers["location"])).text
        assert "flash-error" in flash  # no case 12 (or nothing to retry): refused, said so
        r = await client.post(f"/ui/messages/{q}/retry", data={"csrf": csrf, "case_id": "1; drop table"})
        assert r.status_code == 400
    view = await console.store.get_message(q)
    assert view is not None
    assert [e.type for e in view.events] == ["received", "commented", "resent", "cancelled"]
    actions = {e.action for e in (await console.store.audit_entries(actor="sam"))[0]}
    assert {"action.note", "action.resend", "action.cancel"} <= actions


async def test_unsuppress_from_the_message(console: Console) -> None:
    from relay.model import Suppression

    q = await _seed(console)
    await console.store.suppress(Suppression("jane@example.com", "hard_bounce", "bounce", q, time.time()), "test")
    async with console.signed_in("sam") as client:
        page = await client.get(f"/ui/messages/{q}")
        assert "on the suppression list" in page.text
        assert "Remove the suppression" in page.text
        csrf = await csrf_of(client, f"/ui/messages/{q}")
        r = await client.post(f"/ui/messages/{q}/unsuppress", data={"csrf": csrf, "address": "jane@example.com",
                                                                    "reason": "mailbox fixed"})  # fmt: skip
        assert r.status_code == 303
        page = await client.get(r.headers["location"])
        assert "is no longer on the suppression list" in page.text
        assert "Removed from the suppression list by sam" in _text(page.text)
    assert await console.store.suppression("jane@example.com") is None


async def test_held_messages_release_and_discard(tmp_path: Path) -> None:
    async with console_with(tmp_path, delivery={"hold": True}) as c:
        one, two = await _seed(c), await _seed(c, rcpts=("bob@example.com", "eve@example.com"))
        async with c.signed_in("vera") as viewer:
            page = await viewer.get("/ui/held")
            assert page.status_code == 200
            assert one in page.text
            assert two in page.text
            assert "Release" not in page.text
        async with c.signed_in("sam") as client:
            page = await client.get("/ui/held")
            assert "Hold mode is on for every message" in page.text
            csrf = await csrf_of(client, "/ui/held")
            msg = await client.get(f"/ui/messages/{one}")
            assert "Held in the queue by hold mode ([delivery] hold)" in _text(msg.text)
            r = await client.post(f"/ui/messages/{one}/release", data={"csrf": csrf, "back": "/ui/held"})
            assert r.status_code == 303
            assert r.headers["location"] == "/ui/held"
            assert f"Released {one}" in (await client.get(r.headers["location"])).text
            r = await client.post(f"/ui/messages/{two}/discard", data={"csrf": csrf, "back": "https://evil.example/"})
            assert r.status_code == 303
            assert r.headers["location"].startswith("/ui/")
            assert "Discarded" in (await client.get(r.headers["location"])).text  # (the flash names the id)
            page = await client.get("/ui/held")
            assert one not in page.text
            assert two not in page.text
            r = await client.post(f"/ui/messages/{one}/release", data={"csrf": csrf})
            assert "Nothing was held" in (await client.get(r.headers["location"])).text
        released, discarded = await c.store.get_message(one), await c.store.get_message(two)
        assert released is not None
        assert discarded is not None
        assert [r.status for r in released.recipients] == ["queued"]
        assert {r.status for r in discarded.recipients} == {"cancelled"}


async def test_cases_covering_the_message_and_acting_for_one(console: Console) -> None:
    q = await _seed(console)
    case = await console.store.open_case(title="Jane's invoice", customer_ref="T-42", queue_ids=[q], actor="sam")
    closed = await console.store.open_case(title="Old one", queue_ids=[q], actor="sam")
    await console.store.close_case(closed.id, "duplicate", actor="sam")
    async with console.signed_in("sam") as client:
        page = await client.get(f"/ui/messages/{q}")
        assert f'href="/ui/cases/{case.id}"' in page.text
        assert f"Case #{case.id} opened by sam: Jane&#39;s invoice" in page.text
        assert f'<option value="{case.id}">' in page.text  # act for the open case
        assert f'<option value="{closed.id}">' not in page.text  # not for a closed one
        csrf = await csrf_of(client, f"/ui/messages/{q}")
        r = await client.post(
            f"/ui/messages/{q}/note", data={"csrf": csrf, "text": "called Jane", "case_id": str(case.id)}
        )
        assert r.status_code == 303
        assert "Note added." in (await client.get(r.headers["location"])).text
        r = await client.post(f"/ui/messages/{q}/note", data={"csrf": csrf, "text": "late", "case_id": str(closed.id)})
        assert "flash-error" in (await client.get(r.headers["location"])).text
    found = await console.store.case(case.id, sla=3600)
    assert found is not None
    assert [e.kind for e in found.entries][-1] == "action"
    assert found.entries[-1].details["action"] == "note"
    view = await console.store.get_message(q)
    assert view is not None
    assert [e.type for e in view.events].count("commented") == 1  # the closed case's note was refused whole


async def test_webhook_deliveries_on_the_timeline(tmp_path: Path) -> None:
    import base64

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    hooks = [{"url": "http://127.0.0.1:9/hooks", "secret": secret, "events": ["message.received"]}]
    async with console_with(tmp_path, webhooks=hooks) as c:
        q = await _seed(c)
        async with c.signed_in("vera") as client:
            page = await client.get(f"/ui/messages/{q}")
        assert "Webhook message.received to http://127.0.0.1:9/hooks: not delivered yet" in _text(page.text)
