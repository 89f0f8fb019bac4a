"""The events seam (issue 12 item 2): every change writes exactly one audit row, in the
change's own transaction (nothing when it fails), and is delivered to this process's
subscribers only after its commit; a failing subscriber fails nothing; nobody alters the
log — not a key, not grantkey's own admin role, not even a superuser by DML."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from starlette.applications import Starlette

from grantkey import faults
from grantkey.domain.tokens import digest
from grantkey.http import auth_api
from grantkey.http.routing import for_every_user
from grantkey.services.container import Services
from grantkey.services.events import Event, KeyCreated
from tests.conftest import Account, KeyHandle
from tests.support import apis_only, table_grants

Run = Callable[[Awaitable[Any]], Any]


@pytest.fixture(autouse=True)
def disarm() -> Iterator[None]:
    yield
    faults.disarm_all()


def audit_rows(admin_url: str, username: str) -> list[dict[str, Any]]:
    with psycopg.connect(admin_url, dbname="grantkey", row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM public.audit_log WHERE username = %s ORDER BY id",
                            [username]).fetchall()


def new_rows(admin_url: str, username: str, act: Callable[[], object]) -> list[dict[str, Any]]:
    before = {row["id"] for row in audit_rows(admin_url, username)}
    act()
    return [row for row in audit_rows(admin_url, username) if row["id"] not in before]


def summary(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["event"], row["actor_key"], row["actor_type"], row["client"], row["key_name"])


# -- every change, exactly one event ---------------------------------------------------

HTTP = "127.0.0.1"  # the client address the session's server sees
MASTER = ("Master", "master")


def _create(http: httpx.Client, account: Account, make_key: Any, owner_sql: Any) -> Any:
    return lambda: http.post(account.keys_url, params=account.master(),
                             json={"name": "made", "grants": apis_only("sql")})


def _delete(http: httpx.Client, account: Account, make_key: Any, owner_sql: Any) -> Any:
    make_key(account, "made", apis_only("sql"))
    return lambda: http.delete(f"{account.keys_url}/made", params=account.master())


def _regenerate(http: httpx.Client, account: Account, make_key: Any, owner_sql: Any) -> Any:
    make_key(account, "made", apis_only("sql"))
    return lambda: http.post(f"{account.keys_url}/made/token/regenerate",
                             params=account.master())


def _regenerate_master(http: httpx.Client, account: Account, make_key: Any,
                       owner_sql: Any) -> Any:
    return lambda: http.post(f"{account.keys_url}/Master/token/regenerate",
                             params=account.master())


def _privacy(http: httpx.Client, account: Account, make_key: Any, owner_sql: Any) -> Any:
    owner_sql(account, "CREATE TABLE parent (x int); CREATE TABLE child () INHERITS (parent)")
    return lambda: http.patch(
        f"{account.base_url}/user/{account.username}/api/v4/datasets/parent",
        params=account.master(), json={"privacy": "link"})


@pytest.mark.parametrize(("setup", "expected", "detail"), [
    (_create, ("key.created", *MASTER, HTTP, "made"),
     {"type": "regular", "apis": ["sql"], "tables": 0, "schemas": 0, "table_metadata": False}),
    (_delete, ("key.deleted", *MASTER, HTTP, "made"), {"type": "regular"}),
    (_regenerate, ("key.regenerated", *MASTER, HTTP, "made"), {"type": "regular"}),
    (_regenerate_master, ("key.regenerated", *MASTER, HTTP, "Master"), {"type": "master"}),
    (_privacy, ("dataset.privacy_changed", *MASTER, HTTP, None),
     {"schema": "public", "table": "parent", "privacy": "link", "previous": "private",
      "tables": 2}),
], ids=["key created", "key deleted", "key regenerated", "master regenerated",
        "privacy changed"])
def test_every_change_through_the_apis_writes_exactly_one_event(
    setup: Any, expected: tuple[Any, ...], detail: dict[str, Any], http: httpx.Client,
    account: Account, make_key: Callable[[Account, str, Any], KeyHandle],
    owner_sql: Callable[[Account, str], None], admin_url: str,
) -> None:
    act = setup(http, account, make_key, owner_sql)
    rows = new_rows(admin_url, account.username, lambda: act().raise_for_status())
    assert [summary(row) for row in rows] == [expected]
    assert rows[0]["detail"] == detail
    assert rows[0]["user_id"] == account.user.id
    assert account.master_token not in str(rows[0]), "a token is never recorded"


def test_users_created_and_deleted_are_events_of_the_operator_and_history_stays(
    services: Services, run: Run, admin_url: str, server: Any,
) -> None:
    username = f"audited-{os.getpid()}"
    created = run(services.users.create(username))
    rows = audit_rows(admin_url, username)
    assert [summary(row) for row in rows] == [("user.created", None, None, "cli", None)]
    master = run(services.keys.master_principal(created.user))
    run(services.keys.create(master, "kept", apis_only("sql")))
    run(services.users.delete(username))
    rows = audit_rows(admin_url, username)
    # the CLI (and the services it calls) act as the user's master key, or as the operator
    assert [summary(row) for row in rows] == [
        ("user.created", None, None, "cli", None),
        ("key.created", *MASTER, "cli", "kept"),
        ("user.deleted", None, None, "cli", None)]
    assert {row["user_id"] for row in rows} == {created.user.id}


# -- nothing written, nothing delivered, when the change fails ---------------------------

@pytest.fixture
def delivered(services: Services) -> Iterator[list[Event]]:
    seen: list[Event] = []

    async def subscriber(event: Event) -> None:
        seen.append(event)

    services.events.subscribe(Event, subscriber)
    yield seen
    services.events.unsubscribe(subscriber)


def test_a_key_creation_failing_after_its_audit_row_leaves_no_event_and_delivers_nothing(
    account: Account, services: Services, run: Run, admin_url: str,
    owner_sql: Callable[[Account, str], None], delivered: list[Event],
) -> None:
    owner_sql(account, "CREATE TABLE t (id int)")
    master = run(services.keys.master_principal(account.user))
    before = audit_rows(admin_url, account.username)
    faults.arm("key.row_inserted")  # after the audit row was inserted, before any commit
    with pytest.raises(faults.InjectedFault):
        run(services.keys.create(master, "doomed", table_grants([("public", "t", ["select"])])))
    assert audit_rows(admin_url, account.username) == before
    assert delivered == []


def test_a_key_deletion_failing_in_its_decisive_transaction_leaves_no_event(
    account: Account, services: Services, run: Run, admin_url: str,
    make_key: Callable[[Account, str, Any], KeyHandle], delivered: list[Event],
) -> None:
    make_key(account, "kept", apis_only("sql"))
    master = run(services.keys.master_principal(account.user))
    before = audit_rows(admin_url, account.username)
    delivered.clear()
    faults.arm("key.deleted_before_commit")  # the audit row is in, the commit is not
    with pytest.raises(faults.InjectedFault):
        run(services.keys.delete(master, "kept"))
    assert audit_rows(admin_url, account.username) == before
    assert delivered == []


@pytest.mark.parametrize("body", [
    {"name": "twice", "grants": apis_only("sql")},  # the name is taken: 422
    {"name": "bad", "grants": table_grants([("public", "missing", ["select"])])},  # no table
], ids=["duplicate name", "grant of a missing table"])
def test_a_refused_key_creation_writes_no_event(
    body: dict[str, Any], http: httpx.Client, account: Account, admin_url: str,
    make_key: Callable[[Account, str, Any], KeyHandle],
) -> None:
    make_key(account, "twice", apis_only("sql"))
    rows = new_rows(admin_url, account.username, lambda: http.post(
        account.keys_url, params=account.master(), json=body))
    assert rows == []
    assert http.post(account.keys_url, params=account.master(), json=body).status_code == 422


def test_subscribers_run_only_after_the_commit(
    account: Account, services: Services, run: Run, admin_url: str,
) -> None:
    """When a subscriber runs, another connection already sees the event's row: the
    transaction committed before delivery."""
    seen: list[tuple[str, int]] = []

    async def subscriber(event: KeyCreated) -> None:
        seen.append((event.key.name, len(audit_rows(admin_url, account.username))))

    master = run(services.keys.master_principal(account.user))
    services.events.subscribe(KeyCreated, subscriber)
    try:
        run(services.keys.create(master, "seen", apis_only("sql")))
    finally:
        services.events.unsubscribe(subscriber)
    rows = audit_rows(admin_url, account.username)
    assert seen == [("seen", len(rows))] and rows[-1]["key_name"] == "seen"


def test_a_raising_subscriber_fails_no_request_and_stops_no_revocation(
    account: Account, services: Services, run: Run, admin_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In process, through the Auth API's real handlers: a subscriber that raises is
    logged; the key is created, then deleted, and the other subscribers still revoke."""
    app = Starlette(routes=for_every_user(auth_api.routes()))
    app.state.services = services

    async def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            url = f"/user/{account.username}/api/v3/api_keys"
            created = await client.post(url, params=account.master(),
                                        json={"name": "sturdy", "grants": apis_only("sql")})
            deleted = await client.delete(f"{url}/sturdy", params=account.master())
            return created, deleted

    services.events.subscribe(Event, broken)
    try:
        with caplog.at_level(logging.ERROR, logger="grantkey.events"):
            created, deleted = run(calls())
    finally:
        services.events.unsubscribe(broken)
    assert (created.status_code, deleted.status_code) == (201, 204)
    assert sum("subscriber bug" in str(r.exc_info[1]) for r in caplog.records
               if r.exc_info) == 2
    # the revocation's own subscribers ran too: the old token is forgotten here
    assert services.cache.get(account.user.id, digest(created.json()["token"])) is None
    assert [row["event"] for row in audit_rows(admin_url, account.username)][-2:] == [
        "key.created", "key.deleted"]


