"""Shared fixtures: configs on temporary directories, an in-process Relay, TLS material,
and the PostgreSQL test server. Servers start on port 0 and are torn down after each test."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from helpers import make_config, pg_database, running_relay
from helpers.peers import Zone, dns_server

from relay.service.lifecycle import Relay


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async with running_relay(make_config(tmp_path)) as r:
        yield r


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    cert = ca.issue_cert("relay.test", "localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(d / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with pg_database() as url:
        yield url


@pytest.fixture
def zone() -> Iterator[Zone]:
    """A DNS server on loopback with an empty zone, for the test to fill."""
    with dns_server() as z:
        yield z
