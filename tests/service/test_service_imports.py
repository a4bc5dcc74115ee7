"""relay.service's import rules: it wires the parts together and nothing below it (all but the
command line) imports it; the --processes parent (workers, listeners, signals) stays free of
the heavy modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import relay

PACKAGE = Path(relay.__file__).parent
ABOVE = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}  # the command line calls into the service


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_nothing_below_relay_service_imports_it() -> None:
    below = [p for p in PACKAGE.rglob("*.py") if PACKAGE / "service" not in p.parents and p not in ABOVE]
    assert below
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.split(".")[:2] == ["relay", "service"])
        for p in below
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_processes_parent_stays_light() -> None:
    heavy = ["sqlalchemy", "aiosmtpd", "aiosmtplib", "fastapi", "uvicorn", "prometheus_client", "dns", "asyncio"]
    code = (
        "import sys, relay.service.workers, relay.service.listeners, relay.service.signals\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
