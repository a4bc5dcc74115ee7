"""Webhook claims: due deliveries of one endpoint in due order, from an index.

With (status, url) alone the database sorted every pending delivery of the endpoint, bodies
included, at each claim: a backlog of thousands made each claim read them all.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "url", "next_attempt_at"])
    op.drop_index("ix_webhook_deliveries_status_url", table_name="webhook_deliveries")


def downgrade() -> None:
    op.create_index("ix_webhook_deliveries_status_url", "webhook_deliveries", ["status", "url"])
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
