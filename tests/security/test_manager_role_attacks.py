"""Attacks on the per-user manager roles and the routine admin (not a superuser).

On PostgreSQL 16+, with the routine admin `grantkey_app`, each user has a maker
(`gk_<user>_maker`) and a granter (`gk_<user>_granter`): NOLOGIN, NOINHERIT, CREATEROLE,
reached by the admin with SET only (`grantkey.db.managers`). These tests try to reach them,
or the admin, from every kind of client (the master, a key with schema `create`, the
default public key, another tenant's master), to block their removal, and to change who
grantkey's own connections act as.

The tests below the "breaks" marker (a master's `ALTER DATABASE … SET role`,
`transaction_timeout` or `createrole_self_grant`, and a grant on its database to another
tenant's roles) were breaks when first written: grantkey's sessions now pin `role`,
`transaction_timeout`, `idle_session_timeout` and `createrole_self_grant` in the startup
packet (`db.cluster`), and grants on shared objects are dropped from the metadata database
(`revocations.DATABASES_NAMING`). Each undoes its attack before it ends.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from grantkey.db import users as user_store
from grantkey.db.cluster import admin_conninfo
from grantkey.domain import names
from grantkey.domain.secrets_box import SecretBox
from grantkey.errors import UserNotFound
from grantkey.services.container import Services
from tests.conftest import Account, KeyHandle, builtin_handle
from tests.support import ServerProcess, table_grants

Run = Callable[[Awaitable[Any]], Any]
_counter = iter(range(10**9))


def server_version(admin_url: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return int(conn.info.server_version)


@pytest.fixture(autouse=True)
def needs_managers(admin_url: str, routine_url: str) -> None:
    if routine_url == admin_url or server_version(admin_url) < 160000:
        pytest.skip("manager roles exist only with a non-superuser admin on PostgreSQL 16+")


@pytest.fixture
def tenants(services: Services, run: Run, server: ServerProcess) -> Iterator[Callable[[], Account]]:
    """Like `make_account`, but a user the test deleted itself (or tried to) is finished off
    quietly: a deletion another tenant blocked is retried once the attack is undone."""
    created: list[Account] = []

    def make() -> Account:
        result = run(services.users.create(f"m{os.getpid()}-{next(_counter)}"))
        account = Account(result.user, result.master_token, server.url)
        created.append(account)
        return account

    yield make
    for account in created:
        try:
            run(services.users.delete(account.username))
        except UserNotFound:
            run(user_store.drop_user_everywhere(services.cluster, account.user.id,
                                                account.user.database))


def master_of(services: Services, box: SecretBox, account: Account) -> KeyHandle:
    """Logged in as the master key does: as the user's owner role."""
    return builtin_handle(services, box, account, account.user.owner_role, account.master_token)


def maker(account: Account) -> str:
    return names.maker_role(account.user.id)


def granter(account: Account) -> str:
    return names.granter_role(account.user.id)


def refused(conn: psycopg.Connection[Any], statement: sql.Composed) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def reaching_statements(target: str, me: str) -> list[sql.Composed]:
    """What a role would run to become, join or take over `target`."""
    role, self_ = sql.Identifier(target), sql.Identifier(me)
    return [
        sql.SQL("SET ROLE {}").format(role),
        sql.SQL("SET SESSION AUTHORIZATION {}").format(role),
        sql.SQL("GRANT {} TO {}").format(role, self_),
        sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(self_, role),
        sql.SQL("ALTER ROLE {} LOGIN PASSWORD 'pwned-pwned-pwned'").format(role),
        sql.SQL("ALTER ROLE {} SET search_path = public").format(role),
        sql.SQL("ALTER ROLE {} SET role = {}").format(role, sql.Literal(me)),
        sql.SQL("ALTER ROLE {} IN DATABASE postgres SET search_path = public").format(role),
        sql.SQL("ALTER ROLE {} RENAME TO {}").format(role, sql.Identifier(target + "_x")),
        sql.SQL("ALTER ROLE {} NOCREATEROLE").format(role),
        sql.SQL("COMMENT ON ROLE {} IS 'mine'").format(role),
        sql.SQL("DROP ROLE {}").format(role),
    ]


def try_to_reach(conn: psycopg.Connection[Any], targets: list[str], me: str) -> None:
    for target in targets:
        for statement in reaching_statements(target, me):
            refused(conn, statement)
    row = conn.execute("SELECT current_user::text, session_user::text").fetchone()
    assert row == (me, me)


