"""Tracking tokens: HMAC-signed, URL-safe, and nothing but the canonical spelling verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.tracking import Token, TokenSigner

SECRET = b"test-secret-0123456789"
SIGNER = TokenSigner(SECRET)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
@settings(max_examples=200)
def test_tokens_round_trip(recipient_id: int, ordinal: int) -> None:
    assert SIGNER.verify(SIGNER.open_token(recipient_id)) == Token("open", recipient_id, 0)
    assert SIGNER.verify(SIGNER.click_token(recipient_id, ordinal)) == Token("click", recipient_id, ordinal)


def test_token_is_url_safe_and_carries_a_128_bit_mac() -> None:
    token = SIGNER.click_token(2**64 - 1, 2**32 - 1)
    assert set(token) <= set(ALPHABET)
    data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert len(data) - 13 >= 16
    assert data[:13] == b"c" + struct.pack(">QI", 2**64 - 1, 2**32 - 1)


def test_tokens_differ_by_recipient_kind_ordinal_and_secret() -> None:
    tokens = {SIGNER.open_token(1), SIGNER.open_token(2), SIGNER.click_token(1, 0), SIGNER.click_token(1, 1)}
    assert len(tokens) == 4
    other = TokenSigner(b"another secret")
    assert other.open_token(1) != SIGNER.open_token(1)
    assert other.verify(SIGNER.open_token(1)) is None


def test_every_single_character_change_is_rejected() -> None:
    for token in (SIGNER.open_token(7), SIGNER.click_token(123456789, 3)):
        for i, original in enumerate(token):
            for char in ALPHABET:
                if char != original:
                    assert SIGNER.verify(token[:i] + char + token[i + 1 :]) is None, (i, char)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.data())
@settings(max_examples=100)
def test_tampered_tokens_are_rejected(recipient_id: int, ordinal: int, data: st.DataObject) -> None:
    token = SIGNER.click_token(recipient_id, ordinal)
    i = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.characters().filter(lambda c: c != token[i]))
    assert SIGNER.verify(token[:i] + char + token[i + 1 :]) is None
    assert SIGNER.verify(token[:i] + token[i + 1 :]) is None
    assert SIGNER.verify(token + char) is None


@given(st.text())
@settings(max_examples=300)
def test_arbitrary_text_never_raises(text: str) -> None:
    assert SIGNER.verify(text) is None or isinstance(SIGNER.verify(text), Token)


@given(st.text(alphabet=ALPHABET, min_size=39, max_size=39))
@settings(max_examples=300)
def test_well_formed_garbage_is_rejected(text: str) -> None:
    assert SIGNER.verify(text) is None


@pytest.mark.parametrize("token", [None, b"abc", 5, "", "=" * 39, "a" * 40, SIGNER.open_token(1) + "="])
def test_malformed_tokens_are_rejected(token: object) -> None:
    assert SIGNER.verify(token) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "ordinal"), [(b"o", 1), (b"x", 0), (b"O", 0)])
def test_correctly_signed_but_invalid_payloads_are_rejected(kind: bytes, ordinal: int) -> None:
    payload = kind + struct.pack(">QI", 9, ordinal)
    mac = hmac.digest(SECRET, b"relay-track-v1\0" + payload, hashlib.sha256)[:16]
    token = base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()
    assert SIGNER.verify(token) is None


def test_signer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="secret"):
        TokenSigner(b"")
    with pytest.raises(ValueError, match="range"):
        SIGNER.click_token(-1, 0)
    with pytest.raises(ValueError, match="range"):
        SIGNER.click_token(1, 2**32)
