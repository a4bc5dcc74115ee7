"""SMTP AUTH users: name, password hash (made by relay.auth), when added."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from relay.errors import Conflict, NotFound
from relay.store import statements as q


def add(conn: Connection, name: str, password_hash: str, now: float) -> None:
    if conn.scalar(q.USER_EXISTS, {"name": name}) is not None:
        raise Conflict(f"user {name!r} exists already")
    conn.execute(q.INSERT_USER, {"name": name, "password_hash": password_hash, "created_at": now})


def remove(conn: Connection, name: str) -> None:
    if conn.execute(q.DELETE_USER, {"name": name}).rowcount == 0:
        raise NotFound(f"no user {name!r}")


def names(conn: Connection) -> list[tuple[str, float]]:
    return [(r.name, float(r.created_at)) for r in conn.execute(q.LIST_USERS)]


def password_hash(conn: Connection, name: str) -> str | None:
    value = conn.scalar(q.PASSWORD_HASH, {"name": name})
    return None if value is None else str(value)
