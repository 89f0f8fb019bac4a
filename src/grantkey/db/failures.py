"""Database failures as the layers above `db/` see them, without importing psycopg.

`DatabaseError` is any failure the driver or PostgreSQL reported that `db/` did not
translate into grantkey's own errors; code that must survive any failure of a cleanup
(revocation, repair, upgrade) catches `CLEANUP_ERRORS`."""

from __future__ import annotations

import psycopg

from grantkey.errors import DatabaseUnavailable, GrantkeyError

DatabaseError = psycopg.Error
CLEANUP_ERRORS: tuple[type[Exception], ...] = (GrantkeyError, psycopg.Error)


def is_lock_conflict(error: BaseException) -> bool:
    """A lock wait that timed out (it reaches the services as DatabaseUnavailable, as every
    OperationalError does) or "tuple concurrently updated" (an internal error)."""
    cause = error.__cause__ if isinstance(error, DatabaseUnavailable) else error
    return isinstance(cause, psycopg.errors.LockNotAvailable | psycopg.errors.InternalError_)


def is_unique_violation(error: BaseException) -> bool:
    return isinstance(error, psycopg.errors.UniqueViolation)
