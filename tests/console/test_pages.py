"""The search page and the dashboard over real HTTP."""

from __future__ import annotations

import html
import re
import time

from helpers import new_message
from helpers.console import Console
from ulid import ULID

from relay.model import EventView, Imported


async def _seed_many(console: Console, n: int) -> list[str]:
    now = time.time() - 600
    ids = []
    for i in range(n):
        q = str(ULID())
        rcpt = "jane@example.com" if i % 2 == 0 else f"user{i}@example.org"
        msg = new_message(q, (rcpt,), at=now + i, subject=f"Invoice {i}", tags=("invoice",) if i % 3 else ("welcome",))
        events = (EventView(now + i, "received", None, {"client_ip": "127.0.0.1", "protocol": "ESMTP"}),)
        await console.store.bulk_import([Imported(msg, "delivered" if i % 5 else "bounced", 1, None, "250 ok", events)])
        ids.append(q)
    return ids


async def test_search_results_count_and_paging(console: Console) -> None:
    ids = await _seed_many(console, 60)
    async with console.signed_in("vera") as client:
        r = await client.get("/ui/messages", params={"q": "to:jane@example.com"})
        assert r.status_code == 200
        assert "30 messages" in r.text
        assert ids[-2] in r.text  # newest first
        assert 'type="checkbox"' not in r.text  # a viewer opens no case
        r = await client.get("/ui/messages", params={"q": "to:jane@example.com status:bounced"})
        assert "6 messages" in r.text
        first = await client.get("/ui/messages", params={"q": ""})
        assert "60 messages" in first.text
        assert first.text.count('href="/ui/messages/') >= 100  # 50 rows, two links each
        next_url = re.search(r'href="(/ui/messages\?[^"]*after=[^"]+)" rel="next"', first.text)
        assert next_url is not None
        second = await client.get(html.unescape(next_url.group(1)))
        assert second.status_code == 200
        assert "60 messages" in second.text  # carried by the link, not counted again
        assert ids[0] in second.text
        assert ids[-1] not in second.text
        assert 'rel="next"' not in second.text


async def test_search_errors_are_shown_not_raised(console: Console) -> None:
    async with console.signed_in("sam") as client:
        r = await client.get("/ui/messages", params={"q": "status:nope"})
        assert r.status_code == 200
        assert "That search could not be understood" in r.text
        assert "unknown status" in html.unescape(r.text)
        for q in ("\x00", "to:\x00", '"unterminated', "-", "a" * 2000, "<script>alert(1)</script>", "after:notadate"):
            r = await client.get("/ui/messages", params={"q": q})
            assert r.status_code == 200, q
            assert "<script>alert" not in r.text
        for after in ("garbage", "", "AAAA", "MTIzfA", "bmFufDAxSg"):
            assert (await client.get("/ui/messages", params={"after": after})).status_code == 200, after
        assert (await client.get("/ui/messages", params={"q": "a" * 3000})).status_code == 400


async def test_support_selects_messages_for_a_case(console: Console) -> None:
    ids = await _seed_many(console, 3)
    async with console.signed_in("sam") as client:
        r = await client.get("/ui/messages")
    assert 'action="/ui/cases/new"' in r.text
    for q in ids:
        assert f'name="queue_id" value="{q}"' in r.text
    assert "Open a case for the selected messages" in r.text


async def test_dashboard(console: Console) -> None:
    await _seed_many(console, 12)
    async with console.signed_in("vera") as client:
        r = await client.get("/ui/dashboard")
    assert r.status_code == 200
    text = r.text
    assert "<svg" in text
    assert "<script" not in text
    assert "invoice" in text
    assert "welcome" in text
    assert "Last hour" in text
    assert "age of the oldest message waiting" in text
    assert re.search(r'<rect class="bar-delivered" x="180" y="\d+" width="[\d.]+"', text)
