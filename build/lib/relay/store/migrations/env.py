"""Alembic environment: runs on the connection Relay hands over in ``config.attributes``."""

from __future__ import annotations

from alembic import context

from relay.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `relay db upgrade`")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
