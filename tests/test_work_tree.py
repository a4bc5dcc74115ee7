"""What `make test` writes stays out of git and out of the Docker image: caches, the local
store, the virtualenv and benchmark scratch are ignored, and none of them is tracked."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the tests, the linters and `make run` leave behind in the work tree.
WRITTEN = [
    ".hypothesis/examples/x",
    ".schemathesis/default/cache/x.json",
    ".pytest_cache/v/cache/nodeids",
    ".mypy_cache/3.11/x.json",
    ".ruff_cache/x",
    "relay/__pycache__/cli.cpython-311.pyc",
    "tests/__pycache__/helpers.cpython-311.pyc",
    "relay.egg-info/PKG-INFO",
    "bench/work/smoke/x.json",
    "relay-data/relay.db",
    ".venv/bin/python",
]
DOCKER_KEEPS_OUT = [".git", ".venv", "relay-data", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
                    ".schemathesis", "bench/work", "**/__pycache__"]  # fmt: skip


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)


@pytest.fixture
def git_tree() -> None:
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git work tree")


@pytest.mark.usefixtures("git_tree")
def test_what_the_tests_write_is_ignored_and_untracked() -> None:
    for path in WRITTEN:
        assert _git("check-ignore", "-q", "--no-index", path).returncode == 0, f"{path} is not ignored"
    tracked = _git("ls-files").stdout.splitlines()
    dirs = {p.split("/", 1)[0] for p in WRITTEN if not p.startswith(("relay/", "tests/", "bench/"))}
    assert not [p for p in tracked if p.split("/", 1)[0] in dirs or "/__pycache__/" in f"/{p}"]
    assert not [p for p in tracked if p.startswith("bench/work/")]


def test_dockerignore_keeps_the_store_the_venv_and_caches_out() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")}
    assert not [p for p in DOCKER_KEEPS_OUT if p not in patterns]
