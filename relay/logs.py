"""Log records carry the ids of what they are about.

Code that works on a message sets ``context.set("queue_id=... rcpt=...")`` (or uses
``with_ids``); every record emitted meanwhile, from any module, shows those ids.

A record is one line whatever peers send: control characters in its text (a client's
envelope, a remote server's reply) are written as ``\\xNN``, so nobody can forge a log line
with CR/LF or drive a terminal with escape sequences. Tracebacks keep their lines.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

context: contextvars.ContextVar[str] = contextvars.ContextVar("relay_log_ids", default="")


@contextmanager
def with_ids(**ids: object) -> Iterator[None]:
    token = context.set(" ".join(f"{k}={v}" for k, v in ids.items() if v is not None))
    try:
        yield
    finally:
        context.reset(token)


# C0 controls, DEL and C1 controls -> \\xNN (one table, built once)
_ESCAPE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


class _OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPE)


class _IdsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = context.get()
        record.ids = f" [{ids}]" if ids else ""
        return True


def setup(level: int = logging.INFO) -> None:
    # Records do not need the caller's file and line, thread or process: skip the work
    # (the "Optimization" section of the logging documentation).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_IdsFilter())
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(ids)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    logging.getLogger("flufl.bounce").setLevel(
        logging.CRITICAL
    )  # a line per detector per report, and tracebacks we catch
