"""`relay suppressions` through the real CLI, on SQLite and PostgreSQL: add, list, check, remove
(a complaint's needs --reason), the audit trail with the OS user, CSV import (all or nothing)
and export (which import reads back as it was); and the CSV reader on hostile bytes."""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import relay_cli, store_url, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.cli import read_suppressions_csv
from relay.logstore import LogStore
from relay.model import Suppression

HEADER = "address,reason,origin,source_queue_id,created_at,expires_at,note"


@dataclass
class Store:
    url: str
    config: Path

    async def cli(self, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        return await relay_cli("--config", str(self.config), "suppressions", *args, stdin=stdin)

    async def count(self) -> int:
        store = await LogStore.open(self.url)
        try:
            return await store.suppression_count()
        finally:
            await store.close()

    async def plant(self, *entries: Suppression) -> None:
        store = await LogStore.open(self.url)
        try:
            await store.import_suppressions(entries, "bounces")
        finally:
            await store.close()


async def make_store(kind: str, where: Path, stack: AsyncExitStack) -> Store:
    url = await store_url(kind, where / "data" / "relay.db", stack)
    s = await LogStore.open(url)
    try:
        await s.upgrade()
    finally:
        await s.close()
    config = write_config(
        where / "relay.toml",
        f'[server]\nhostname = "relay.test"\ndata_dir = "{where / "data"}"\n[store]\nurl = "{url}"\n',
    )
    return Store(url, config)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with AsyncExitStack() as stack:
        yield await make_store(request.param, tmp_path, stack)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    """For the tests of the CLI's own behaviour: the store's is tested on both backends elsewhere."""
    async with AsyncExitStack() as stack:
        yield await make_store("sqlite", tmp_path, stack)


def actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "cli"


async def test_add_list_check_remove_and_the_audit_trail(sqlite_store: Store) -> None:
    store = sqlite_store
    code, out, err = await store.cli("add", "Jane@Example.COM", "--note", "asked by phone", "--expires", "30d")
    assert code == 0, err
    assert out.startswith("suppressed jane@example.com until ")
    code, out, _ = await store.cli("add", "JANE@example.com", "--note", "again")
    assert code == 0
    assert "suppressed already" in out
    assert (await store.cli("add", "*@Spam.Example"))[0] == 0
    await store.plant(
        Suppression("angry@example.com", "complaint", "complaint", "01ARF0000000000000000000AA", time.time(), None, "")
    )

    # read-only, so at once: each is a process of its own
    listed_json, complaints, limited, domain_check, no_check = await asyncio.gather(
        store.cli("list", "--json"),
        store.cli("list", "--reason", "complaint"),
        store.cli("list", "--limit", "1"),
        store.cli("check", "Bob@spam.example", "--json"),
        store.cli("check", "bob@example.com"),
    )
    listed = json.loads(listed_json[1])
    assert [e["address"] for e in listed] == ["angry@example.com", "*@spam.example", "jane@example.com"]
    jane = listed[2]
    assert (jane["reason"], jane["origin"], jane["note"]) == ("manual", "cli", "asked by phone")
    assert 29 * 86400 < _epoch(jane["expires_at"]) - _epoch(jane["created_at"]) <= 30 * 86400 + 1
    assert [line.split()[0] for line in complaints[1].splitlines()] == ["angry@example.com"]
    assert len(limited[1].splitlines()) == 1
    assert "use --limit for more" in limited[2]
    assert json.loads(domain_check[1])["entry"]["address"] == "*@spam.example"
    assert no_check[1].strip() == "bob@example.com is not suppressed"

    code, _, err = await store.cli("remove", "angry@example.com")
    assert code == 2
    assert err.startswith("relay: angry@example.com is suppressed for a complaint: removing it needs a reason")
    code, _, err = await store.cli("remove", "angry@example.com", "--reason", "   ")
    assert code == 2
    code, out, err = await store.cli("remove", "Angry@Example.com", "--reason", "opted in again, ticket 4411")
    assert code == 0, err
    assert out.strip() == "removed angry@example.com (was complaint)"
    code, _, err = await store.cli("remove", "angry@example.com", "--reason", "twice")
    assert code == 1
    assert err.strip() == "relay: angry@example.com is not suppressed"
    code, _, err = await store.cli("remove", "jane@spam.example")
    assert code == 1
    assert "suppressed by the entry *@spam.example" in err

    code, out, _ = await store.cli("audit", "angry@example.com", "--json")
    removed, added = json.loads(out)
    assert removed["action"] == "removed"
    assert (removed["reason"], removed["actor"], removed["origin"]) == ("opted in again, ticket 4411", actor(), "cli")
    assert removed["source_queue_id"] == "01ARF0000000000000000000AA"
    assert (added["action"], added["reason"], added["actor"]) == ("added", "complaint", "bounces")
    code, out, _ = await store.cli("audit")
    assert len(out.splitlines()) == 4
    assert f"by {actor()} via cli" in out.splitlines()[0]

    bad = (
        ("add", "not-an-address"),
        ("add", "x@example.com", "--expires", "2001-01-01"),
        ("add", "x@example.com", "--expires", "soon"),
        ("list", "--address", "nope"),
    )
    for args, (code, _, err) in zip(bad, await asyncio.gather(*(store.cli(*a) for a in bad)), strict=True):
        assert code == 2, args
        assert err.startswith("relay: "), err
    assert await store.count() == 2


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


CSV_IN = (
    "address,reason,note,expires_at,source_queue_id,origin,created_at\r\n"
    "Ann@Example.com,,,,,,\r\n"  # all but the address empty: manual, cli, now, never
    '*@blocked.example,manual,"whole domain, ""on request""",2099-01-01T00:00:00Z,,,2026-01-01T00:00:00Z\r\n'
    'bob@example.com,complaint,"two\nlines",,01BOB0000000000000000000AA,complaint,2026-02-01T00:00:00.250Z\r\n'
    "\r\n"  # blank lines are skipped
    "old@example.com,hard_bounce,,2001-01-01T00:00:00Z,,bounce,2000-01-01T00:00:00Z\r\n"  # expired: skipped
)


async def test_csv_round_trip(store: Store, tmp_path: Path) -> None:
    code, out, err = await store.cli("import", "-", stdin=CSV_IN.encode())
    assert code == 0, err
    assert out.strip() == "imported 3 entries; 0 suppressed already (kept as they were); 1 expired"
    code, exported, _ = await store.cli("export")
    assert code == 0
    rows = list(csv.reader(io.StringIO(exported, newline="")))
    assert rows[0] == HEADER.split(",")
    by_address = {r[0]: r for r in rows[1:]}
    assert by_address.keys() == {"ann@example.com", "*@blocked.example", "bob@example.com"}
    assert by_address["*@blocked.example"] == [
        "*@blocked.example", "manual", "cli", "", "2026-01-01T00:00:00.000Z", "2099-01-01T00:00:00.000Z",
        'whole domain, "on request"',
    ]  # fmt: skip
    assert by_address["bob@example.com"] == [
        "bob@example.com", "complaint", "complaint", "01BOB0000000000000000000AA", "2026-02-01T00:00:00.250Z", "",
        "two\nlines",
    ]  # fmt: skip
    assert by_address["ann@example.com"][1:4] == ["manual", "cli", ""]
    assert exported.endswith("\r\n")

    # import what was exported into another store: its export is the same, byte for byte
    async with AsyncExitStack() as stack:
        other = await make_store("sqlite", tmp_path / "other", stack)
        path = tmp_path / "suppressions.csv"
        code, out, _ = await store.cli("export", str(path))
        assert out.strip() == f"exported 3 entries to {path}"
        code, out, err = await other.cli("import", str(path))
        assert code == 0, err
        assert (await other.cli("export"))[1] == exported
        # and again into the first one: everything is there already, nothing changes
        code, out, _ = await store.cli("import", str(path))
        assert out.strip() == "imported 0 entries; 3 suppressed already (kept as they were); 0 expired"
        assert (await store.cli("export"))[1] == exported


async def test_a_bad_row_imports_nothing(store: Store, tmp_path: Path) -> None:
    bad = (
        "address,reason,note\n"
        "good1@example.com,manual,fine\n"
        "not-an-address,manual,\n"
        "good2@example.com,spam,\n"
        "good3@example.com,manual\n"
        'good4@example.com,manual,"ok"\n'
    )
    path = tmp_path / "bad.csv"
    path.write_text(bad)
    code, out, err = await store.cli("import", str(path))
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"relay: {path}: nothing imported:",
        "  line 3: address: not a mailbox or *@domain",
        "  line 4: reason: Input should be 'hard_bounce', 'complaint' or 'manual'",
        "  line 5: 2 fields where the header has 3",
    ]
    assert await store.count() == 0
    for text, problem in (
        ("adress,note\nx@example.com,\n", "line 1: unknown column 'adress'"),
        ("note\nhello\n", "line 1: no address column"),
        ("", "no header row"),
        (b"address\n\xff@example.com\n", "byte 8: not UTF-8"),
    ):
        data = text if isinstance(text, bytes) else text.encode()
        code, _, err = await store.cli("import", "-", stdin=data)
        assert code == 1
        assert problem in err, err
    code, _, err = await store.cli("import", str(tmp_path / "missing.csv"))
    assert code == 1
    assert "cannot read" in err
    assert await store.count() == 0
    assert (await store.cli("audit"))[1] == ""


