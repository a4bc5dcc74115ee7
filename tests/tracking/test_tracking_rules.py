"""relay.tracking's rules: what to track, who is a machine, and the per-recipient rewrite that
delivery asks for (``Tracker``, tracking's front door onto relay.rewrite)."""

from __future__ import annotations

import pytest

from relay import rewrite, tracking
from relay.tracking import MACHINE_WINDOW, Client, TokenSigner, Tracker, is_machine, tracking_choice

SIGNER = TokenSigner(b"test-secret-0123456789")
PERSON = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
HTML = (
    b'Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><a href="https://example.com/a">a</a></body></html>\r\n'
)


@pytest.mark.parametrize(
    ("header", "opens", "clicks", "chosen"),
    [
        (None, True, True, "opens,clicks"),
        (None, False, True, "clicks"),
        (None, False, False, ""),
        (frozenset({"clicks", "opens"}), False, False, "opens,clicks"),
        (frozenset(), True, True, ""),  # X-Relay-Track: none
    ],
)
def test_the_header_overrides_the_configured_defaults(
    header: frozenset[str] | None, opens: bool, clicks: bool, chosen: str
) -> None:
    assert tracking_choice(header, opens, clicks) == chosen


@pytest.mark.parametrize(
    ("agent", "method", "after_delivery", "machine"),
    [
        (PERSON, "GET", 60.0, False),
        (PERSON, "HEAD", 60.0, True),  # prefetchers check before they fetch
        ("", "GET", 60.0, True),
        ("Mozilla/5.0", "GET", 60.0, True),  # Apple Mail Privacy Protection
        ("Mozilla/5.0 (Windows NT 5.1) GoogleImageProxy", "GET", 60.0, True),
        ("curl/8.5.0", "GET", 60.0, True),
        (PERSON, "GET", MACHINE_WINDOW / 2, True),  # faster than a person reads
    ],
)
def test_machines_are_told_from_people(agent: str, method: str, after_delivery: float, machine: bool) -> None:
    delivered_at = 1_000_000.0
    client = Client("192.0.2.1", agent, method, at=delivered_at + after_delivery)
    assert is_machine(client, delivered_at) is machine
    undelivered = Client("192.0.2.1", agent, method, at=0.0)  # no delivery time: the window does not apply
    assert is_machine(undelivered, None) is (machine and after_delivery >= MACHINE_WINDOW)


@pytest.mark.parametrize("track", ["opens,clicks", "opens", "clicks", ""])
def test_the_tracker_rewrites_what_the_message_asks_for(track: str) -> None:
    tracker = Tracker("https://t.example.com", SIGNER)
    expected = rewrite.rewrite(
        HTML, base_url="https://t.example.com", signer=SIGNER, recipient_id=7,
        opens="opens" in track, clicks="clicks" in track,
    )  # fmt: skip
    assert tracker.rewrite(HTML, 7, track) == expected
    assert (expected == HTML) is (track == "")


def test_intake_finds_the_rewrites_helpers_at_the_front_door() -> None:
    assert tracking.has_html is rewrite.has_html
    assert tracking.trackable_links(HTML) == ["https://example.com/a"]
