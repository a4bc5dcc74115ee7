"""Alembic migrations, run in-process by ``relay db upgrade`` and at ``relay serve`` start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

SchemaState = Literal["missing", "current", "behind", "ahead"]

HERE = Path(__file__).parent


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade_sync(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":  # SQLite: the writer's lock serializes already
        from relay.store.statements import MIGRATION_LOCK

        connection.execute(MIGRATION_LOCK)
    command.upgrade(alembic_config(connection), "head")


def head() -> str:
    """The newest revision this code knows."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


def schema_state(connection: Connection) -> SchemaState:
    """Where the store's schema stands against this code's migrations: "missing" (no
    alembic_version table: an empty database), "current", "behind" (needs ``relay db
    upgrade``) or "ahead" (written by a newer Relay)."""
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        return "missing"
    newest = head()
    if current == newest:
        return "current"
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    return "behind" if current in known else "ahead"
