"""Keys that expire, keys with a SQL time limit of their own, and token regeneration with a
grace (issue 15, features 1, 6 and 7), over real HTTP on the shared `--workers 2` server:
each moment ends on every worker at once (each request a new connection, so both serve)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Account
from tests.support import table_grants

GRANTS = table_grants([("public", "things", ["select"])])
SPREAD = 16  # requests, each on a connection of its own: both workers answer some


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def create(http: httpx.Client, account: Account, name: str, **options: Any) -> httpx.Response:
    return http.post(account.keys_url, params=account.master(),
                     json={"name": name, "grants": GRANTS, **options})


def statuses(account: Account, token: str, query: str = "SELECT count(*) FROM things") -> list[int]:
    """The status of SPREAD requests, each on a new connection."""
    answers = []
    for _ in range(SPREAD):
        with httpx.Client(timeout=30) as client:
            answers.append(account.sql(client, query, token).status_code)
    return answers


def wait_until(moment: datetime) -> None:
    time.sleep(max((moment - datetime.now(UTC)).total_seconds(), 0))


@pytest.fixture
def things(account: Account, http: httpx.Client) -> Account:
    answer = account.sql(http, "CREATE TABLE things (id int); INSERT INTO things VALUES (1)",
                         account.master_token)
    assert answer.status_code == 200, answer.text
    return account


# --- expiry -------------------------------------------------------------------------------


def test_a_key_without_new_fields_shows_them_empty_and_never_expires(
        http: httpx.Client, things: Account) -> None:
    """What CARTO clients send (name and grants only) gives today's key."""
    document = create(http, things, "plain").json()
    assert {field: document[field] for field in (
        "expires_at", "expired", "limits", "token_rotated_at", "old_token_stops_at")} == {
        "expires_at": None, "expired": False, "limits": {}, "token_rotated_at": None,
        "old_token_stops_at": None}
    assert statuses(things, document["token"])[:2] == [200, 200]


def test_an_expiring_key_works_until_its_moment_then_every_worker_refuses_it(
        http: httpx.Client, things: Account) -> None:
    expires = soon(4)
    document = create(http, things, "brief", expires_at=iso(expires)).json()
    assert document["expires_at"] == expires.strftime("%Y-%m-%d %H:%M:%S +0000")
    assert document["expired"] is False
    assert set(statuses(things, document["token"])) == {200}
    wait_until(expires)
    answers = statuses(things, document["token"])
    assert set(answers) == {401}, answers
    answer = things.sql(http, "SELECT 1", document["token"])
    assert answer.json()["hint"].startswith('key "brief" expired at ')
    listed = http.get(f"{things.keys_url}/brief", params=things.master()).json()
    assert listed["expired"] is True  # still listed until deleted
    assert http.delete(f"{things.keys_url}/brief", params=things.master()).status_code == 204


def test_an_expired_key_cannot_log_in_to_postgresql_with_its_derived_password(
        http: httpx.Client, things: Account, services: Any, box: Any, admin_url: str) -> None:
    expires = soon(3)
    document = create(http, things, "gone", expires_at=iso(expires)).json()
    with psycopg.connect(admin_url, dbname=things.user.database, autocommit=True) as conn:
        row = conn.execute("SELECT role, rolvaliduntil FROM grantkey_meta.api_keys "
                           "JOIN pg_roles ON rolname = role WHERE name = 'gone'").fetchone()
    assert row is not None and row[1] is not None  # PostgreSQL's own VALID UNTIL
    conninfo = services.cluster.role_conninfo(things.user.database, row[0],
                                              box.role_password(row[0], document["token"]))
    with psycopg.connect(conninfo, autocommit=True) as conn:  # before: it logs in
        assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(expires)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(conninfo, autocommit=True)


def test_a_query_running_when_its_key_expires_is_cut_and_its_sessions_end(
        http: httpx.Client, things: Account, admin_url: str) -> None:
    expires = soon(2)  # before the server's time limit (3 s here) would cut the query
    document = create(http, things, "cut", expires_at=iso(expires)).json()
    started = time.monotonic()
    answer = things.sql(http, "SELECT pg_sleep(20)", document["token"])
    assert answer.status_code == 401, answer.text
    assert "expired" in answer.json()["hint"]
    assert time.monotonic() - started < 8
    time.sleep(1)  # the pools' idle sessions of the role end at its expiry too
    assert _key_sessions(admin_url, things, "cut") == 0


