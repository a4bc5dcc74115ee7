"""The cases tests' fixtures: a fresh, migrated store on SQLite and on PostgreSQL."""

from __future__ import annotations

from helpers import stores

store, url = stores.store, stores.url
