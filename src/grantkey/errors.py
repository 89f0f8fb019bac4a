"""The one error hierarchy. Every layer raises these; `http.errors` renders them."""

from __future__ import annotations


class GrantkeyError(Exception):
    """Base of every error grantkey raises on purpose."""


class BadInput(GrantkeyError):
    """The caller sent something malformed (HTTP 400, CLI exit 2)."""


class InvalidUsername(BadInput):
    pass


class BadListParameter(BadInput):
    """A wrong `page`, `per_page`, `order`, `order_direction` or `type` on a list."""


class ValidationFailed(GrantkeyError):
    """A key could not be created: CARTO's 422 with its list of messages."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("Validation failed: " + ", ".join(messages))
        self.messages = messages


class Unauthorized(GrantkeyError):
    """No valid credential for this request."""


class BasicUserMismatch(Unauthorized):
    """Basic auth named another user than the one the URL targets."""


class Forbidden(GrantkeyError):
    """The credential is valid but may not do this."""


class QuotaReached(Forbidden):
    pass


class NotFound(GrantkeyError):
    pass


class UserNotFound(NotFound):
    def __init__(self, username: str) -> None:
        super().__init__(username)
        self.username = username


class KeyNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class UserExists(GrantkeyError):
    def __init__(self, username: str) -> None:
        super().__init__(f"user '{username}' already exists")
        self.username = username


class DatabaseUnavailable(GrantkeyError):
    """PostgreSQL could not be reached or answered with a server-side fault."""


class QueryInterrupted(DatabaseUnavailable):
    """The database session ended under a query, which may or may not have run: its
    message is safe to show (it names no server detail)."""

    MESSAGE = ("The database session ended during the query; it may or may not have run. "
               "Check before running it again.")

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class SetupError(GrantkeyError):
    """The server cannot start: bad settings, unusable data directory, no PostgreSQL."""


class SqlError(GrantkeyError):
    """A client query failed: CARTO's `{"error": [...]}` plus hint, detail, context."""

    def __init__(self, status: int, message: str, *, hint: str | None = None,
                 detail: str | None = None, context: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint
        self.detail = detail
        self.context = context


class PoolExhausted(GrantkeyError):
    """No database connection became free in time: the server is at its connection cap."""


class LoginRefused(GrantkeyError):
    """PostgreSQL refused a key role's login (its role was dropped or its password changed)."""
