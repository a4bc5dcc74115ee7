"""Open and click tracking, the front door: signed tracking tokens, what to track, the
per-recipient rewrite at delivery (``Tracker``), and what an open or click hit records.

Owns the token format (HMAC-SHA256, compared in constant time) and the rules that tell a
person's hit from a machine's. How a message's HTML is rewritten, and how its links are
found, lives in ``relay.rewrite``; ``has_html`` and ``trackable_links`` are re-exported
here for intake.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from relay.model import EventType, TrackTarget
from relay.rewrite import has_html, rewrite, trackable_links

__all__ = [  # has_html and trackable_links are relay.rewrite's, re-exported: intake asks tracking
    "COALESCE_KEYS",
    "COALESCE_WINDOW",
    "MACHINE_WINDOW",
    "Client",
    "EngagementLog",
    "Hit",
    "Token",
    "TokenSigner",
    "Tracker",
    "has_html",
    "is_machine",
    "record_hit",
    "trackable_links",
    "tracking_choice",
]

_TOKEN_CONTEXT = b"relay-track-v1\0"
_PAYLOAD = struct.Struct(">cQI")
_MAC_SIZE = 16
_TOKEN_LENGTH = 39  # 13 payload + 16 mac bytes in unpadded base64
_TOKEN_CHARS = re.compile(rf"[A-Za-z0-9_-]{{{_TOKEN_LENGTH}}}")
_KINDS: dict[bytes, Literal["open", "click"]] = {b"o": "open", b"c": "click"}


@dataclass(frozen=True, slots=True)
class Token:
    kind: Literal["open", "click"]
    recipient_id: int
    ordinal: int  # 0 for opens; the link's position (0-based) for clicks


class TokenSigner:
    """HMAC-SHA256-signed, URL-safe tracking tokens naming (kind, recipient_id, ordinal)."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("tracking secret must not be empty")
        self._secret = bytes(secret)

    def open_token(self, recipient_id: int) -> str:
        return self._sign(b"o", recipient_id, 0)

    def click_token(self, recipient_id: int, ordinal: int) -> str:
        return self._sign(b"c", recipient_id, ordinal)

    def verify(self, token: str) -> Token | None:
        if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
            return None
        try:
            data = base64.urlsafe_b64decode(token + "=")
        except (ValueError, binascii.Error):
            return None
        # The last character carries two unused bits: only the canonical spelling is valid.
        if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != token:
            return None
        payload, mac = data[: _PAYLOAD.size], data[_PAYLOAD.size :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        kind, recipient_id, ordinal = _PAYLOAD.unpack(payload)
        name = _KINDS.get(kind)
        if name is None or (name == "open" and ordinal != 0):
            return None
        return Token(name, recipient_id, ordinal)

    def _sign(self, kind: bytes, recipient_id: int, ordinal: int) -> str:
        if not 0 <= recipient_id < 1 << 64 or not 0 <= ordinal < 1 << 32:
            raise ValueError("recipient_id or ordinal out of range")
        payload = _PAYLOAD.pack(kind, recipient_id, ordinal)
        return base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=").decode("ascii")

    def _mac(self, payload: bytes) -> bytes:
        return hmac.digest(self._secret, _TOKEN_CONTEXT + payload, hashlib.sha256)[:_MAC_SIZE]


# -- what to track, and the rewrite for one recipient


@dataclass(frozen=True, slots=True)
class Tracker:
    """Rewrites a tracked message for one recipient at delivery."""

    base_url: str
    signer: TokenSigner

    def rewrite(self, raw: bytes, recipient_id: int, track: str) -> bytes:
        opens, clicks = "opens" in track, "clicks" in track
        return rewrite(
            raw, base_url=self.base_url, signer=self.signer, recipient_id=recipient_id, opens=opens, clicks=clicks
        )


def tracking_choice(header: frozenset[str] | None, opens: bool, clicks: bool) -> str:
    """What to track: X-Relay-Track when the message has it, else the configured defaults."""
    chosen = header if header is not None else {k for k, on in (("opens", opens), ("clicks", clicks)) if on}
    return ",".join(k for k in ("opens", "clicks") if k in chosen)


# -- open and click hits


@dataclass(frozen=True, slots=True)
class Client:
    """Who fetched a tracking URL."""

    ip: str
    user_agent: str
    method: str
    at: float


@dataclass(frozen=True, slots=True)
class Hit:
    url: str | None  # where a click goes: always the stored URL, never one from the request
    machine: bool
    first: bool  # the recipient's first human open (or click)
    coalesced: bool = False  # a repeat within COALESCE_WINDOW: counted, not logged


COALESCE_WINDOW = 10.0  # seconds: repeats of one hit (token, IP, User-Agent, URL) make one event
COALESCE_KEYS = ("ip", "user_agent", "url")  # the details that make two hits the same


MACHINE_WINDOW = 5.0  # seconds after delivery: faster than a person, typical of scanners
_MACHINE_AGENT = re.compile(
    r"GoogleImageProxy|YahooMailProxy|bot\b|crawler|spider|scanner|preview|curl/|wget/|python-requests|"
    r"python-urllib|aiohttp|go-http-client|java/|okhttp|libwww|headlesschrome|barracuda|mimecast|proofpoint|"
    r"urldefense|trend ?micro|symantec|forcepoint|sophos|zscaler|ironport|cisco",
    re.IGNORECASE,
)


def is_machine(client: Client, delivered_at: float | None) -> bool:
    """Mail proxies, scanners and prefetchers, not people (README: "Tracking")."""
    agent = client.user_agent.strip()
    return (
        client.method == "HEAD"
        or not agent
        or agent == "Mozilla/5.0"  # Apple Mail Privacy Protection fetches with this bare agent
        or bool(_MACHINE_AGENT.search(agent))
        or (delivered_at is not None and client.at - delivered_at < MACHINE_WINDOW)
    )


class EngagementLog(Protocol):
    async def tracking_target(self, recipient_id: int, ordinal: int | None) -> TrackTarget | None: ...

    async def record_engagement(
        self, queue_id: str, address: str, kind: EventType, details: dict[str, Any], *, window: float
    ) -> bool | None: ...


async def record_hit(store: EngagementLog, signer: TokenSigner, token: str, kind: str, client: Client) -> Hit | None:
    """Verify the token, append an opened/clicked event; None (and nothing logged) when the
    token is tampered, malformed or names nothing we know. A repeat of a hit logged less than
    COALESCE_WINDOW ago (a proxy retrying, a reader reloading) is not logged again."""
    parsed = signer.verify(token)
    if parsed is None or parsed.kind != kind:
        return None
    target = await store.tracking_target(parsed.recipient_id, parsed.ordinal if kind == "click" else None)
    if target is None:
        return None
    machine = is_machine(client, target.delivered_at)
    details: dict[str, Any] = {"ip": client.ip, "user_agent": client.user_agent[:500], "machine": machine}
    if kind == "click":
        details["url"] = target.url
    first = await store.record_engagement(
        target.queue_id, target.address, "opened" if kind == "open" else "clicked", details, window=COALESCE_WINDOW
    )
    return Hit(target.url, machine, bool(first), coalesced=first is None)
