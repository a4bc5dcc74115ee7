"""kill -9 at random moments under load: nothing accepted is lost or stuck, and every duplicate
delivery comes from a lease cut by a kill. 3 kills here; `make chaos` runs 50 and prints the report
(CHAOS_KILLS sets the number, CHAOS_REPORT a file to write it to)."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import chaos


async def test_sigkill_at_random_moments_loses_and_strands_nothing(tmp_path: Path) -> None:
    kills = int(os.environ.get("CHAOS_KILLS", "3"))
    report = await chaos.run(tmp_path, kills)
    text = report.text()
    print(text)
    if out := os.environ.get("CHAOS_REPORT"):
        Path(out).write_text(text + "\n")
    assert report.accepted > 0
    assert not report.lost, text
    assert report.stuck == 0, text
    assert not report.unexplained, text
