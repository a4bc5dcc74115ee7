"""Console sessions: one row per signed-in browser. ``id`` is the SHA-256 of the session token
(the cookie holds the token itself, signed), so a copy of the table signs nobody in. A session
is good while its user still exists with a console role and it was used within the idle
expiry; ``seen_at`` is moved forward at most once a minute, to keep page views from writing."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.model import CONSOLE_ROLES, Role
from relay.store.schema import console_sessions, users

TOUCH_EVERY = 60.0  # seconds: seen_at is written at most this often per session

# A session with its user's current role (a removed user, or one made "smtp", has no session).
_GET = (
    sa.select(
        console_sessions.c.id, console_sessions.c.username, console_sessions.c.csrf, console_sessions.c.created_at,
        console_sessions.c.seen_at, console_sessions.c.ip, users.c.role,
    )
    .join(users, users.c.name == console_sessions.c.username)
    .where(console_sessions.c.id == sa.bindparam("sid"), users.c.role.in_(CONSOLE_ROLES))
)  # fmt: skip
_INSERT = console_sessions.insert()
_TOUCH = (
    console_sessions.update()
    .where(console_sessions.c.id == sa.bindparam("sid"), console_sessions.c.seen_at < sa.bindparam("before"))
    .values(seen_at=sa.bindparam("now"))
)
_DELETE = console_sessions.delete().where(console_sessions.c.id == sa.bindparam("sid"))
_DELETE_IDLE = console_sessions.delete().where(console_sessions.c.seen_at < sa.bindparam("before"))
_DELETE_USER = console_sessions.delete().where(console_sessions.c.username == sa.bindparam("name"))


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    id: str  # SHA-256 of the token, hex
    username: str
    role: Role
    csrf: str
    created_at: float
    seen_at: float
    ip: str


def session_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(conn: Connection, username: str, ip: str, *, idle: float, now: float) -> tuple[str, ConsoleSession]:
    """A new session (and the token for its cookie); sessions idle past ``idle`` are deleted on the way."""
    conn.execute(_DELETE_IDLE, {"before": now - idle})
    token = secrets.token_urlsafe(32)
    row = ConsoleSession(session_id(token), username, "viewer", secrets.token_urlsafe(32), now, now, ip[:100])
    conn.execute(
        _INSERT,
        {"id": row.id, "username": username, "csrf": row.csrf, "created_at": now, "seen_at": now, "ip": row.ip},
    )
    return token, row


def get(conn: Connection, token: str, *, idle: float, now: float) -> ConsoleSession | None:
    """The session of ``token``, unless it is unknown, idle too long, or its user cannot sign in."""
    r = conn.execute(_GET, {"sid": session_id(token)}).first()
    if r is None or float(r.seen_at) + idle <= now:
        return None
    return ConsoleSession(r.id, r.username, r.role, r.csrf, float(r.created_at), float(r.seen_at), r.ip)


def touch(conn: Connection, sid: str, now: float) -> bool:
    return conn.execute(_TOUCH, {"sid": sid, "before": now - TOUCH_EVERY, "now": now}).rowcount > 0


def delete(conn: Connection, sid: str) -> bool:
    return conn.execute(_DELETE, {"sid": sid}).rowcount > 0


def delete_user(conn: Connection, name: str) -> int:
    """Sign a user out everywhere (a removed user, a changed role)."""
    return int(conn.execute(_DELETE_USER, {"name": name}).rowcount)
