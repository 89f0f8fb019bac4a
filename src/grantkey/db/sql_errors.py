"""The one place PostgreSQL errors from client SQL become SQL API errors (by SQLSTATE)."""

from __future__ import annotations

import psycopg

from grantkey.db.pg_wire import CopyRefused
from grantkey.db.sql_exec import QueryTimedOut
from grantkey.errors import TIMEOUT_MESSAGE, SqlError

INSUFFICIENT_PRIVILEGE = "42501"


def translate(error: BaseException) -> SqlError:
    if isinstance(error, QueryTimedOut | psycopg.errors.QueryCanceled):
        return SqlError(429, TIMEOUT_MESSAGE)
    if isinstance(error, CopyRefused):
        return SqlError(400, str(error))
    if isinstance(error, psycopg.Error):
        diag = error.diag
        message = diag.message_primary or str(error).strip() or type(error).__name__
        # CARTO's rule (carto-compat.md §5): 403 for "permission denied"; other refusals
        # ("must be owner of table t", also SQLSTATE 42501) stay 400. Read from the SQLSTATE
        # too, so that the words inside a value (`SELECT 'permission denied'::int`) are 400.
        denied = error.sqlstate == INSUFFICIENT_PRIVILEGE and "permission denied" in message
        status = 403 if denied else 400
        return SqlError(status, message, hint=diag.message_hint, detail=diag.message_detail,
                        context=diag.context)
    return SqlError(400, str(error))


def connection_lost(error: BaseException) -> bool:
    """The session itself ended (terminated, server gone), not the statement: an admin or
    crash shutdown, a connection exception (SQLSTATE class 08), or libpq's own report of a
    closed connection (no SQLSTATE). Resource limits (class 53, e.g. temp_file_limit) and
    other OperationalErrors are the statement's, as is a protocol violation of severity
    ERROR (bind parameters that do not fit the statement: the session goes on)."""
    if isinstance(error, psycopg.errors.AdminShutdown | psycopg.errors.CrashShutdown):
        return True
    if (isinstance(error, psycopg.errors.ProtocolViolation)
            and error.diag.severity_nonlocalized == "ERROR"):
        return False
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = error.sqlstate
    return state is None or state.startswith("08")
