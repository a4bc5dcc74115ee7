"""Big and hostile content at intake: worked on off the event loop, in linear time, and without
copies that would multiply a big message in memory."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, queue_id_of, running_relay, smtp_port

from relay import intake, smtp_in, tracking

TRACKING = {"base_url": "https://t.example.com"}
HEADER = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n"


def html_message(size: int, links: int) -> bytes:
    """An HTML message of about `size` bytes with `links` trackable links, lines under 1000 octets."""
    per = size // links
    parts = []
    for i in range(links):
        link = b'<p><a href="https://example.com/page/%06d?utm=x&amp;y=1">Link %06d</a> ' % (i, i)
        parts.append(link + b"x" * max(0, per - len(link) - 2) + b"\r\n")
    html = b"<html><body>\r\n" + b"".join(parts) + b"</body></html>\r\n"
    return HEADER + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html


def plain_message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return HEADER + b"\r\n" + line * (size // len(line))


async def send_raw(port: int, content: bytes) -> str:
    """One message over a plain socket, written in 64 KB pieces with drain(), so the client
    side never holds a second copy."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def cmd(data: bytes | memoryview) -> str:
            writer.write(data)
            await writer.drain()
            while True:
                line = (await asyncio.wait_for(reader.readline(), 60)).decode().rstrip("\r\n")
                if not line or line[3:4] != "-":
                    return line

        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220")
        await cmd(b"EHLO client.test\r\n")
        await cmd(b"MAIL FROM:<a@example.com>\r\n")
        await cmd(b"RCPT TO:<b@example.com>\r\n")
        assert (await cmd(b"DATA\r\n")).startswith("354")
        view = memoryview(content)
        for start in range(0, len(view), 1 << 16):
            writer.write(view[start : start + (1 << 16)])
            await writer.drain()
        return await cmd(b".\r\n")
    finally:
        writer.close()


def record_threads(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seen: list[tuple[str, bool]]) -> None:
    original: Callable[..., Any] = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((name, threading.current_thread() is threading.main_thread()))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


async def test_big_messages_are_checked_and_scanned_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, bool]] = []
    for module, name in ((smtp_in, "long_line"), (intake, "prepare"), (tracking, "trackable_links")):
        record_threads(monkeypatch, module, name, seen)
    async with running_relay(make_config(tmp_path, tracking=TRACKING)) as relay:
        big = html_message(300_000, 1000)  # over smtp_in.HEAVY_CONTENT
        assert (await send_raw(smtp_port(relay), big)).startswith("250 2.0.0 Ok: queued as ")
        assert sorted(seen) == [("long_line", False), ("prepare", False), ("trackable_links", False)]
        seen.clear()
        small = html_message(20_000, 100)
        assert (await send_raw(smtp_port(relay), small)).startswith("250 2.0.0 Ok: queued as ")
        assert sorted(seen) == [("long_line", True), ("prepare", True), ("trackable_links", True)]


async def test_20mb_html_with_100k_links_is_accepted_and_its_links_recorded(tmp_path: Path) -> None:
    content = html_message(20_000_000, 100_000)
    async with running_relay(make_config(tmp_path, tracking=TRACKING)) as relay:
        reply = await send_raw(smtp_port(relay), content)
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        assert relay.store is not None
        qid = queue_id_of(reply)
        body = (await relay.store.load_bodies([qid]))[qid]
        assert body.endswith(content[content.index(b"\r\n\r\n") :])
        # The only recipient in a fresh store is number 1; its message's links are numbered from 0.
        last = await relay.store.tracking_target(1, 99_999)
        assert last is not None
        assert last.url == "https://example.com/page/099999?utm=x&y=1"
        assert await relay.store.tracking_target(1, 100_000) is None


@pytest.mark.timeout(300)
async def test_a_25mb_message_costs_about_its_size_once_more(tmp_path: Path) -> None:
    """Reading, checking and preparing a 25 MB message: at the peak, the message is in memory
    about twice (what arrived, and what is stored; 2.06x measured, 3.57x before), never three times."""
    content = plain_message(25_000_000)
    async with running_relay(make_config(tmp_path)) as relay:
        tracemalloc.start()
        try:
            reply = await send_raw(smtp_port(relay), content)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    assert peak < 2.4 * len(content), f"peak {peak / 1e6:.0f} MB for a {len(content) / 1e6:.0f} MB message"


# Each would take minutes or hours with a backtracking regex or a quadratic loop; linear, seconds.
HOSTILE_HTML = {
    "unclosed quotes": b'<a href="' * 400_000,
    "unclosed tags": b"<a " * 1_300_000,
    "open comments": b"<!--" * 1_000_000,
    "many attributes": b"<a " + b"x=1 " * 1_000_000,
    "lone less-thans": b"<" * 4_000_000,
    "end tags": b"</" * 2_000_000,
    "equals signs": b"<a " + b"= " * 2_000_000 + b">",
    "nested quotes": b"<a b='\"' c=\"'\" " * 250_000 + b">",
    "raw text openers": b"<style>" * 600_000,
    "long entity name": b'<a href="https://x/&' + b"a" * 4_000_000 + b'">x</a>',
    "entities": b'<a href="https://x/' + b"&amp" * 200_000 + b'">x</a>',
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(HOSTILE_HTML))
def test_link_scanning_is_linear_on_hostile_html(name: str) -> None:
    raw = b"Content-Type: text/html\r\n\r\n" + HOSTILE_HTML[name]
    links = tracking.trackable_links(raw)
    assert len(links) == (1 if name in ("long entity name", "entities") else 0)


@pytest.mark.timeout(120)
def test_header_checks_are_linear_on_hostile_headers() -> None:
    arrival = intake.Arrival("01J0000000000000000000000", "relay.test", "c.test", "127.0.0.1", "ESMTP", None, (), 0.0)
    folded = b"X-Long: start\r\n" + b"\tcontinued\r\n" * 400_000 + b"Subject: s\r\n\r\nbody\r\n"
    prepared = intake.prepare(folded, arrival)
    assert prepared.subject == "s"
    many = b"X-Field: v\r\n" * 400_000 + b"\r\nbody\r\n"
    assert intake.prepare(many, arrival).raw.endswith(b"\r\n\r\nbody\r\n")
    assert smtp_in.long_line(b"y" * 20_000_000)
    assert not smtp_in.long_line((b"y" * 998 + b"\r\n") * 20_000)


def test_prepare_does_not_copy_the_body_twice() -> None:
    arrival = intake.Arrival("01J0000000000000000000000", "relay.test", "c.test", "127.0.0.1", "ESMTP", None, (), 0.0)
    content = plain_message(10_000_000)
    tracemalloc.start()
    try:
        prepared = intake.prepare(content, arrival)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared.raw.endswith(content[len(HEADER) :])
    assert peak < 1.2 * len(content)  # the result, and no intermediate copy
