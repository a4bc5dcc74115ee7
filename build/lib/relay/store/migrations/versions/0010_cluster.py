"""Several nodes on one store: the nodes table (heartbeats); an index for retention's purge of
finished webhook deliveries.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
        sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
        sa.Column("stopped_at", sa.Float),
    )
    op.create_index("ix_webhook_deliveries_updated_at", "webhook_deliveries", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_updated_at", "webhook_deliveries")
    op.drop_table("nodes")