# -- nobody alters the log ----------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE public.audit_log SET client = 'forged'",
    "DELETE FROM public.audit_log",
    "TRUNCATE public.audit_log",
], ids=["update", "delete", "truncate"])
@pytest.mark.parametrize("who", ["routine admin", "superuser"])
def test_neither_grantkeys_admin_nor_a_superuser_can_alter_the_log(
    statement: str, who: str, account: Account, admin_url: str, routine_url: str,
) -> None:
    url = routine_url if who == "routine admin" else admin_url
    before = audit_rows(admin_url, account.username)
    assert before, "the account's creation is in the log"
    with psycopg.connect(url, dbname="grantkey") as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)
    assert audit_rows(admin_url, account.username) == before


def test_a_key_role_cannot_reach_the_log(
    account: Account, http: httpx.Client, admin_url: str,
    make_key: Callable[[Account, str, Any], KeyHandle],
) -> None:
    """The log lives in the metadata database: no key role may connect to it, and the
    master key's SQL, in the user's own database, finds no such table."""
    key = make_key(account, "curious", apis_only("sql"))
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        for role in (account.user.owner_role, account.user.public_role, key.role):
            allowed = conn.execute("SELECT has_database_privilege(%s, 'grantkey', 'CONNECT')",
                                   [role]).fetchone()
            assert allowed == (False,), role
    elsewhere = psycopg.conninfo.conninfo_to_dict(key.conninfo) | {"dbname": "grantkey"}
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(psycopg.conninfo.make_conninfo("", **elsewhere)).close()
    for query in ["SELECT * FROM public.audit_log", "DELETE FROM public.audit_log",
                  "SELECT * FROM grantkey.public.audit_log"]:
        answer = account.sql(http, query, account.master_token)
        assert answer.status_code in (400, 404), (query, answer.text)


