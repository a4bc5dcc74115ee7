"""The fixtures of tests/console live in tests/helpers/console.py (helpers.console), which its
tests import by that name (several test directories have a conftest.py: "from conftest import"
would take whichever came first)."""

from helpers.console import *  # noqa: F403
