"""Bounces and suppression: the suppression list, its audit trail, and the raw reports that
came to the bounce listener.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("address", sa.Text, primary_key=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("source_queue_id", sa.String(32)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_suppressions_reason", "suppressions", ["reason"])
    op.create_index("ix_suppressions_created_at", "suppressions", ["created_at"])
    op.create_table(
        "suppression_audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("source_queue_id", sa.String(32)),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_suppression_audit_address", "suppression_audit", ["address"])
    op.create_table(
        "bounce_reports",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE")),
        sa.Column("recipient", sa.Text),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("mail_from", sa.Text, nullable=False),
        sa.Column("client_ip", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_bounce_reports_queue_id", "bounce_reports", ["queue_id"])
    op.create_index("ix_bounce_reports_received_at", "bounce_reports", ["received_at"])


def downgrade() -> None:
    op.drop_table("bounce_reports")
    op.drop_table("suppression_audit")
    op.drop_table("suppressions")
