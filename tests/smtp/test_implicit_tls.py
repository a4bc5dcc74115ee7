"""Submission over implicit TLS (RFC 8314) on [smtp] listen_tls, with a real client: the
standard library's smtplib.SMTP_SSL, as swaks --tlsc or any mail client would connect."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import make_config, running_relay, wait_for

from relay.auth import hash_password
from relay.config import Config
from relay.errors import ConfigError
from relay.service.lifecycle import Relay

MESSAGE = b"From: app@example.com\r\nTo: jane@example.com\r\nSubject: over TLS\r\n\r\nHello\r\n"


def tls_config(tmp_path: Path, files: tuple[str, str]) -> Config:
    cert, key = files
    return make_config(
        tmp_path, smtp={"trusted_networks": [], "tls_cert": cert, "tls_key": key, "listen_tls": ["127.0.0.1:0"]}
    )


def _submit(port: int, tls: ssl.SSLContext, password: str) -> tuple[list[str], str]:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=tls, local_hostname="client.test", timeout=10) as client:
        code, text = client.ehlo()
        assert code == 250
        features = text.decode().lower().splitlines()
        client.login("app", password)
        refused = client.sendmail("app@example.com", ["jane@example.com"], MESSAGE)
        assert refused == {}
        reply = client.noop()
        return features, reply[1].decode()


@pytest.fixture
async def tls_relay(tmp_path: Path, server_tls_files: tuple[str, str]) -> AsyncIterator[tuple[Relay, int]]:
    """A Relay with an implicit TLS listener and the user "app": the relay and that listener's port."""
    async with running_relay(tls_config(tmp_path, server_tls_files)) as relay:
        assert relay.store is not None
        await relay.store.add_user("app", hash_password("s3cret pass"))
        (address,) = relay.smtp_tls_addresses
        yield relay, address.port


async def test_a_client_submits_over_implicit_tls(tls_relay: tuple[Relay, int], client_tls: ssl.SSLContext) -> None:
    relay, port = tls_relay
    features, _ = await asyncio.to_thread(_submit, port, client_tls, "s3cret pass")
    assert any(f.startswith("auth") for f in features)  # offered at once: the session is encrypted
    assert not any("starttls" in f for f in features)  # TLS already
    (msg,) = await wait_for(lambda: _stored(relay))
    received = msg.events[0].details
    assert received["protocol"] == "ESMTPSA"
    assert received["user"] == "app"
    assert str(received["tls"]).startswith("TLSv1.")


async def _stored(relay: Relay) -> list[object] | None:
    assert relay.store is not None
    found = await relay.store.lookup("jane@example.com")
    return found or None  # type: ignore[return-value]


async def test_wrong_password_and_plain_text_on_the_tls_port(
    tls_relay: tuple[Relay, int], client_tls: ssl.SSLContext
) -> None:
    _, port = tls_relay
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        await asyncio.to_thread(_submit, port, client_tls, "wrong")
    assert err.value.smtp_code == 535
    # A client speaking plain SMTP to the TLS port gets no SMTP greeting, and the
    # connection ends (the TLS handshake fails); the listener keeps working.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"EHLO plain.test\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(1000), 10)
    assert not data.startswith(b"220")
    writer.close()
    await asyncio.to_thread(_submit, port, client_tls, "s3cret pass")


def test_listen_tls_needs_a_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"smtp\.listen_tls"):
        make_config(tmp_path, smtp={"listen_tls": ["127.0.0.1:0"]})


async def test_a_stalled_handshake_does_not_hold_the_listener(
    tls_relay: tuple[Relay, int], client_tls: ssl.SSLContext
) -> None:
    _, port = tls_relay
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        await asyncio.to_thread(_submit, port, client_tls, "s3cret pass")
    finally:
        for s in stalled:
            s.close()
