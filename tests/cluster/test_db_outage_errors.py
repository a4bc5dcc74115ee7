"""The one error mapping tells a lost database (StoreUnavailable: try again) from a failed
operation (StoreError), for every way asyncpg and SQLAlchemy say the server went away, and the
store logs an outage once, not once per failed operation."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from relay.errors import NotFound, StoreError, StoreUnavailable
from relay.store.engine import READ_FAILED, WRITE_FAILED, Availability, store_error


class DriverError(Exception):
    """What SQLAlchemy's asyncpg adapter puts in ``orig``: the SQLSTATE as ``sqlstate``."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def dbapi(sqlstate: str | None, message: str = "boom", *, invalidated: bool = False) -> DBAPIError:
    return DBAPIError("SELECT 1", {}, DriverError(message, sqlstate), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),  # the server is down
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),  # a connect that never answered
        dbapi("57P03", "the database system is starting up"),  # CannotConnectNowError
        dbapi("57P03", "the database system is shutting down"),
        dbapi("57P01", "terminating connection due to administrator command"),  # AdminShutdown
        dbapi("57P02", "terminating connection because of crash of another server process"),
        dbapi("08003", "connection was closed in the middle of operation"),  # ConnectionDoesNotExistError
        dbapi("08006", "connection failure"),
        dbapi(None, "connection is closed", invalidated=True),  # SQLAlchemy saw a disconnect
    ],
    ids=lambda e: type(e).__name__ + ":" + str(getattr(getattr(e, "orig", None), "sqlstate", "")),
)
def test_a_lost_database_is_unavailable(exc: BaseException) -> None:
    err = store_error(exc, WRITE_FAILED)
    assert isinstance(err, StoreUnavailable)
    assert err.__cause__ is exc
    assert "\n" not in str(err)  # one line, the driver's words, no SQL


@pytest.mark.parametrize(
    "exc",
    [
        IntegrityError("INSERT", {}, DriverError("duplicate key", "23505")),
        OperationalError("SELECT", {}, DriverError("database is locked", None)),  # SQLite, busy
        dbapi("42P01", 'relation "messages" does not exist'),
    ],
)
def test_a_failed_operation_is_not_an_outage(exc: BaseException) -> None:
    err = store_error(exc, READ_FAILED)
    assert type(err) is StoreError


def test_expected_and_foreign_errors_pass_through() -> None:
    for exc in (NotFound("no such message"), ValueError("a bug")):
        assert store_error(exc, WRITE_FAILED) is exc


def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    availability = Availability()
    caplog.set_level(logging.INFO, logger="relay.store.engine")
    availability.saw(StoreUnavailable("cannot open the store: connection refused"))  # never reached: the start fails
    availability.ok()  # nothing was lost: nothing to say
    for _ in range(50):
        availability.saw(StoreUnavailable("store operation failed: connection refused"))
    availability.saw(StoreError("store operation failed: IntegrityError"))  # not an outage
    availability.ok()
    availability.ok()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0][0] == "WARNING"
    assert "the database cannot be reached (store operation failed: connection refused)" in lines[0][1]
    assert lines[1][0] == "INFO"
    assert "the database is back after" in lines[1][1]
    assert "50 operations failed meanwhile" in lines[1][1]
