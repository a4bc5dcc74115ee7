"""Losing the database for longer than ``[delivery] lease`` while attempts are in flight, and
stopping Relay while it is down (the rig: helpers.outage)."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

from helpers import ServeProcess, wait_for
from helpers.outage import Load, check_answers, check_log, check_nothing_lost, rig


async def test_outage_longer_than_the_lease_then_a_stop_while_down(tmp_path: Path) -> None:
    """Down for twice the lease while attempts are in flight: their outcomes cannot be written
    before the lease runs out, the process keeps trying (the recipients stay held here), and
    when the database is back each is written once: nothing is delivered twice.

    Then SIGTERM while the database is down and outcomes wait to be written: the process stops
    within its grace periods (it cannot give the leases back; they run out), and a new one,
    once the database is back, delivers what was left. Delivered twice: only the attempts made
    but not written down, each said in the log."""
    async with rig(tmp_path, lease="2s", data_delay=0.5) as r:
        load = Load(r, smtp=2, pause=0.05)
        await wait_for(lambda: sum(a.accepted for a in load.answers) >= 20, timeout=20)
        await load.stop()
        await wait_for(lambda: len(r.sink.messages) >= 2, timeout=20)  # attempts are in flight now
        await asyncio.to_thread(r.pg.stop, "immediate")
        down = time.monotonic()
        await wait_for(lambda: time.monotonic() - down > 4.0)  # twice the lease
        await asyncio.to_thread(r.pg.start)
        figures = await check_nothing_lost(r, load.answers)
        assert not any("the lease runs out" in line for line in r.log)
        check_log(r.log, outages=1)
        print(f"lease 2s, down {time.monotonic() - down:.1f}s: {figures}")

        # -- then stopped while the database is down
        first_round = len(r.sink.rcpts)
        before = load.answers
        load = Load(r, smtp=2, pause=0.05, prefix="b")
        await wait_for(lambda: sum(a.accepted for a in load.answers) >= 20, timeout=20)
        await load.stop()
        await wait_for(lambda: len(r.sink.rcpts) >= first_round + 2, timeout=20)
        await asyncio.to_thread(r.pg.stop, "fast")
        first = r.server
        first.terminate()
        code = await first.wait(30)
        assert code == 0
        assert "Traceback" not in "\n".join(first.log), "\n".join(first.log[-40:])
        await asyncio.to_thread(r.pg.start)
        r.server = await ServeProcess(first.config_path).start()
        check_answers(load.answers)
        figures = await check_nothing_lost(r, [*before, *load.answers], once=False)
        unwritten = sum("could not record the attempt before stopping" in line for line in first.log)
        twice = {a for a, n in collections.Counter(r.sink.rcpts).items() if n > 1}
        assert len(twice) <= unwritten, (twice, unwritten)
        assert twice <= {a.rcpt for a in load.answers}  # none of the first round
        check_log(r.server.log, outages=0)
        print(f"stopped while down: {unwritten} attempts not written; {figures}")
