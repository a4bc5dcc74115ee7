"""Users: name, password hash (made by relay.auth), role, when added. Role "smtp" sends mail
(SMTP AUTH, the send API's users); "viewer", "support" and "admin" sign in to the console. A
password check names the roles it accepts, so neither kind can pass for the other."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy.engine import Connection

from relay.errors import Conflict, NotFound
from relay.model import Role, User
from relay.store import statements as q


def add(conn: Connection, name: str, password_hash: str, now: float, role: Role = "smtp") -> None:
    if conn.scalar(q.USER_EXISTS, {"name": name}) is not None:
        raise Conflict(f"user {name!r} exists already")
    conn.execute(q.INSERT_USER, {"name": name, "password_hash": password_hash, "created_at": now, "role": role})


def remove(conn: Connection, name: str) -> None:
    if conn.execute(q.DELETE_USER, {"name": name}).rowcount == 0:
        raise NotFound(f"no user {name!r}")


def all_users(conn: Connection) -> list[User]:
    return [User(r.name, r.role, float(r.created_at)) for r in conn.execute(q.LIST_USERS)]


def password_hash(conn: Connection, name: str, roles: Collection[Role]) -> str | None:
    value = conn.scalar(q.PASSWORD_HASH, {"name": name, "roles": list(roles)})
    return None if value is None else str(value)


def role(conn: Connection, name: str) -> Role | None:
    value = conn.scalar(q.USER_ROLE, {"name": name})
    return None if value is None else value
