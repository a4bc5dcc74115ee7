"""The HTTP side: FastAPI apps on uvicorn, in Relay's own event loop.

- ``app``: the private app (metrics, health, the API and its offline docs), the public app
  (tracking hits), and the uvicorn server that runs them (HttpContext, HttpServer, create_app).
- ``api``: the JSON API under /api/v1.
- ``send``: POST /api/v1/messages, sending over HTTP (``relay.compose`` builds the message).
- ``schemas``: the JSON shapes, once: the pydantic models of the OpenAPI document and the
  functions that build them from relay.model records.

Import rule: only relay.http imports fastapi, uvicorn and pydantic. One exception, for the JSON
shape only: the CLI imports relay.http.schemas (pydantic, not FastAPI), so that ``relay log
--json`` and ``relay stats --json`` print exactly what the API returns. That is why the names
below load relay.http.app lazily: importing relay.http.schemas does not pay for FastAPI and
uvicorn."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.http.app import HttpContext, HttpServer, create_app

__all__ = ["HttpContext", "HttpServer", "create_app"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from relay.http import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
