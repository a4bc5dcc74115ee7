"""`relay queue release|discard ID` and what `relay queue retry` says about held mail,
through the real CLI (on SQLite: the store's side runs on both backends in test_hold_store)."""

from __future__ import annotations

from pathlib import Path

from action_fixtures import audit_lines, hold_all, message, open_store, states
from helpers import NOWHERE, relay_cli, write_config


async def test_release_and_discard_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}"
    store = await open_store(url, delivery=hold_all())
    try:
        await store.enqueue(message("01CLIHOLD1", ("a@example.com",)))
        await store.enqueue(message("01CLIHOLD2", ("b@example.com",)))
    finally:
        await store.close()
    config = write_config(
        tmp_path / "relay.toml",
        f'[server]\nhostname = "relay.test"\ndata_dir = "{tmp_path / "data"}"\n[store]\nurl = "{url}"\n{NOWHERE}',
    )

    async def cli(*args: str) -> tuple[int, str, str]:
        return await relay_cli(*args, "--config", str(config))

    code, out, err = await cli("queue", "retry", "01CLIHOLD1")
    assert code == 0, err
    assert "0 recipient(s) due now" in out
    assert "relay queue release 01CLIHOLD1" in out  # retry leaves held mail held, and says so
    code, out, err = await cli("queue", "release", "01CLIHOLD1")
    assert (code, out.strip()) == (0, "1 recipient(s) due now"), err
    code, out, err = await cli("queue", "discard", "01CLIHOLD2")
    assert (code, out.strip()) == (0, "1 recipient(s) discarded"), err
    code, _, err = await cli("queue", "discard", "01NOSUCH")
    assert code != 0
    assert "no message 01NOSUCH" in err
    got = {q: s for (q, _), (s, _) in (await states(url)).items()}
    assert got == {"01CLIHOLD1": "queued", "01CLIHOLD2": "cancelled"}
    store = await open_store(url)
    try:
        lines = [(x.action, x.actor) for x in reversed(await audit_lines(store))]
    finally:
        await store.close()
    assert lines == [("action.retry", "cli"), ("action.release", "cli"), ("action.discard", "cli")]
