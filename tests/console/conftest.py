"""The fixtures of tests/console live in console_fixtures.py, which its tests import by that unique name
(several test directories have a conftest.py: "from conftest import" would take whichever came first)."""

from console_fixtures import *  # noqa: F403