def leftover_roles(admin_url: str, account: Account) -> list[str]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, %s) "
                            "ORDER BY 1", [f"gk_{account.user.id}_"]).fetchall()
    return [row[0] for row in rows]


def role_exists(admin_url: str, role: str) -> bool:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is not None


def delete_key(http: httpx.Client, account: Account, name: str) -> None:
    assert http.delete(f"{account.keys_url}/{name}", params=account.master()).status_code == 204


def create_key_over_http(http: httpx.Client, account: Account, name: str) -> str:
    """A key made by the server (fresh admin connections to the user's database)."""
    response = http.post(account.keys_url, params=account.master(), json={
        "name": name, "grants": table_grants([("public", "cities", ["select"])])})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def key_role_named(admin_url: str, account: Account, name: str) -> str:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        row = conn.execute("SELECT role FROM grantkey_meta.api_keys WHERE name = %s",
                           [name]).fetchone()
    assert row is not None
    return str(row[0])


# --- the defences that hold -------------------------------------------------------------


def test_the_master_cannot_reach_its_manager_roles_or_the_routine_admin(
    tenants: Callable[[], Account], services: Services, box: SecretBox,
) -> None:
    account = tenants()
    with master_of(services, box, account).connect() as conn:
        try_to_reach(conn, [maker(account), granter(account), "grantkey_app", "grantkey"],
                     account.user.owner_role)
        # and not through a key role it may SET ROLE to either
        assert conn.execute("SELECT pg_has_role(%s, 'MEMBER'), pg_has_role(%s, 'MEMBER'), "
                            "pg_has_role('grantkey_app', 'MEMBER')",
                            [maker(account), granter(account)]).fetchone() == (False, False, False)


def test_a_key_with_schema_create_cannot_reach_the_manager_roles_or_the_routine_admin(
    tenants: Callable[[], Account], owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle],
) -> None:
    account = tenants()
    owner_sql(account, "CREATE TABLE cities (name text)")
    key = make_key(account, "creator", table_grants([("public", "cities", ["select"])],
                                                    create_schemas=("public",)))
    with key.connect() as conn:
        try_to_reach(conn, [maker(account), granter(account), "grantkey_app", "grantkey"],
                     key.role)
        # nor after SET ROLE to the roles a key may become (its reader and privilege roles)
        for role in (names.reader_role(account.user.id),):
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            refused(conn, sql.SQL("SET ROLE {}").format(sql.Identifier(maker(account))))
            refused(conn, sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(granter(account)), sql.Identifier(key.role)))
            conn.execute("RESET ROLE")


def test_the_default_public_key_cannot_reach_the_manager_roles(
    tenants: Callable[[], Account], http: httpx.Client,
) -> None:
    account = tenants()
    for target in (maker(account), granter(account), "grantkey_app"):
        for statement in reaching_statements(target, account.user.public_role):
            q = statement.as_string(None)
            response = account.sql(http, q + "; SELECT current_user AS who")
            assert response.status_code != 200, (q, response.text)
    response = account.sql(http, "SELECT current_user AS who, session_user AS s")
    assert response.json()["rows"] == [{"who": account.user.public_role,
                                        "s": account.user.public_role}]


def test_a_master_cannot_reach_another_users_manager_roles_or_keys(
    tenants: Callable[[], Account], services: Services, box: SecretBox,
    owner_sql: Callable[[Account, str], None], make_key: Callable[..., KeyHandle],
) -> None:
    attacker, victim = tenants(), tenants()
    owner_sql(victim, "CREATE TABLE cities (name text)")
    key = make_key(victim, "k", table_grants([("public", "cities", ["select"])]))
    with master_of(services, box, attacker).connect() as conn:
        try_to_reach(conn, [maker(victim), granter(victim), victim.user.owner_role,
                            names.reader_role(victim.user.id), key.role],
                     attacker.user.owner_role)