def test_the_log_and_its_identity_sequence_can_be_handed_to_the_routine_admin(
    admin_url: str, routine_url: str, run: Run, services: Services,
) -> None:
    """A metadata database an earlier start made as the superuser is handed over table by
    table (`bootstrap.hand_over_schema`): the log's identity sequence follows its table
    (altered on its own, PostgreSQL refuses it), as a serial column's does."""
    from grantkey.db.bootstrap import hand_over_schema

    routine = psycopg.conninfo.conninfo_to_dict(routine_url)["user"]
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS handover CASCADE; CREATE SCHEMA handover")
        conn.execute("CREATE TABLE handover.log (id bigint GENERATED ALWAYS AS IDENTITY, "
                     "at timestamptz); CREATE TABLE handover.other (id serial)")

    async def hand_over() -> None:
        conn = await psycopg.AsyncConnection.connect(admin_url, dbname="grantkey",
                                                     autocommit=True, row_factory=dict_row)
        async with conn:
            await hand_over_schema(conn, "handover", str(routine))

    try:
        run(hand_over())
        with psycopg.connect(admin_url, dbname="grantkey") as conn:
            owners = set(conn.execute(
                "SELECT c.relowner::regrole::text FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = 'handover'").fetchall())
        assert owners == {(routine,)}
    finally:
        with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
            conn.execute("DROP SCHEMA handover CASCADE")
