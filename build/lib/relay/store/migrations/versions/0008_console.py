"""The console: user roles, sessions, cases and their trail, the access audit, hash chains;
webhook deliveries name their message.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=False, server_default="smtp"))
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("queue_id", sa.String(32)))
    op.create_index("ix_webhook_deliveries_queue_id", "webhook_deliveries", ["queue_id"])
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("seen_at", sa.Float, nullable=False),
        sa.Column("ip", sa.Text, nullable=False),
    )
    op.create_index("ix_console_sessions_username", "console_sessions", ["username"])
    op.create_table(
        "cases",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("customer_ref", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.Text, nullable=False, server_default=""),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("opened_by", sa.Text, nullable=False),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("closed_reason", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_cases_state", "cases", ["state"])
    op.create_index("ix_cases_opened_at", "cases", ["opened_at"])
    op.create_table(
        "case_messages",
        sa.Column("case_id", _BigId, sa.ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("queue_id", sa.String(32), primary_key=True),
    )
    op.create_index("ix_case_messages_queue_id", "case_messages", ["queue_id"])
    op.create_table(
        "case_targets",
        sa.Column("case_id", _BigId, sa.ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("recipient_id", _BigId, primary_key=True),
        sa.Column("queue_id", sa.String(32), nullable=False),
    )
    op.create_index("ix_case_targets_recipient_id", "case_targets", ["recipient_id"])
    op.create_table(
        "case_entries",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("case_id", _BigId, sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("details", _Json, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_case_entries_case_id", "case_entries", ["case_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("ip", sa.Text, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.Text, nullable=False, server_default=""),
        sa.Column("details", _Json, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_table(
        "chain_heads",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("last_id", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("chain_heads", "audit_log", "case_entries", "case_targets", "case_messages", "cases"):
        op.drop_table(table)
    op.drop_table("console_sessions")
    op.drop_index("ix_webhook_deliveries_queue_id", "webhook_deliveries")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("queue_id")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("role")
