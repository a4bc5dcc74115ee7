"""The benchmark harness, tiny: 200 messages through `relay serve` into a sink, end to end."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def test_bench_smoke(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--out", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 170)
    assert proc.returncode == 0, out.decode()[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    (scenario,) = results["scenarios"]
    relay = scenario["relay"]
    assert relay["e2e_per_s"] > 0
    assert "incomplete" not in relay["extra"], relay
    assert relay["latency_ms_p99"] is not None
    assert "| smoke 2KB x 10 sessions |" in (tmp_path / "latest.md").read_text()
