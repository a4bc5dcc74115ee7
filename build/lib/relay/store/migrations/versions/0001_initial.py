"""The first schema: messages, bodies, tags, recipients (the queue), events (the log), users.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("mail_from", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("tags", Json, nullable=False),
        sa.Column("username", sa.Text),
        sa.Column("client_ip", sa.Text, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_index("ix_messages_message_id", "messages", ["message_id"])
    op.create_index("ix_messages_received_at", "messages", ["received_at"])

    op.create_table(
        "bodies",
        sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )

    op.create_table(
        "message_tags",
        sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.Text, primary_key=True),
    )
    op.create_index("ix_message_tags_tag", "message_tags", ["tag"])

    op.create_table(
        "recipients",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("domain", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float),
        sa.Column("lease_owner", sa.Text),
        sa.Column("last_response", sa.Text),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_recipients_message_id", "recipients", ["message_id"])
    op.create_index("ix_recipients_next_attempt_at", "recipients", ["next_attempt_at"])
    op.create_index("ix_recipients_status", "recipients", ["status"])
    op.create_index("ix_recipients_address_lower", "recipients", [sa.text("lower(address)")])

    op.create_table(
        "events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("recipient", sa.Text),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("details", Json, nullable=False),
    )
    op.create_index("ix_events_message_id", "events", ["message_id"])
    op.create_index("ix_events_type_at", "events", ["type", "at"])

    op.create_table(
        "users",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("users", "events", "recipients", "message_tags", "bodies", "messages"):
        op.drop_table(table)