def test_csv_reader_reports_and_never_raises() -> None:
    now = time.time()
    found = read_suppressions_csv(b'\xef\xbb\xbfAddress , Reason\r\n x@example.com ,complaint\r\n"unterminated', now)
    assert [e.address for e in found.entries] == ["x@example.com"]  # a BOM, spaces and the header's case are fine
    assert found.errors == ["line 3: unexpected end of data"]
    many = read_suppressions_csv(b"address\n" + b"bad\n" * 5000, now)
    assert len(many.errors) == 5000
    assert many.errors[0] == "line 2: address: not a mailbox or *@domain"
    huge_field = read_suppressions_csv(b'address,note\nx@example.com,"' + b"a" * 2_000_000 + b'"\n', now)
    assert huge_field.entries == []
    assert huge_field.errors
    quotes = read_suppressions_csv(b"address\n" + b'"' * 2_000_000, now)
    assert quotes.entries == []
    long_line = read_suppressions_csv(b"address\n" + b"a" * 2_000_000 + b"@example.com\n", now)
    assert long_line.errors == ["line 2: field larger than field limit (131072)"]
    long_address = read_suppressions_csv(b"address\n" + b"a" * 100_000 + b"@example.com\n", now)
    assert long_address.errors == ["line 2: address: String should have at most 320 characters"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000) | st.text(alphabet='address,rnote"\n\r*@x.:-0129TZ\x00 ', max_size=400).map(str.encode))
def test_csv_reader_takes_any_bytes(data: bytes) -> None:
    found = read_suppressions_csv(b"address,reason,note,expires_at,created_at\n" + data, time.time())
    assert all("\n" not in e for e in found.errors)
    for entry in found.entries:
        assert entry.address == entry.address.strip().lower()
