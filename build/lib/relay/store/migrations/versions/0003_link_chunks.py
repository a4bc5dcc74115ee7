"""Link chunks: a message's trackable links stored 256 to a row, not one row per link.

Link ordinal n is element n % 256 of the JSON array ``urls`` in chunk n // 256. The rows of
``links`` are copied over in pages (keyset, by message and ordinal), then ``links`` goes;
the downgrade copies them back the same way.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.engine import Connection

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

CHUNK = 256  # links per link_chunks row (relay.store.schema.LINK_CHUNK when this was written)
PAGE = 20_000  # links read per statement while copying

links = sa.table(
    "links", sa.column("message_id", sa.String), sa.column("ordinal", sa.Integer), sa.column("url", sa.Text)
)
link_chunks = sa.table(
    "link_chunks", sa.column("message_id", sa.String), sa.column("chunk", sa.Integer), sa.column("urls", sa.JSON)
)


def _pages(
    conn: Connection, table: Any, key: tuple[str, str], column: str, size: int
) -> Iterator[list[tuple[Any, ...]]]:
    """All rows of table in key order, size at a time (keyset: no server-side cursor needed)."""
    first, second = table.c[key[0]], table.c[key[1]]
    stmt = sa.select(first, second, table.c[column]).order_by(first, second).limit(size)
    after: tuple[Any, Any] | None = None
    while True:
        page_stmt = stmt if after is None else stmt.where(sa.tuple_(first, second) > sa.tuple_(*after))
        rows = [tuple(row) for row in conn.execute(page_stmt)]
        if not rows:
            return
        yield rows
        after = (rows[-1][0], rows[-1][1])


def _link_chunks_table() -> None:
    op.create_table(
        "link_chunks",
        sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("urls", sa.JSON, nullable=False),
    )


def _links_table() -> None:
    op.create_table(
        "links",
        sa.Column("message_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("ordinal", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("url", sa.Text, nullable=False),
    )


def upgrade() -> None:
    _link_chunks_table()
    conn = op.get_bind()
    current: tuple[str, int] | None = None  # (message_id, chunk) being filled
    urls: list[str | None] = []
    for page in _pages(conn, links, ("message_id", "ordinal"), "url", PAGE):
        out: list[dict[str, Any]] = []
        for message_id, ordinal, url in page:
            chunk, index = divmod(ordinal, CHUNK)
            if (message_id, chunk) != current:
                if current is not None:
                    out.append({"message_id": current[0], "chunk": current[1], "urls": urls})
                current, urls = (message_id, chunk), []
            urls.extend([None] * (index - len(urls)))  # a gap in the ordinals stays unresolvable
            urls.append(url)
        if out:
            conn.execute(link_chunks.insert(), out)
    if current is not None:
        conn.execute(link_chunks.insert(), [{"message_id": current[0], "chunk": current[1], "urls": urls}])
    op.drop_table("links")


def downgrade() -> None:
    _links_table()
    conn = op.get_bind()
    for page in _pages(conn, link_chunks, ("message_id", "chunk"), "urls", PAGE // CHUNK):
        out = [
            {"message_id": message_id, "ordinal": chunk * CHUNK + index, "url": url}
            for message_id, chunk, urls in page
            for index, url in enumerate(urls)
            if url is not None
        ]
        if out:
            conn.execute(links.insert(), out)
    op.drop_table("link_chunks")