def test_only_the_routine_admin_is_a_member_of_the_manager_roles_and_only_with_set(
    tenants: Callable[[], Account], owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle], admin_url: str,
) -> None:
    account = tenants()
    owner_sql(account, "CREATE TABLE cities (name text)")
    make_key(account, "k", table_grants([("public", "cities", ["select"])],
                                        create_schemas=("public",)))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        members = conn.execute(
            "SELECT r.rolname::text, m.rolname::text, a.admin_option, a.inherit_option, "
            "a.set_option FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid "
            "JOIN pg_roles m ON m.oid = a.member WHERE r.rolname IN (%s, %s) ORDER BY 1, 2, 3",
            [maker(account), granter(account)]).fetchall()
        attributes = conn.execute(
            "SELECT rolname::text, rolcanlogin, rolinherit, rolsuper, rolcreatedb, rolbypassrls, "
            "rolpassword IS NULL FROM pg_authid WHERE rolname IN (%s, %s) ORDER BY 1",
            [maker(account), granter(account)]).fetchall()
        # no tenant role holds SET or the privileges of the routine admin either
        app_members = conn.execute(
            "SELECT m.rolname::text FROM pg_auth_members a JOIN pg_roles m ON m.oid = a.member "
            "WHERE a.roleid = 'grantkey_app'::regrole").fetchall()
    for role in (maker(account), granter(account)):  # created by it: ADMIN; then SET only
        assert (role, "grantkey_app", False, False, True) in members
        assert (role, "grantkey_app", True, False, False) in members
    assert {m[1] for m in members} == {"grantkey_app"}
    assert attributes == [(granter(account), False, False, False, False, False, True),
                          (maker(account), False, False, False, False, False, True)]
    assert app_members == []


def test_a_deleted_key_leaves_no_membership_granted_by_a_manager_role(
    tenants: Callable[[], Account], owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle], http: httpx.Client, admin_url: str,
) -> None:
    account = tenants()
    owner_sql(account, "CREATE TABLE cities (name text)")
    key = make_key(account, "k", table_grants([("public", "cities", ["select", "update"])],
                                              create_schemas=("public",)))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        granted_before = conn.execute(
            "SELECT count(*) FROM pg_auth_members WHERE grantor IN (%s::regrole, %s::regrole)",
            [maker(account), granter(account)]).fetchone()
    assert granted_before is not None and granted_before[0] >= 3  # owner in key; reader, privs
    delete_key(http, account, "k")
    assert not role_exists(admin_url, key.role)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT r.rolname::text, m.rolname::text FROM pg_auth_members a "
            "JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member "
            "WHERE a.grantor IN (%s::regrole, %s::regrole) "
            "OR a.member IN (%s::regrole, %s::regrole) AND NOT a.admin_option",
            [maker(account), granter(account), maker(account), granter(account)]).fetchall()
    assert left == []


def test_another_tenants_grants_to_the_manager_roles_do_not_block_deleting_the_user(
    tenants: Callable[[], Account], services: Services, box: SecretBox, run: Run,
    admin_url: str,
) -> None:
    """Table privileges, column privileges, default privileges and a policy naming a
    victim's manager roles, all in the attacker's own database: the victim's deletion
    drops them there (pg_shdepend names that database) and removes every role."""
    attacker, victim = tenants(), tenants()
    managers = sql.SQL(", ").join([sql.Identifier(maker(victim)), sql.Identifier(granter(victim))])
    with master_of(services, box, attacker).connect() as conn:
        conn.execute(sql.SQL(
            "CREATE TABLE bait (a int); GRANT ALL ON bait TO {m}; "
            "GRANT SELECT (a) ON bait TO {m}; GRANT USAGE ON SCHEMA public TO {m}; "
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {m}; "
            "ALTER TABLE bait ENABLE ROW LEVEL SECURITY; "
            "CREATE POLICY p ON bait TO {m} USING (true)").format(m=managers))
    run(services.users.delete(victim.username))
    assert leftover_roles(admin_url, victim) == []


def test_user_deletion_removes_the_manager_roles_and_every_membership(
    tenants: Callable[[], Account], owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle], run: Run, services: Services, admin_url: str,
) -> None:
    account = tenants()
    owner_sql(account, "CREATE TABLE cities (name text)")
    for n in range(3):
        make_key(account, f"k{n}", table_grants([("public", "cities", ["select"])],
                                                create_schemas=("public",)))
    assert maker(account) in leftover_roles(admin_url, account)
    run(services.users.delete(account.username))
    assert leftover_roles(admin_url, account) == []


# --- the breaks found by attacking (fixed; each docstring says how) ----------------------


