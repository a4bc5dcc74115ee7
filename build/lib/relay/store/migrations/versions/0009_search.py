"""Search (relay.search's grammar): indexes for from:, user: and domain: terms.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_messages_mail_from_lower", "messages", [sa.text("lower(mail_from)")])
    op.create_index("ix_messages_username", "messages", ["username"])
    op.create_index("ix_recipients_domain", "recipients", ["domain"])


def downgrade() -> None:
    op.drop_index("ix_recipients_domain", "recipients")
    op.drop_index("ix_messages_username", "messages")
    op.drop_index("ix_messages_mail_from_lower", "messages")
