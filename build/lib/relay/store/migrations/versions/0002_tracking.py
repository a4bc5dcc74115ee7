"""Tracking: each message's tracking choice, and the links its HTML points at.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("track", sa.String(16), nullable=False, server_default=""))
    op.create_table(
        "links",
        sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("ordinal", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("url", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("links")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("track")