def _key_sessions(admin_url: str, account: Account, name: str) -> int:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity a JOIN grantkey_meta.api_keys k "
            "ON a.usename = k.role WHERE k.name = %s", [name]).fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize(("value", "message"), [
    ("tomorrow", "Expires at must be a date and time in ISO 8601 with its time zone, "
                 "e.g. 2027-01-31T12:00:00Z"),
    ("2030-01-01T00:00:00", "Expires at must be a date and time in ISO 8601 with its time "
                            "zone, e.g. 2027-01-31T12:00:00Z"),
    (12345, "Expires at must be a date and time in ISO 8601 with its time zone, "
            "e.g. 2027-01-31T12:00:00Z"),
    ("2001-01-01T00:00:00Z", "Expires at must be in the future"),
    ("9999-01-01T00:00:00+02:00", "Expires at must be within 3650 days from now (this "
                                  "server's longest key lifetime)"),
])
def test_a_wrong_expiry_is_a_validation_failure(http: httpx.Client, things: Account,
                                                value: object, message: str) -> None:
    answer = create(http, things, "k", expires_at=value)
    assert answer.status_code == 422
    assert answer.json() == {"errors": f"Validation failed: {message}", "errors_cause": None}
    assert http.get(f"{things.keys_url}/k", params=things.master()).status_code == 404


# --- a time limit of the key's own --------------------------------------------------------


def test_a_key_with_its_own_time_limit_is_cut_there_as_at_the_servers(
        http: httpx.Client, things: Account) -> None:
    quick = create(http, things, "quick", limits={"sql_timeout_seconds": 0.5}).json()
    assert quick["limits"] == {"sql_timeout_seconds": 0.5}
    plain = create(http, things, "plain").json()
    answer = things.sql(http, "SELECT pg_sleep(1.2)", quick["token"])
    assert answer.status_code == 429, answer.text
    assert "timeout" in answer.json()["error"][0]
    assert "Retry-After" not in answer.headers  # a time limit, not a rate limit
    assert things.sql(http, "SELECT pg_sleep(1.2)", plain["token"]).status_code == 200


@pytest.mark.parametrize("limits", [{"sql_timeout_seconds": 0}, {"sql_timeout_seconds": -1},
                                    {"sql_timeout_seconds": 3600},
                                    {"sql_timeout_seconds": "5"},
                                    {"sql_timeout_seconds": True}])
def test_a_time_limit_above_the_servers_or_not_a_number_is_refused(
        http: httpx.Client, things: Account, limits: dict[str, Any]) -> None:
    answer = create(http, things, "k", limits=limits)
    assert answer.status_code == 422
    assert answer.json()["errors"] == (
        "Validation failed: Limits sql_timeout_seconds must be a number of seconds above 0 "
        "and at most 3 (this server's limit for a regular key)")


@pytest.mark.parametrize(("limits", "message"), [
    ([5], 'Limits must be an object, e.g. {"sql_timeout_seconds": 5}'),
    ({"rows": 5}, "Limits has no option rows (known: sql_timeout_seconds)")])
def test_limits_of_a_wrong_shape_are_refused(http: httpx.Client, things: Account,
                                            limits: object, message: str) -> None:
    answer = create(http, things, "k", limits=limits)
    assert answer.json()["errors"] == f"Validation failed: {message}"


# --- regeneration with a grace ------------------------------------------------------------


def regenerate(http: httpx.Client, account: Account, name: str,
               body: object = None) -> httpx.Response:
    return http.post(f"{account.keys_url}/{name}/token/regenerate", params=account.master(),
                     json=body)


