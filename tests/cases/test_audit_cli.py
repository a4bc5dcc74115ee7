"""`relay audit` and `relay audit verify` as a user runs them (a subprocess), on SQLite and
PostgreSQL: lines newest first with filters, "ok: ..." and exit 0, "broken: ..." and exit 1
after an entry is altered directly in the database; `relay cases list`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import raw_sql, relay_cli, write_config

from relay.logstore import LogStore


async def _config(store: LogStore, url: str, tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "relay.toml",
        f'[server]\nhostname = "relay.test"\ndata_dir = "{tmp_path / "data"}"\n[store]\nurl = "{url}"\n',
    )


async def test_verify_detects_an_altered_entry(store: LogStore, url: str, tmp_path: Path) -> None:
    config = await _config(store, url, tmp_path)
    await store.audit(actor="ann", ip="192.0.2.1", action="signin")
    await store.audit(actor="ann", ip="192.0.2.1", action="view_body", target="01HQ", details={"part": "html"})
    case = await store.open_case(title="Invoice", actor="ann", incident="bounced")
    await store.add_case_entry(case.id, "resolution", {"summary": "fixed"}, actor="ann")

    code, out, err = await relay_cli("--config", str(config), "audit", "verify")
    assert code == 0, err
    m = re.fullmatch(r"ok: 5 audit entries, 2 case entries; heads audit=([0-9a-f]{64}) cases=([0-9a-f]{64})\n", out)
    assert m, out
    report = await store.verify_chains()
    assert (m.group(1), m.group(2)) == (report.heads["audit"], report.heads["cases"])

    code, out, _ = await relay_cli("--config", str(config), "audit", "verify", "--json")
    assert json.loads(out)["ok"] is True

    await raw_sql(url, lambda c: c.execute(sa.text("UPDATE audit_log SET target = '01HX' WHERE id = 2")), write=True)
    code, out, _ = await relay_cli("--config", str(config), "audit", "verify")
    assert code == 1
    assert out.startswith("broken: audit entry 2: hash mismatch")

    await raw_sql(url, lambda c: c.execute(sa.text("UPDATE audit_log SET target = '01HQ' WHERE id = 2")), write=True)
    await raw_sql(
        url, lambda c: c.execute(sa.text("UPDATE case_entries SET kind = 'confirmation' WHERE id = 2")), write=True
    )
    code, out, _ = await relay_cli("--config", str(config), "audit", "verify")
    assert code == 1
    assert out.startswith("broken: cases entry 2: ")


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)  # the store's side runs on both in test_chain
async def test_audit_lists_newest_first_and_cases_list(store: LogStore, url: str, tmp_path: Path) -> None:
    config = await _config(store, url, tmp_path)
    for who in ("ann", "bob", "ann"):
        await store.audit(actor=who, ip="192.0.2.1", action="signin")
    await store.audit(actor="bob", ip="192.0.2.2", action="view_body", target="Q1\x1b[2J", details={"x": 1})
    code, out, err = await relay_cli("--config", str(config), "audit")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4
    assert "view_body" in lines[0]
    assert "\x1b" not in out  # a control character cannot drive the terminal
    code, out, _ = await relay_cli("--config", str(config), "audit", "--actor", "ann", "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [3, 1]
    code, out, err = await relay_cli("--config", str(config), "audit", "--action", "signin", "--limit", "1")
    assert len(out.splitlines()) == 1
    assert "use --limit for more" in err

    await store.open_case(title="Invoice", owner="sam", customer_ref="T-1", actor="ann")
    code, out, err = await relay_cli("--config", str(config), "cases", "list")
    assert code == 0, err
    assert "Invoice" in out
    assert "open" in out
    code, out, _ = await relay_cli("--config", str(config), "cases", "list", "--state", "confirmed", "--json")
    assert json.loads(out) == []