def admin_identity(url: str, database: str) -> tuple[str, str, str]:
    """Who a connection grantkey opens to `database` acts as (pinned settings included)."""
    with psycopg.connect(admin_conninfo(url, dbname=database), autocommit=True) as conn:
        row = conn.execute("SELECT current_user::text, session_user::text, "
                           "current_setting('is_superuser')").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def undo_database_settings(admin_url: str, account: Account) -> None:
    """As the superuser, immune to the planted settings (pinned on the command line)."""
    pinned = "-c role=none -c transaction_timeout=0 -c createrole_self_grant="
    with psycopg.connect(admin_url, dbname="postgres", autocommit=True, options=pinned) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} RESET ALL").format(
            sql.Identifier(account.user.database)))


def test_a_masters_database_role_default_does_not_change_who_grantkey_acts_as(
    tenants: Callable[[], Account], services: Services, box: SecretBox, admin_url: str,
    routine_url: str,
) -> None:
    """Was a break. The master owns its database, so it may `ALTER DATABASE … SET role = X` for
    any X; PostgreSQL applies it at the start of every later session that may SET ROLE to
    X. The routine admin may SET ROLE to every user's maker and granter, and the superuser
    to any role at all: grantkey's own connections to that database then act as X (the
    superuser's with `is_superuser` off). `ADMIN_SESSION` pins `search_path` and friends
    but not `role`, and `RESET ROLE` (`managers.as_admin`) returns to X, not to the admin.
    Fixed: pin `role=none` in `ADMIN_SESSION` (the startup packet outranks the database
    default; `-c role=none` restores the login role), and check `current_user =
    session_user` on every admin and superuser connection."""
    account = tenants()
    with master_of(services, box, account).connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET role = {}").format(
            sql.Identifier(account.user.database), sql.Literal(maker(account))))
    try:
        assert admin_identity(routine_url, account.user.database) == (
            "grantkey_app", "grantkey_app", "off")
        assert admin_identity(admin_url, account.user.database) == ("grantkey", "grantkey", "on")
    finally:
        undo_database_settings(admin_url, account)


def bait_then_delete(
    services: Services, box: SecretBox, run: Run, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle], http: httpx.Client, admin_url: str,
    attacker: Account, victim: Account, baited: Callable[[KeyHandle], list[str]],
    setting: sql.Composable,
) -> None:
    """The attacker's master grants a table of its database to the `baited` roles of the
    victim (so removing them must `DROP OWNED` there) and sets `setting` on its database;
    then the victim's key, and the victim, are deleted: nothing of theirs may stay."""
    owner_sql(victim, "CREATE TABLE cities (name text)")
    key = make_key(victim, "k", table_grants([("public", "cities", ["select"])]))
    with master_of(services, box, attacker).connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE bait (a int); GRANT SELECT ON bait TO {}").format(
            sql.SQL(", ").join(sql.Identifier(role) for role in baited(key))))
        conn.execute(sql.SQL("ALTER DATABASE {} SET {}").format(
            sql.Identifier(attacker.user.database), setting))
    try:
        delete_key(http, victim, "k")
        key_left = role_exists(admin_url, key.role)
        run(services.users.delete(victim.username))
        assert (key_left, leftover_roles(admin_url, victim)) == (False, [])
    finally:
        undo_database_settings(admin_url, attacker)


def test_a_masters_database_role_default_does_not_block_another_users_cleanup(
    tenants: Callable[[], Account], services: Services, box: SecretBox, run: Run,
    owner_sql: Callable[[Account, str], None], make_key: Callable[..., KeyHandle],
    http: httpx.Client, admin_url: str,
) -> None:
    """Was a break (cross-tenant). The attacker's master grants something in its own database to
    the victim's key and manager roles (so removing them must `DROP OWNED` there), then
    sets its database's `role` default to its own maker. grantkey's connection there (the
    routine admin's for a key, the superuser's for a user) acts as that maker and gets
    `permission denied to drop objects`: the victim's revoked key role and every role of
    the deleted victim stay behind, and every start-up retry fails the same way. Root
    cause and fix: as above (pin `role=none`)."""
    attacker, victim = tenants(), tenants()
    bait_then_delete(services, box, run, owner_sql, make_key, http, admin_url, attacker, victim,
                     lambda key: [key.role, maker(victim), victim.user.owner_role],
                     sql.SQL("role = {}").format(sql.Literal(maker(attacker))))


