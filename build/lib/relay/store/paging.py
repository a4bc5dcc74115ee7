"""Pages newest first by id, the lists that a number pages on: the access audit, the
suppression audit, cases, webhook deliveries. The statement orders by id descending and takes
a ``limit`` bind; each caller adds its filters first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row


def by_id(
    conn: Connection, stmt: sa.Select[Any], id_column: sa.ColumnElement[int], *, limit: int, before: int | None
) -> tuple[Sequence[Row[Any]], int | None]:
    """At most ``limit`` rows with an id below ``before`` (all, when None), and the id to pass
    as ``before`` for the next page (None: this is the last)."""
    if before is not None:
        stmt = stmt.where(id_column < before)
    rows = conn.execute(stmt, {"limit": limit + 1}).all()
    return rows[:limit], (int(rows[limit - 1].id) if len(rows) > limit else None)