def test_with_a_grace_both_tokens_work_until_it_ends_then_the_old_one_nowhere(
        http: httpx.Client, things: Account) -> None:
    old = create(http, things, "rotating").json()["token"]
    before = datetime.now(UTC)
    document = regenerate(http, things, "rotating", {"grace_seconds": 4}).json()
    new = document["token"]
    assert new != old
    assert document["token_rotated_at"] is not None
    stops = datetime.strptime(document["old_token_stops_at"], "%Y-%m-%d %H:%M:%S %z")
    assert before + timedelta(seconds=2) <= stops <= before + timedelta(seconds=6)
    assert set(statuses(things, old)) == {200}
    assert set(statuses(things, new)) == {200}
    wait_until(stops + timedelta(seconds=1))
    assert set(statuses(things, old)) == {401}
    assert set(statuses(things, new)) == {200}
    after = http.get(f"{things.keys_url}/rotating", params=things.master()).json()
    assert after["old_token_stops_at"] is None and after["token"] == new


def test_a_query_of_the_old_token_runs_on_through_a_regeneration_with_a_grace(
        http: httpx.Client, things: Account) -> None:
    old = create(http, things, "busy").json()["token"]
    def query() -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            return things.sql(client, "SELECT pg_sleep(1.5), 1 AS done", old)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(query)
        time.sleep(0.5)
        assert regenerate(http, things, "busy", {"grace_seconds": 60}).status_code == 200
        answer = running.result()
    assert answer.status_code == 200, answer.text


def test_deleting_a_key_in_its_grace_ends_both_tokens_at_once(
        http: httpx.Client, things: Account) -> None:
    old = create(http, things, "doomed").json()["token"]
    new = regenerate(http, things, "doomed", {"grace_seconds": 600}).json()["token"]
    assert set(statuses(things, old)) == {200}  # cached by both workers
    assert http.delete(f"{things.keys_url}/doomed", params=things.master()).status_code == 204
    assert set(statuses(things, old)) == {401}
    assert set(statuses(things, new)) == {401}


def test_a_regeneration_without_grace_ends_an_earlier_grace_at_once(
        http: httpx.Client, things: Account) -> None:
    first = create(http, things, "twice").json()["token"]
    second = regenerate(http, things, "twice", {"grace_seconds": 600}).json()["token"]
    assert set(statuses(things, first)) == {200}
    third = regenerate(http, things, "twice").json()["token"]  # CARTO's call: no body
    assert set(statuses(things, first)) == {401}
    assert set(statuses(things, second)) == {401}
    assert set(statuses(things, third)) == {200}


def test_the_old_token_in_its_grace_also_works_on_the_auth_api(
        http: httpx.Client, things: Account) -> None:
    old = create(http, things, "shown").json()["token"]
    regenerate(http, things, "shown", {"grace_seconds": 60})
    answer = http.get(f"{things.keys_url}/shown", params={"api_key": old})
    assert answer.status_code == 200 and answer.json()["name"] == "shown"


@pytest.mark.parametrize("body", [{"grace_seconds": -1}, {"grace_seconds": 86_401},
                                  {"grace_seconds": "60"}, {"grace_seconds": 1.5},
                                  {"grace_seconds": True}])
def test_a_wrong_grace_is_a_validation_failure_and_changes_nothing(
        http: httpx.Client, things: Account, body: dict[str, Any]) -> None:
    token = create(http, things, "kept").json()["token"]
    answer = regenerate(http, things, "kept", body)
    assert answer.status_code == 422
    assert answer.json()["errors"] == ("Validation failed: Grace seconds must be a whole number "
                                       "from 0 to 86400 (this server's longest grace)")
    assert things.sql(http, "SELECT 1", token).status_code == 200


def test_a_grace_with_a_token_that_is_not_the_keys_is_refused(
        http: httpx.Client, things: Account, make_key: Callable[..., Any]) -> None:
    token = create(http, things, "mine").json()["token"]
    other = create(http, things, "other").json()["token"]
    answer = regenerate(http, things, "mine", {"grace_seconds": 60, "token": other})
    assert answer.json()["errors"] == "Validation failed: Token is not the key's current token"
    assert things.sql(http, "SELECT 1", token).status_code == 200


def test_a_regeneration_with_a_grace_is_audited_with_it(http: httpx.Client,
                                                        things: Account) -> None:
    create(http, things, "logged")
    regenerate(http, things, "logged", {"grace_seconds": 30})
    entries = http.get(f"{things.base_url}/user/{things.username}/api/v3/audit",
                       params={**things.master(), "type": "key.regenerated"}).json()["result"]
    assert entries[0]["key"] == {"name": "logged"}
    assert entries[0]["detail"] == {"type": "regular", "grace_seconds": 30}
