"""Every error class carries its HTTP status and what a client may read of it, and each API
family renders it in its own shape: the Auth API and datasets `{"errors", "errors_cause"}`
(an Auth API 401 with no body, CARTO's), the SQL API `{"error": [...]}`, the Maps API
`{"errors": [...], "errors_with_context": [...]}`; 503s
say when to retry. A new error class without a row here fails the walk."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest

import grantkey
from grantkey import errors
from grantkey.errors import GrantkeyError
from grantkey.http.errors import Family, render_error

# class -> (an instance, its status, what clients read)
CASES: dict[type[GrantkeyError], tuple[GrantkeyError, int, str]] = {
    GrantkeyError: (GrantkeyError("secret detail"), 500, "Internal error"),
    errors.BadInput: (errors.BadInput("bad q"), 400, "bad q"),
    errors.PayloadTooLarge: (errors.PayloadTooLarge("too big"), 413, "too big"),
    errors.InvalidUsername: (errors.InvalidUsername("bad name"), 400, "bad name"),
    errors.BadListParameter: (errors.BadListParameter("bad page"), 400, "bad page"),
    errors.ValidationFailed: (errors.ValidationFailed(["a", "b"]), 422,
                              "Validation failed: a, b"),
    errors.Forbidden: (errors.Forbidden(), 403, "forbidden"),
    errors.QuotaReached: (errors.QuotaReached("too many keys"), 403, "too many keys"),
    errors.NotFound: (errors.NotFound("no such table"), 404, "no such table"),
    errors.UserNotFound: (errors.UserNotFound("ana"), 404,
                          "Sorry, we can't find grantkey user 'ana'. Please check that you "
                          "have entered the correct domain."),
    errors.KeyNotFound: (errors.KeyNotFound("k1"), 404, "API key not found: k1"),
    errors.UserExists: (errors.UserExists("ana"), 409, "user 'ana' already exists"),
    errors.SqlError: (errors.SqlError(403, "permission denied for table t"), 403,
                      "permission denied for table t"),
    errors.PoolExhausted: (errors.PoolExhausted("Too many concurrent queries"), 429,
                           "Too many concurrent queries"),
    errors.Unauthorized: (errors.Unauthorized("token gk123 is revoked"), 401, "Unauthorized"),
    errors.KeyExpired: (errors.KeyExpired("map", datetime(2026, 1, 1, tzinfo=UTC)), 401,
                        "Unauthorized"),
    errors.BasicUserMismatch: (errors.BasicUserMismatch("x"), 403, "permission denied"),
    errors.DatabaseUnavailable: (errors.DatabaseUnavailable("host=/secret/socket"), 503,
                                 "The database is unavailable; try again shortly."),
    errors.QueryInterrupted: (errors.QueryInterrupted(), 503, errors.QueryInterrupted.MESSAGE),
    errors.SetupError: (errors.SetupError("GRANTKEY_SECRET unreadable"), 500, "Internal error"),
    errors.TenantCodeInTheWay: (errors.TenantCodeInTheWay("public holds f()"), 500,
                                "Internal error"),
    errors.RateLimited: (errors.RateLimited({"Retry-After": "3"}, "key k may make 1"), 429,
                         errors.RateLimited.MESSAGE),
    errors.LoginRefused: (errors.LoginRefused("role gk_x refused"), 500, "Internal error"),
    errors.LayerFailed: (errors.LayerFailed(errors.SqlError(404, 'relation "t" does not exist'),
                                            1, "pts"), 404, 'relation "t" does not exist'),
    errors.LimitReached: (errors.LimitReached("User 'ana' reached limit on number of "
                                              "templates (1/1)"), 409,
                          "User 'ana' reached limit on number of templates (1/1)"),
    errors.JobNotFound: (errors.JobNotFound("0e1"), 404, "Job with id 0e1 not found"),
    errors.LayergroupNotFound: (errors.LayergroupNotFound("0abc:1"), 404,
                                "Invalid or nonexistent map configuration token '0abc:1'"),
}


def every_error_class() -> Iterator[type[GrantkeyError]]:
    for module in pkgutil.walk_packages(grantkey.__path__, "grantkey."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)

    def walk(cls: type[GrantkeyError]) -> Iterator[type[GrantkeyError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    yield from (cls for cls in walk(GrantkeyError) if not cls.__name__.startswith("_"))


def test_every_error_class_of_every_module_has_its_row() -> None:
    missing = [f"{c.__module__}.{c.__name__}" for c in every_error_class() if c not in CASES]
    assert missing == []


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", [Family.AUTH, Family.V4, Family.DATA, Family.MAPS],
                         ids=lambda f: f.value)
def test_each_class_renders_its_status_and_the_family_shape(
    cls: type[GrantkeyError], family: Family,
) -> None:
    error, status, message = CASES[cls]
    assert type(error) is cls and error.status == status and error.public_message() == message
    response = render_error(family, error)
    assert (response.headers.get("retry-after") == "1") == (status == 503)
    if family is Family.AUTH and isinstance(error, errors.Unauthorized):
        # CARTO's Auth API: no credential, a bad one or a Basic mismatch: 401, no body
        assert (response.status_code, response.body) == (401, b"")
        return
    assert response.status_code == status
    body = orjson.loads(response.body)
    if family is Family.DATA:
        assert body["error"] == [message]
        assert set(body) <= {"error", "hint", "detail", "context"}
    elif family is Family.MAPS:  # the Maps API says Forbidden where the SQL API does not
        shown = "Forbidden" if cls is errors.BasicUserMismatch else message
        assert body["errors"] == [shown]
        assert [context["message"] for context in body["errors_with_context"]] == [shown]
    else:
        hint = {"hint": error.hint} if error.hint else {}
        assert body == {"errors": message, "errors_cause": None, **hint}


def test_server_details_never_reach_a_client() -> None:
    """What a 5xx or a 401 carries inside (a socket path, a setting, a token) stays inside."""
    for error, status, message in CASES.values():
        if status >= 500 or status == 401:
            for family in Family:
                if family is Family.PLAIN:
                    continue
                body = render_error(family, error).body.decode()
                assert str(error) not in body or str(error) == message, (error, body)
