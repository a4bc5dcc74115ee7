"""SMTP users: scrypt password hashes, verification, and slowing down failed logins.

A hash reads ``scrypt$N$r$p$salt$key`` (base64). Verifying costs tens of milliseconds and
16 MB, so it runs in a thread, at most ``HASH_WORKERS`` at a time (an AUTH flood queues there
instead of taking every worker thread and core from intake), and a success is remembered for
a few minutes as an HMAC keyed with a per-process secret over the user, the password and the
stored hash: a changed or removed user takes effect at the next AUTH, and no password is kept in memory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_N, _R, _P, _DKLEN = 2**14, 8, 1, 32
HASH_WORKERS = 2  # password hashes verified at once, per process
USERNAME = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY:
        _DUMMY.append(hash_password(secrets.token_urlsafe(16)))
    return _DUMMY[0]


@dataclass(slots=True)
class Throttle:
    """Failed logins within ``window`` seconds, counted per client IP (across all of its
    sessions) and per user name (across all IPs). The first failure costs nothing, each further
    one doubles the wait before the 535 reply: 1 s, 2 s, 4 s, up to ``max_delay``; the larger
    of the two counts decides. A success clears only its own name's count: one valid account
    must not reset an IP's failures against the others."""

    window: float = 900.0
    max_delay: float = 8.0
    max_entries: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _failures: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        """The IPs and user names counted now: what ``max_entries`` bounds."""
        return len(self._failures)

    def failed(self, ip: str, user: str = "") -> float:
        """Count a failure; return how long to wait before replying."""
        now = self.clock()
        count = self._count(("ip", ip), now)
        if USERNAME.match(user):  # a name that cannot exist is covered by the IP's count
            count = max(count, self._count(("user", user.lower()), now))
        if len(self._failures) > self.max_entries:
            self._prune(now)
        return 0.0 if count <= 1 else min(2.0 ** (count - 2), self.max_delay)

    def succeeded(self, ip: str, user: str = "") -> None:
        self._failures.pop(("user", user.lower()), None)

    def _count(self, key: tuple[str, str], now: float) -> int:
        count, first = self._failures.get(key, (0, now))
        if now - first > self.window:
            count, first = 0, now
        count += 1
        self._failures[key] = (count, first)
        return count

    def _prune(self, now: float) -> None:
        for key, (_, first) in list(self._failures.items()):
            if now - first > self.window:
                del self._failures[key]
        if len(self._failures) > self.max_entries:  # a spray of names: forget the oldest half
            by_age = sorted(self._failures.items(), key=lambda item: item[1][1])
            for key, _ in by_age[: len(by_age) // 2]:
                del self._failures[key]


class Authenticator:
    """Checks SMTP credentials against the users in the store."""

    cache_seconds = 300.0

    def __init__(self, lookup_hash: Callable[[str], Awaitable[str | None]]) -> None:
        self._lookup_hash = lookup_hash
        self._secret = secrets.token_bytes(32)
        self._verified: dict[str, tuple[bytes, float]] = {}
        self.throttle = Throttle()
        self._hashing = asyncio.Semaphore(HASH_WORKERS)

    async def check(self, username: str, password: str, ip: str) -> bool:
        """True when the credentials are right. A failure waits as the throttle says first."""
        ok = await self._check(username, password)
        if ok:
            self.throttle.succeeded(ip, username)
        else:
            delay = self.throttle.failed(ip, username)
            log.warning("authentication failed for user %r from %s", username, ip)
            if delay:
                await asyncio.sleep(delay)
        return ok

    async def _check(self, username: str, password: str) -> bool:
        if not USERNAME.match(username):
            return False
        stored = await self._lookup_hash(username)
        if stored is None:
            # Same cost as a wrong password, so that timing does not reveal who exists.
            await self._verify(password, None)
            return False
        mark = hmac.new(
            self._secret, b"\0".join((username.encode(), password.encode(), stored.encode())), "sha256"
        ).digest()
        seen = self._verified.get(username)
        if seen is not None and seen[1] > time.monotonic() and hmac.compare_digest(seen[0], mark):
            return True
        ok = await self._verify(password, stored)
        if ok:
            self._verified[username] = (mark, time.monotonic() + self.cache_seconds)
        return ok

    async def _verify(self, password: str, stored: str | None) -> bool:
        """None: a user that does not exist; verify against a dummy hash (made in the thread too)."""
        async with self._hashing:
            return await asyncio.to_thread(lambda: verify_password(password, stored or _dummy_hash()))
