"""The console's fixtures (tests/console, tests/retention): a running Relay (in-process, intake
only) with console users of each role, and helpers to sign in over real HTTP with httpx."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import make_config, running_relay
from relay.auth import hash_password
from relay.logstore import LogStore
from relay.service.lifecycle import Relay

PASSWORD = "correct horse battery staple"
USERS = {"vera": "viewer", "sam": "support", "ada": "admin", "smitty": "smtp"}
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
LOGIN_FIELD = re.compile(r'name="login_token" value="([^"]+)"')


@dataclass
class Console:
    relay: Relay
    store: LogStore
    base: str

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=15, follow_redirects=False)

    async def sign_in(self, name: str, password: str = PASSWORD) -> httpx.AsyncClient:
        """A client signed in as ``name``, already open: close it with ``aclose()``."""
        client = self.client()
        r = await sign_in(client, name, password)
        assert r.status_code == 303, r.text
        return client

    @asynccontextmanager
    async def signed_in(self, name: str, password: str = PASSWORD) -> AsyncIterator[httpx.AsyncClient]:
        """A client signed in as ``name`` (asserts that it worked)."""
        async with self.client() as client:
            r = await sign_in(client, name, password)
            assert r.status_code == 303, r.text
            assert r.headers["location"].startswith("/ui/")
            yield client


async def sign_in(client: httpx.AsyncClient, name: str, password: str = PASSWORD, next: str = "") -> httpx.Response:
    form = await client.get("/ui/login")
    match = LOGIN_FIELD.search(form.text)
    assert match, form.text
    return await client.post(
        "/ui/login", data={"username": name, "password": password, "login_token": match.group(1), "next": next}
    )


async def csrf_of(client: httpx.AsyncClient, page: str = "/ui/messages") -> str:
    r = await client.get(page)
    assert r.status_code == 200, r.text
    match = CSRF_FIELD.search(r.text)
    assert match, r.text
    return match.group(1)


async def add_users(store: LogStore, users: dict[str, str] = USERS, password: str = PASSWORD) -> None:
    digest = hash_password(password)  # one scrypt for all: they share the password
    for name, role in users.items():
        await store.add_user(name, digest, role)  # type: ignore[arg-type]


@asynccontextmanager
async def console_with(tmp_path: Path, **sections: Any) -> AsyncIterator[Console]:
    """A running Relay with the USERS, its config made of ``sections`` (as helpers.make_config takes)."""
    config = make_config(tmp_path, **sections)
    async with running_relay(config) as relay:
        assert relay.store is not None
        assert relay.http_address is not None
        await add_users(relay.store)
        yield Console(relay, relay.store, f"http://127.0.0.1:{relay.http_address.port}")


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    async with console_with(tmp_path) as c:
        yield c
