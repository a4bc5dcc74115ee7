"""The fixtures of tests/search live in search_fixtures.py, which its tests import by that unique name
(several test directories have a conftest.py: "from conftest import" would take whichever came first)."""

from search_fixtures import *  # noqa: F403
