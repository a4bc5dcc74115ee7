"""Listening sockets, made before the event loop (and before ``--processes`` forks), and the
checks a start makes before anything runs: every listener bound, the TLS files and the DKIM
keys loadable.

A start that cannot do these fails with one line (``StartError``) and starts nothing.
Kept light (no asyncio, no heavy imports): the ``--processes`` parent runs it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from relay.config import Config
from relay.errors import StartError, one_line
from relay.net import bind

log = logging.getLogger(__name__)


@dataclass
class Sockets:
    """Every listener of one start, bound. ``tracking`` is None when /t/... share ``http``."""

    smtp: list[socket.socket] = field(default_factory=list)
    http: list[socket.socket] = field(default_factory=list)
    tracking: list[socket.socket] | None = None
    bounces: list[socket.socket] = field(default_factory=list)  # [bounces] listen
    smtp_tls: list[socket.socket] = field(default_factory=list)  # [smtp] listen_tls

    def all(self) -> list[socket.socket]:
        return [*self.smtp, *self.smtp_tls, *self.http, *(self.tracking or ()), *self.bounces]

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def prepare(config: Config) -> Sockets:
    """Make data_dir, check the TLS files and bind every listener (SMTP, HTTP, tracking, bounces); on
    any failure close what was bound and raise StartError."""
    make_data_dir(config)
    check_tls(config)
    check_dkim(config)
    sockets = Sockets()
    try:
        sockets.smtp = [bind(listen) for listen in config.smtp.listen]
        sockets.smtp_tls = [bind(listen) for listen in config.smtp.listen_tls]
        sockets.http = [bind(config.http.listen)]
        if config.tracking.listen is not None:
            sockets.tracking = [bind(config.tracking.listen)]
        sockets.bounces = [bind(listen) for listen in config.bounces.listen]
    except StartError:
        sockets.close()
        raise
    return sockets


def make_data_dir(config: Config) -> None:
    """data_dir holds message bodies, password hashes and the tracking secret: 0700."""
    path = config.data_dir
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        # Tighten a directory that is ours; never a shared one such as /tmp (sticky).
        if st.st_uid == os.geteuid() and st.st_mode & 0o077 and not st.st_mode & stat.S_ISVTX:
            path.chmod(0o700)
    except OSError as exc:
        reason = one_line(exc, filename=False)
        raise StartError(f"cannot create the data directory {path}: {reason}") from exc


def check_tls(config: Config) -> None:
    """Load the SMTP certificate and key once, so that a bad file fails the start, not a session."""
    smtp = config.smtp
    if not smtp.tls_enabled:
        return
    for path in (smtp.tls_cert, smtp.tls_key):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            reason = one_line(exc, filename=False)
            raise StartError(f"cannot read the TLS file {path}: {reason}") from exc
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(smtp.tls_cert, smtp.tls_key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise StartError(f"cannot load the TLS certificate {smtp.tls_cert}: {reason}") from exc


def check_dkim(config: Config) -> None:
    """Read every [[dkim]] key once, so that a missing, unreadable or weak key fails the start
    (StartError naming the file) before anything listens."""
    if config.dkim:
        from relay import dkim  # dkimpy and cryptography: only when there are keys

        dkim.load_keys(config)


def warn_if_tracking_loopback(config: Config) -> None:
    """Links pointing at the loopback address reach nobody's Relay but the reader's own machine."""
    if not config.tracking.enabled:
        return
    host = (urlsplit(config.tracking.base_url).hostname or "").rstrip(".").lower()
    loopback = host == "localhost" or host.endswith(".localhost")
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if loopback:
        log.warning(
            "[tracking] base_url %s points at a loopback address: recipients' pixels and links cannot reach it",
            config.tracking.base_url,
        )
