"""Keys for the DKIM tests, made once by Relay's own keygen."""

from __future__ import annotations

import pytest
from dkim_support import Keys

from relay import dkim


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    data = tmp_path_factory.mktemp("dkim-keys")
    return Keys(
        dkim.generate(data, "example.com", "rsa1"),
        dkim.generate(data, "example.com", "ed1", "ed25519-sha256"),
        dkim.generate(data / "other", "example.com", "rsa1"),
    )
