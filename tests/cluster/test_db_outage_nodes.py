"""Two nodes on one database that goes away for longer than three heartbeats (when a node
counts as dead) but not as long as the lease: when it is back, neither node may take the
other for dead for a silence that was the database's, so nothing is delivered twice, and both
nodes go on (the rig: helpers.outage)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from helpers import ServeProcess, wait_for
from helpers.outage import Load, check_answers, check_log, check_nothing_lost, rig


async def test_two_nodes_and_an_outage_longer_than_three_heartbeats(tmp_path: Path) -> None:
    async with rig(tmp_path, lease="20s", data_delay=0.3, extra='[cluster]\nheartbeat = "1s"\n') as r:
        second = await ServeProcess(r.server.config_path).start()
        try:
            # mail taken on each node: each claims its own at once (the other's NOTIFY comes later)
            loads = [Load(r, smtp=2, pause=0.02), Load(r, smtp=2, pause=0.02, prefix="b", port=second.smtp_port)]
            await wait_for(lambda: all(sum(a.accepted for a in ld.answers) >= 20 for ld in loads), timeout=30)
            for ld in loads:
                await ld.stop()
            answers = loads[0].answers + loads[1].answers
            await wait_for(lambda: len(r.sink.messages) >= 2, timeout=20)  # attempts in flight on both nodes
            await asyncio.to_thread(r.pg.stop, "fast")
            down = time.monotonic()
            await wait_for(lambda: time.monotonic() - down > 5.0)  # five heartbeats, a quarter of the lease
            await asyncio.to_thread(r.pg.start)
            check_answers(answers)
            figures = await check_nothing_lost(r, answers)
            assert second.proc is not None
            assert second.proc.returncode is None, "\n".join(second.log[-30:])
            check_log(r.log, outages=1)
            check_log(second.log)
            assert any("status=delivered" in line for line in second.log)  # both nodes were delivering
            print(f"two nodes, down {time.monotonic() - down:.1f}s: {figures}")
        finally:
            second.terminate()
            with contextlib.suppress(TimeoutError):
                await second.wait(30)
