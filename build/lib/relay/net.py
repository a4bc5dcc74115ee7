"""Listening sockets: bind a ``Listen`` address, and read back where a socket is bound.

Below relay.service (which binds every listener before a start) and beside smtp_in (which
binds its own when given none); light, no asyncio.
"""

from __future__ import annotations

import socket

from relay.config import Listen
from relay.errors import StartError, one_line


def bind(listen: Listen) -> socket.socket:
    """A listening, non-blocking socket on ``listen``; StartError (one line) when it cannot be had."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise StartError(f"cannot listen on {listen}: {one_line(exc)}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot listen on {listen}: {one_line(exc)}") from exc
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket) -> Listen:
    host, port = sock.getsockname()[:2]
    return Listen(host, port)
