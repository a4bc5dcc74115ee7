"""Listening sockets, made before the event loop (and before ``--processes`` forks)."""

from __future__ import annotations

import socket

from relay.config import Listen


def bind(listen: Listen, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket) -> Listen:
    host, port = sock.getsockname()[:2]
    return Listen(host, port)
