"""The house rules, checked: each library is imported by the rooms that own it and nowhere else,
each package says its import rule, and no test reaches into a private attribute."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "relay"

# library -> the modules (or packages, ending in "/") of relay/ that may import it
OWNERS = {
    "aiosmtpd": {"smtp_in.py"},
    "aiosmtplib": {"transport.py"},
    "dns": {"mx.py"},
    "sqlalchemy": {"logstore.py", "store/"},
    "alembic": {"store/"},
    "fastapi": {"http/", "console/"},
    "uvicorn": {"http/"},
    "pydantic": {"http/"},
    "jinja2": {"console/"},
    "prometheus_client": {"metrics.py"},
    "flufl": {"bounces/reports.py"},
    "dkim": {"dkim.py"},
    "cryptography": {"dkim.py"},
    "nacl": {"dkim.py"},
    "httpx": {"webhooks.py"},
}


def _imports(path: Path) -> set[str]:
    """Top-level names of the modules a file imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_each_library_is_imported_only_by_its_room() -> None:
    wrong = []
    for path in sorted(RELAY.rglob("*.py")):
        rel = path.relative_to(RELAY).as_posix()
        for lib in _imports(path) & OWNERS.keys():
            if not any(rel == owner or (owner.endswith("/") and rel.startswith(owner)) for owner in OWNERS[lib]):
                wrong.append(f"relay/{rel} imports {lib}")
    assert not wrong


def test_each_package_states_its_import_rule() -> None:
    for init in sorted(RELAY.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init.relative_to(ROOT)} does not state its import rule"


def test_no_test_reaches_into_a_private_attribute() -> None:
    private = re.compile(r"\b(?!self\b|cls\b)[A-Za-z_]\w*\._[a-z]\w*")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line.split("#", 1)[0])
    ]
    assert not found
