"""The benchmark harness, tiny: 200 messages through `relay serve` into a sink, end to end."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


async def test_bench_smoke(tmp_path: Path) -> None:
    """200 plain messages, then 100 "production" ones (DKIM, VERP, tracking, a webhook endpoint):
    every message delivered, every delivery's webhook received, the production checks passed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--out", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 170)
    assert proc.returncode == 0, out.decode()[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    plain, production = results["scenarios"]
    for scenario in (plain, production):
        relay = scenario["relay"]
        assert relay["e2e_per_s"] > 0
        assert "incomplete" not in relay["extra"], relay
        assert relay["latency_ms_p99"] is not None
    relay = production["relay"]
    assert "CHECKS FAILED" not in relay["extra"], relay["extra"]
    assert "WEBHOOKS MISSING" not in relay["extra"], relay["extra"]
    assert relay["extra"]["checks"]["checked"] == relay["extra"]["checks"]["sent"]
    by_type = relay["extra"]["webhooks"]["by_type"]
    assert by_type["message.delivered"]["count"] >= relay["delivered"]
    assert relay["webhook_lag_ms_p99"] is not None
    text = (tmp_path / "latest.md").read_text()
    assert "| smoke 2KB x 10 sessions |" in text
    assert "| smoke production, SQLite |" in text
    assert "Targets (issue 14)" in text


async def test_bench_cluster_smoke(tmp_path: Path) -> None:
    """bench/cluster.py --smoke: one node on SQLite, two `relay serve` nodes on one PostgreSQL
    database (a database of its own, dropped afterwards), every message delivered."""
    import uuid

    from helpers import POSTGRES_URL

    if not POSTGRES_URL:
        pytest.skip("RELAY_TEST_POSTGRES_URL is not set")
    database = f"relay_bench_smoke_{uuid.uuid4().hex[:10]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "cluster.py"), "--smoke", "--out", str(tmp_path / "cluster.md"),
        "--postgres", POSTGRES_URL, "--database", database,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 170)
    assert proc.returncode == 0, out.decode()[-3000:]
    results = json.loads((tmp_path / "cluster.json").read_text())
    assert [(r["store"], r["nodes"]) for r in results["runs"]] == [("SQLite", 1), ("PostgreSQL", 2)]
    for r in results["runs"]:
        assert r["delivered"] == r["messages"]
        assert r["e2e_per_s"] > 0
    assert r["postgres_cpu_s_per_1000"] is not None
    assert "| PostgreSQL, 2 nodes |" in (tmp_path / "cluster.md").read_text()
