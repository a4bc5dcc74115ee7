"""One vocabulary: the columns that hold Relay's id are named ``queue_id``.

``messages.id`` and the ``message_id`` columns of bodies, message_tags, recipients, events and
link_chunks become ``queue_id``; ``messages.message_id`` (the Message-ID header) keeps its name.
``ALTER TABLE ... RENAME COLUMN`` on both dialects: no table is copied, and SQLite (3.26+) and
PostgreSQL update the foreign keys that point at the renamed column. Indexes are renamed to
match (SQLite cannot rename an index: it drops and recreates it).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

RENAMED = (  # (table, old column, new column)
    ("messages", "id", "queue_id"),
    ("bodies", "message_id", "queue_id"),
    ("message_tags", "message_id", "queue_id"),
    ("recipients", "message_id", "queue_id"),
    ("events", "message_id", "queue_id"),
    ("link_chunks", "message_id", "queue_id"),
)
INDEXES = (  # (table, old name, new name)
    ("recipients", "ix_recipients_message_id", "ix_recipients_queue_id"),
    ("events", "ix_events_message_id", "ix_events_queue_id"),
)


def _rename(*, up: bool) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, old, new in RENAMED:
        src, dst = (old, new) if up else (new, old)
        op.execute(f'ALTER TABLE {table} RENAME COLUMN "{src}" TO "{dst}"')
    for table, old, new in INDEXES:
        src, dst = (old, new) if up else (new, old)
        if sqlite:
            op.drop_index(src, table_name=table)
            op.create_index(dst, table, ["queue_id" if up else "message_id"])
        else:
            op.execute(f'ALTER INDEX "{src}" RENAME TO "{dst}"')


def upgrade() -> None:
    _rename(up=True)


def downgrade() -> None:
    _rename(up=False)