def test_a_masters_database_transaction_timeout_does_not_block_another_users_cleanup(
    tenants: Callable[[], Account], services: Services, box: SecretBox, run: Run,
    owner_sql: Callable[[Account, str], None], make_key: Callable[..., KeyHandle],
    http: httpx.Client, admin_url: str,
) -> None:
    """Was a break (cross-tenant, PostgreSQL 17+). Same bait, then `ALTER DATABASE … SET
    transaction_timeout = '1ms'`: every transaction grantkey opens there (admin and
    superuser) is ended before its `DROP OWNED` completes. `ADMIN_SESSION` pins
    `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout` but not
    `transaction_timeout` (new in 17) nor `idle_session_timeout`. Fixed: both pinned to 0 where
    the server knows them (send `-c transaction_timeout=0` only to 17+: an unknown name in
    the startup packet is fatal)."""
    if server_version(admin_url) < 170000:
        pytest.skip("transaction_timeout is new in PostgreSQL 17")
    attacker, victim = tenants(), tenants()
    bait_then_delete(services, box, run, owner_sql, make_key, http, admin_url, attacker, victim,
                     lambda key: [key.role, maker(victim)], sql.SQL("transaction_timeout = '1ms'"))


def test_a_grant_on_another_tenants_database_does_not_block_deleting_the_managers(
    tenants: Callable[[], Account], services: Services, box: SecretBox, run: Run,
    admin_url: str,
) -> None:
    """Was a break (cross-tenant). The attacker's master owns its database and grants `CONNECT`
    on it to the victim's maker and granter. A database's ACL lives in a shared catalog:
    pg_shdepend records it with `dbid = 0`, which `_drop_user_roles_as_superuser` (and
    `revocations.databases_naming`) skip by joining `pg_database ON d.oid = s.dbid`. The
    victim's own database is dropped first, so no `DROP OWNED BY` runs anywhere for the
    managers (which own nothing elsewhere) and `DROP ROLE` fails: `privileges for database
    …`; the manager roles stay behind for good. (A key role is saved only because its
    `DROP OWNED` in its own database also clears shared ACLs.) Fixed: where a role has
    pg_shdepend rows with `dbid = 0`, run its `DROP OWNED BY` once in any connectable
    database (the metadata database will do: it clears shared objects' ACLs too)."""
    attacker, victim = tenants(), tenants()
    with master_of(services, box, attacker).connect() as conn:
        conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}, {}").format(
            sql.Identifier(attacker.user.database), sql.Identifier(maker(victim)),
            sql.Identifier(granter(victim))))
    try:
        run(services.users.delete(victim.username))
        assert leftover_roles(admin_url, victim) == []
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            for role in (maker(victim), granter(victim)):
                if role_exists(admin_url, role):
                    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
                        sql.Identifier(attacker.user.database), sql.Identifier(role)))


def test_a_masters_createrole_self_grant_gives_the_maker_no_set_on_keys(
    tenants: Callable[[], Account], services: Services, box: SecretBox,
    owner_sql: Callable[[Account, str], None], http: httpx.Client, admin_url: str,
) -> None:
    """Was a break (design invariant; no tenant gain found). `createrole_self_grant` is a user
    setting, so the master may `ALTER DATABASE … SET createrole_self_grant = 'set,
    inherit'`; every role created on a later admin connection to that database is then
    granted to its creator with SET and INHERIT: the maker holds SET on each new key role,
    so the routine admin (SET on the maker) can `SET ROLE` to the user's keys, which
    `db.managers` promises it never can (and each such membership lengthens the walks the
    managers exist to keep short). Fixed: pin `createrole_self_grant=` (empty) in
    `ADMIN_SESSION` (PostgreSQL 16+ only), or create key roles with `WITH INHERIT FALSE,
    SET FALSE` revoked explicitly after creation."""
    account = tenants()
    owner_sql(account, "CREATE TABLE cities (name text)")
    with master_of(services, box, account).connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET createrole_self_grant = 'set, inherit'")
                     .format(sql.Identifier(account.user.database)))
    try:
        create_key_over_http(http, account, "later")
        role = key_role_named(admin_url, account, "later")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_has_role('grantkey_app', %s, 'SET'), "
                               "pg_has_role(%s, %s, 'USAGE')",
                               [role, maker(account), role]).fetchone()
        assert row == (False, False)
    finally:
        undo_database_settings(admin_url, account)
