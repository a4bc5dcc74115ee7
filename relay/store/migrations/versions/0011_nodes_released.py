"""Several nodes: when a live node freed a dead node's leases (so that it is done once).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("released_at", sa.Float))


def downgrade() -> None:
    op.drop_column("nodes", "released_at")
