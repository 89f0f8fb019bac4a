"""The one error hierarchy. Every layer raises these; `http.errors` renders them.

Each class carries the HTTP status it answers with (`status`) and what a client may read
of it (`public_message()`: never a server detail); each API family gives those its own
shape. A class without its own status is a 500 with "Internal error"."""

from __future__ import annotations

from datetime import UTC, datetime

TIMEOUT_MESSAGE = (
    "You are over platform's limits: SQL query timeout error. Refactor your query before "
    "running again or contact your administrator for more details."
)


class GrantkeyError(Exception):
    """Base of every error grantkey raises on purpose. `hint`: what the caller may do about
    it, shown beside the message (the data APIs' `hint`)."""

    status = 500
    hint: str | None = None

    def public_message(self) -> str:
        return "Internal error"

    def headers(self) -> dict[str, str]:
        """Headers the answer carries (a rate limit's)."""
        return {}


class _Stated(GrantkeyError):
    """An error whose own message is safe to show (it says what the caller did wrong)."""

    def public_message(self) -> str:
        return str(self)


class BadInput(_Stated):
    """The caller sent something malformed (HTTP 400, CLI exit 2)."""

    status = 400


class PayloadTooLarge(BadInput):
    status = 413


class InvalidUsername(BadInput):
    pass


class BadListParameter(BadInput):
    """A wrong `page`, `per_page`, `order`, `order_direction` or `type` on a list."""


class ValidationFailed(_Stated):
    """A key could not be created: CARTO's 422 with its list of messages."""

    status = 422

    def __init__(self, messages: list[str]) -> None:
        super().__init__("Validation failed: " + ", ".join(messages))
        self.messages = messages


class Unauthorized(GrantkeyError):
    """No valid credential for this request (which one is never said)."""

    status = 401

    def public_message(self) -> str:
        return "Unauthorized"


class KeyExpired(Unauthorized):
    """The token is a key's, but the key expired: its holder learns that much (a `hint`),
    which says nothing a stranger could use."""

    def __init__(self, name: str, expires_at: datetime | None) -> None:
        super().__init__(f"key {name} expired")
        moment = "" if expires_at is None else " at " + expires_at.astimezone(UTC).isoformat()
        self.hint = (f'key "{name[:100]}" expired{moment}; keys cannot be extended: create '
                     "a new one")


class BasicUserMismatch(Unauthorized):
    """Basic auth named another user than the one the URL targets."""

    status = 403

    def public_message(self) -> str:
        return "permission denied"


class Forbidden(_Stated):
    """The credential is valid but may not do this."""

    status = 403

    def public_message(self) -> str:
        return str(self) or "forbidden"


class QuotaReached(Forbidden):
    pass


class LimitReached(_Stated):
    """A per-user limit on things a client makes (CARTO's 409 for named maps)."""

    status = 409


class NotFound(_Stated):
    status = 404


class UserNotFound(NotFound):
    def __init__(self, username: str) -> None:
        super().__init__(username)
        self.username = username

    def public_message(self) -> str:
        return (f"Sorry, we can't find grantkey user '{self.username[:100]}'. "
                "Please check that you have entered the correct domain.")


class KeyNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def public_message(self) -> str:
        return f"API key not found: {self.name}"


class UserExists(_Stated):
    def __init__(self, username: str) -> None:
        super().__init__(f"user '{username}' already exists")
        self.username = username

    status = 409


class DatabaseUnavailable(GrantkeyError):
    """PostgreSQL could not be reached or answered with a server-side fault."""

    status = 503

    def public_message(self) -> str:
        return "The database is unavailable; try again shortly."


class QueryInterrupted(DatabaseUnavailable):
    """The database session ended under a query, which may or may not have run: its
    message is safe to show (it names no server detail)."""

    MESSAGE = ("The database session ended during the query; it may or may not have run. "
               "Check before running it again.")

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)

    def public_message(self) -> str:
        return self.MESSAGE


class SetupError(GrantkeyError):
    """The server cannot start: bad settings, unusable data directory, no PostgreSQL."""


class TenantCodeInTheWay(SetupError):
    """PostGIS was not installed into a database whose `public` holds functions or
    operators its tenant made: its install script, run as the superuser, could call them
    (logged by the start-up upgrade, which retries at the next start)."""


class SqlError(_Stated):
    """A client query failed: CARTO's `{"error": [...]}` plus hint, detail, context."""

    def __init__(self, status: int, message: str, *, hint: str | None = None,
                 detail: str | None = None, context: str | None = None) -> None:
        super().__init__(message)
        self.status = status  # from the SQLSTATE (db/sql_errors.py)
        self.message = message
        self.hint = hint
        self.detail = detail
        self.context = context


class PoolExhausted(_Stated):
    """No database connection became free in time: the server is at its connection cap."""

    status = 429


class RateLimited(_Stated):
    """Over a rate limit (carto-compat §11): CARTO's message, context and detail, its four
    headers, and a hint naming the limit."""

    status = 429
    MESSAGE = "You are over platform's limits. Please contact us to know more details"
    context = "limit"
    detail = "rate-limit"

    def __init__(self, headers: dict[str, str], hint: str) -> None:
        super().__init__(self.MESSAGE)
        self._headers = headers
        self.hint = hint

    def headers(self) -> dict[str, str]:
        return self._headers


class LoginRefused(GrantkeyError):
    """PostgreSQL refused a key role's login (its role was dropped or its password changed)."""


class LayerFailed(SqlError):
    """A Maps API layer's SQL failed when the map was made: the error names the layer."""

    def __init__(self, error: SqlError, index: int, layer_id: str | None) -> None:
        super().__init__(error.status, error.message, hint=error.hint, detail=error.detail,
                         context=error.context)
        self.index = index
        self.layer_id = layer_id


class JobNotFound(NotFound):
    """A batch job id that is unknown, or a job the caller may not see (another key's)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job with id {job_id[:64]} not found")


class LayergroupNotFound(NotFound):
    """A Maps API layergroup id that is unknown (or expired): CARTO's message."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.token = token

    def public_message(self) -> str:
        return f"Invalid or nonexistent map configuration token '{self.token[:100]}'"
