"""Alembic migrations, run in-process by ``relay db upgrade`` and at ``relay serve`` start."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

HERE = Path(__file__).parent


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade_sync(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")
