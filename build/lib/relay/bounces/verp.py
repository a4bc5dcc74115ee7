"""The return path (VERP): ``b+{token}@{domain}``, one recipient per transaction, so that a
bounce names whose message it was whatever the bounce's format.

The token is the recipient's id and an HMAC-SHA256 over it (80 bits, compared in constant
time), in lower-case base32: a forged or altered token names nobody, and a mail system that
changes the case of the local part changes nothing. ``b+`` and 29 characters: the local part
stays far within RFC 5321's 64 octets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from typing import Final

_CONTEXT = b"relay-verp-v1\0"  # keeps these MACs apart from tracking tokens made with the same secret
_PAYLOAD = struct.Struct(">Q")
_MAC_SIZE = 10
TOKEN_LENGTH: Final = 29  # 18 bytes in unpadded base32
PREFIX: Final = "b+"
_TOKEN_CHARS = re.compile(rf"[a-z2-7]{{{TOKEN_LENGTH}}}")


class ReturnPath:
    """Makes and reads the signed return path addresses of one bounce domain."""

    def __init__(self, secret: bytes, domain: str) -> None:
        if not secret:
            raise ValueError("the signing secret must not be empty")
        self._secret = bytes(secret)
        self.domain = domain.lower()

    def token(self, recipient_id: int) -> str:
        payload = _PAYLOAD.pack(recipient_id)
        data = payload + self._mac(payload)
        return base64.b32encode(data).decode("ascii").rstrip("=").lower()

    def address(self, recipient_id: int) -> str:
        """The MAIL FROM of the recipient's transaction."""
        return f"{PREFIX}{self.token(recipient_id)}@{self.domain}"

    def verify(self, token: str) -> int | None:
        """The recipient id a token names; None for anything forged, altered or malformed."""
        token = token.lower()
        if not _TOKEN_CHARS.fullmatch(token):
            return None
        try:
            data = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
        except (ValueError, binascii.Error):
            return None
        if base64.b32encode(data).decode("ascii").rstrip("=").lower() != token:
            return None  # the last character carries unused bits: only the canonical spelling is valid
        payload, mac = data[: _PAYLOAD.size], data[_PAYLOAD.size :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        (recipient_id,) = _PAYLOAD.unpack(payload)
        return int(recipient_id)

    def recipient_of(self, address: str) -> int | None:
        """The recipient id a bounce address (``b+{token}@{domain}``) names; None when the
        address is not one of ours (another domain, another local part, a bad token)."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain or not local.lower().startswith(PREFIX):
            return None
        return self.verify(local[len(PREFIX) :])

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, _CONTEXT + payload, hashlib.sha256).digest()[:_MAC_SIZE]
