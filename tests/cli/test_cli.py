"""The `relay` command line as a real process: which stores it refuses, config from the
environment, and a reader that goes away mid-output."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from helpers import pg_database, raw_sql, relay_cli, write_config

from relay.logstore import LogStore
from relay.model import EventView, Imported, NewMessage
from relay.store.migrations import alembic_config

# Every command that reads or changes a store (all but `serve` and `db upgrade`).
STORE_COMMANDS = [
    ("queue",),
    ("queue", "list"),
    ("queue", "retry", "--all"),
    ("queue", "delete", "01KAB0000000000000000000000"),
    ("log", "jane@example.com"),
    ("stats",),
    ("users", "list"),
]


async def relay_env(*args: str, env: dict[str, str], cwd: Path | None = None) -> tuple[int, str, str]:
    """`relay ARGS` with extra environment variables (helpers.relay_cli passes none)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env}, cwd=cwd,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def message(qid: str, rcpt: str, at: float) -> NewMessage:
    return NewMessage(
        queue_id=qid, message_id=f"{qid.lower()}@app.example", mail_from="app@example.com", recipients=(rcpt,),
        subject="Hello", tags=("welcome",), user="app", client_ip="127.0.0.1", received_at=at,
        raw=b"Subject: Hello\r\n\r\nbody\r\n",
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL where no store exists yet: a SQLite path, or an empty PostgreSQL database."""
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            yield f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}"
        else:
            yield await stack.enter_async_context(pg_database())


def config_for(tmp_path: Path, url: str) -> Path:
    return write_config(
        tmp_path / "relay.toml", f'[server]\ndata_dir = "{tmp_path / "data"}"\n[store]\nurl = "{url}"\n'
    )


@pytest.mark.parametrize("args", STORE_COMMANDS, ids=" ".join)
async def test_no_store_is_an_error_and_creates_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    cfg = write_config(tmp_path / "relay.toml", f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    code, out, err = await relay_cli(*args, "--config", str(cfg))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"relay: no store at {tmp_path / 'data' / 'relay.db'} (use --config or RELAY_CONFIG)"]
    assert not (tmp_path / "data").exists()


async def test_no_store_with_the_built_in_defaults_creates_nothing(tmp_path: Path) -> None:
    # no --config, no RELAY_CONFIG: ./relay-data/relay.db in the working directory
    code, _, err = await relay_env("queue", "list", env={}, cwd=tmp_path)
    assert code == 2
    assert err.splitlines() == ["relay: no store at relay-data/relay.db (use --config or RELAY_CONFIG)"]
    assert list(tmp_path.iterdir()) == []
    code, _, err = await relay_env("queue", env={"RELAY_CONFIG": str(config_for(tmp_path, ""))}, cwd=tmp_path)
    assert code == 2
    assert err.splitlines() == [f"relay: no store at {tmp_path / 'data' / 'relay.db'} (use --config or RELAY_CONFIG)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay.toml"]


async def test_an_empty_postgresql_database_is_no_store(tmp_path: Path) -> None:
    async with pg_database() as url:
        code, out, err = await relay_cli("queue", "--config", str(config_for(tmp_path, url)))
        assert (code, out) == (2, "")
        assert err.splitlines() == [f"relay: no store at {url} (use --config or RELAY_CONFIG)"]
        gone = url.rsplit("/", 1)[0] + "/relay_no_such_database"
        code, out, err = await relay_cli("queue", "--config", str(config_for(tmp_path, gone)))
        assert (code, out) == (2, "")
        assert err.splitlines() == [f"relay: no store at {gone} (use --config or RELAY_CONFIG)"]


async def test_an_unreachable_postgresql_is_one_line(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://postgres:secret@127.0.0.1:9/relay"  # discard port: nothing listens
    code, out, err = await relay_cli("queue", "list", "--config", str(config_for(tmp_path, url)))
    assert (code, out) == (1, "")
    (line,) = err.splitlines()
    assert line.startswith("relay: cannot read the store at postgresql+asyncpg://postgres:***@127.0.0.1:9/relay: ")
    assert "secret" not in err
    code, out, err = await relay_cli("db", "upgrade", "--config", str(config_for(tmp_path, url)))
    assert (code, out) == (1, "")
    (line,) = err.splitlines()
    assert line == "relay: cannot open the store: connection refused"
    assert "secret" not in err


async def test_an_older_schema_needs_db_upgrade(tmp_path: Path, store_url: str) -> None:
    cfg = str(config_for(tmp_path, store_url))
    (tmp_path / "data").mkdir()
    await raw_sql(store_url, lambda conn: command.upgrade(alembic_config(conn), "0001"), write=True)
    for args in STORE_COMMANDS:
        code, out, err = await relay_cli(*args, "--config", cfg)
        assert (code, out) == (2, ""), args
        assert err.splitlines() == ['relay: the store needs "relay db upgrade"'], args
    code, out, _ = await relay_cli("db", "upgrade", "--config", cfg)
    assert (code, out) == (0, "schema is up to date\n")
    code, out, err = await relay_cli("queue", "list", "--config", cfg)
    assert (code, out, err) == (0, "", "")


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}"
    cfg = str(config_for(tmp_path, url))
    assert (await relay_cli("db", "upgrade", "--config", cfg))[0] == 0
    await raw_sql(
        url, lambda conn: conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'")), write=True
    )
    code, out, err = await relay_cli("queue", "list", "--config", cfg)
    assert (code, out) == (2, "")
    assert err.splitlines() == ["relay: the store was upgraded by a newer relay: run that version"]


async def test_db_upgrade_creates_the_store(tmp_path: Path, store_url: str) -> None:
    cfg = str(config_for(tmp_path, store_url))
    assert (await relay_cli("db", "upgrade", "--config", cfg))[0] == 0
    code, out, err = await relay_cli("queue", "--config", cfg)
    assert (code, err) == (0, "")
    assert "queued" in out


@pytest.mark.parametrize("args", [("queue",), ("serve",), ("db", "upgrade")], ids=" ".join)
async def test_an_unknown_relay_environment_variable_is_a_config_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    cfg = config_for(tmp_path, "")
    code, out, err = await relay_env(*args, "--config", str(cfg), env={"RELAY_SMTP_LISTN": "127.0.0.1:2525"})
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "relay: config error: RELAY_SMTP_LISTN: unknown environment variable"
        " (expected RELAY_<SECTION>_<KEY> of a known key)"
    ]
    assert not (tmp_path / "data").exists()


async def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}"
    cfg = config_for(tmp_path, url)
    store = await LogStore.open(url)
    try:
        await store.upgrade()
        now = time.time()
        await store.bulk_import(
            [
                Imported(m, "queued", 0, now, None, (EventView(m.received_at, "received", None, {"n": i}),))
                for i in range(2000)
                if (m := message(f"01P{i:05d}", "jane@example.com", now - 2000 + i))
            ]
        )
    finally:
        await store.close()
    relay = f"{shlex.quote(sys.executable)} -m relay"
    for args in ("log jane@example.com --limit 2000", "queue list --limit 2000", "queue list --json --limit 2000"):
        # far more than a pipe buffer (64 KiB): relay is still writing when head exits
        script = f"{relay} {args} --config {shlex.quote(str(cfg))} 2>{tmp_path / 'err'} | head -1"
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", f"set -o pipefail; {script}; echo status=$?",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        lines = out.decode().splitlines()
        assert len(lines) == 2, (args, lines)
        assert lines[1] in ("status=0", "status=141"), args  # 141: like a tool killed by SIGPIPE
        assert (tmp_path / "err").read_text() == "", args
        assert err == b""
