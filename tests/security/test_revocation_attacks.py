"""Revocation never raises anyone's privileges, and nothing a tenant does can block it.

A key with schema `create` plants views, functions, triggers and rules, grants what it
owns to PUBLIC, holds its role with a temporary table or a large-object grant from another
tenant, or gives a large object to a privilege role; none of it survives the key with more
rights than the key had, and none of it stops the DELETE (or later key management).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import TEST_SECRET, ServerProcess, table_grants

SECRET = "the-secret-row"


@pytest.fixture
def creator(account: Account, owner_sql: Callable[[Account, str], None],
            make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, f"CREATE TABLE secrets (s text); INSERT INTO secrets VALUES ('{SECRET}');"
                       "CREATE TABLE cities (name text); INSERT INTO cities VALUES ('Lima')")
    return make_key(account, "creator", table_grants([("public", "cities", ["select"])],
                                                     create_schemas=("public",)))


def as_key(http: httpx.Client, account: Account, key: KeyHandle, q: str) -> None:
    response = account.sql(http, q, key.token)
    assert response.status_code == 200, response.text


def delete(http: httpx.Client, account: Account, name: str) -> None:
    assert http.delete(f"{account.keys_url}/{name}", params=account.master()).status_code == 204


def role_exists(admin_url: str, role: str) -> bool:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is not None


def owner_query(admin_url: str, account: Account, q: str) -> list[tuple[object, ...]]:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        conn.execute(f'SET ROLE "{account.user.owner_role}"')
        cur = conn.execute(q)
        return cur.fetchall() if cur.description else []


def test_a_deleted_keys_view_over_secrets_is_not_handed_to_the_owner(
    http: httpx.Client, account: Account, creator: KeyHandle, admin_url: str,
) -> None:
    as_key(http, account, creator, "CREATE VIEW public.v AS SELECT * FROM secrets; "
                                   "GRANT SELECT ON public.v TO PUBLIC")
    as_key(http, account, creator, "CREATE MATERIALIZED VIEW public.mv AS SELECT 1 AS a WITH NO DATA")
    delete(http, account, "creator")
    anonymous = account.sql(http, "SELECT * FROM public.v")
    assert anonymous.status_code != 200 and SECRET not in anonymous.text
    assert owner_query(admin_url, account, "SELECT to_regclass('public.v'), "
                                           "to_regclass('public.mv')") == [(None, None)]
    assert not role_exists(admin_url, creator.role)


def test_a_deleted_keys_security_definer_function_is_dropped_not_handed_over(
    http: httpx.Client, account: Account, creator: KeyHandle, admin_url: str,
) -> None:
    as_key(http, account, creator,
           "CREATE FUNCTION public.run(q text) RETURNS int SECURITY DEFINER LANGUAGE plpgsql "
           "AS $$BEGIN EXECUTE q; RETURN 1; END$$; "
           "CREATE FUNCTION public.plus(a int, b int) RETURNS int LANGUAGE sql AS 'SELECT a + b'; "
           "CREATE OPERATOR public.### (LEFTARG = int, RIGHTARG = int, FUNCTION = public.plus); "
           "CREATE AGGREGATE public.total(int) (SFUNC = public.plus, STYPE = int)")
    delete(http, account, "creator")
    anonymous = account.sql(http, "SELECT public.run('CREATE TABLE public.pwned ()')")
    assert anonymous.status_code != 200
    left = owner_query(admin_url, account,
                       "SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
                       "AND proname IN ('run', 'plus', 'total') "
                       "UNION ALL SELECT count(*) FROM pg_operator WHERE oprname = '###'")
    assert left == [(0,), (0,)]


def test_a_deleted_keys_trigger_and_rule_never_run_with_the_owners_rights(
    http: httpx.Client, account: Account, creator: KeyHandle, admin_url: str,
) -> None:
    as_key(http, account, creator,
           "CREATE TABLE public.mine (a int); CREATE TABLE public.loot (s text); "
           "GRANT SELECT ON public.loot TO PUBLIC; "
           "CREATE FUNCTION public.steal() RETURNS trigger LANGUAGE plpgsql AS "
           "$$BEGIN INSERT INTO public.loot SELECT s FROM public.secrets; RETURN NEW; END$$; "
           "CREATE TRIGGER t BEFORE INSERT ON public.mine FOR EACH ROW EXECUTE FUNCTION public.steal(); "
           "CREATE RULE r AS ON UPDATE TO public.mine DO ALSO "
           "INSERT INTO public.loot SELECT s FROM public.secrets")
    delete(http, account, "creator")
    owner_query(admin_url, account, "INSERT INTO public.mine VALUES (1); UPDATE public.mine SET a = 2")
    assert owner_query(admin_url, account, "SELECT count(*) FROM public.loot") == [(0,)]
    assert owner_query(admin_url, account, "SELECT count(*) FROM pg_rewrite r JOIN pg_class c "
                       "ON c.oid = r.ev_class WHERE c.relname = 'mine'") == [(0,)]
    # the tables stay (CARTO keeps them), owned by the user, without the key's PUBLIC grant
    owned = owner_query(admin_url, account, "SELECT relname, pg_get_userbyid(relowner), "
                        "coalesce(relacl::text, '') FROM pg_class WHERE relname IN ('mine', 'loot') "
                        "ORDER BY relname")
    assert [(name, owner) for name, owner, _ in owned] == [
        ("loot", account.user.owner_role), ("mine", account.user.owner_role)]
    assert all("=r/" not in str(acl) for _, _, acl in owned)  # no grant to PUBLIC survives


def test_another_tenants_large_object_grant_cannot_block_a_deletion(
    http: httpx.Client, account: Account, creator: KeyHandle, admin_url: str,
    make_account: Callable[[], Account],
) -> None:
    other = make_account()
    for grantee in (creator.role, account.user.public_role):
        lo = other.sql(http, "SELECT lo_create(0) AS oid").json()["rows"][0]["oid"]
        granted = other.sql(http, f'GRANT SELECT ON LARGE OBJECT {lo} TO "{grantee}"')
        assert granted.status_code == 200, granted.text
    delete(http, account, "creator")
    assert account.sql(http, "SELECT 1", creator.token).status_code == 401
    assert not role_exists(admin_url, creator.role)


def test_a_temporary_table_held_by_the_key_cannot_block_its_deletion(
    http: httpx.Client, account: Account, creator: KeyHandle, admin_url: str,
) -> None:
    held = creator.connect()
    held.execute("CREATE TEMP TABLE mine (a int); BEGIN; LOCK TABLE pg_temp.mine")
    try:
        delete(http, account, "creator")
        assert account.sql(http, "SELECT 1", creator.token).status_code == 401
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")  # the session was ended
    finally:
        held.close()
    assert not role_exists(admin_url, creator.role)


def test_a_large_object_given_to_a_privilege_role_cannot_block_key_management(
    http: httpx.Client, account: Account, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle],
) -> None:
    owner_sql(account, "CREATE TABLE doomed (a int)")
    reader = make_key(account, "reader", table_grants([("public", "doomed", ["select"])]))
    with reader.connect() as conn:
        privilege_role = conn.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "WHERE m.member = current_user::regrole AND g.rolname ~ '_t[0-9]+_s$'").fetchone()[0]
        lo = conn.execute("SELECT lo_create(0)").fetchone()[0]
        conn.execute(f'ALTER LARGE OBJECT {lo} OWNER TO "{privilege_role}"')
    owner_sql(account, "DROP TABLE doomed")
    created = http.post(account.keys_url, params=account.master(), json={
        "name": "after", "grants": table_grants([], create_schemas=("public",))})
    assert created.status_code == 201, created.text
    delete(http, account, "after")
    delete(http, account, "reader")


def _cli(admin_url: str, crash_at: str, *args: str) -> int:
    env = {**os.environ, "GRANTKEY_SECRET": TEST_SECRET, "GRANTKEY_CRASH_AT": crash_at}
    return subprocess.run([sys.executable, "-m", "grantkey.cli", *args, "--database-url",
                           admin_url], capture_output=True, env=env, timeout=120).returncode


def _fresh(account: Account, token: str) -> int:
    with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
        return client.get(account.sql_url, params={"q": "SELECT 1", "api_key": token}).status_code


@pytest.mark.parametrize(("command", "crash_at"), [
    ("delete", "key.revoked"), ("delete", "key.deleted_before_commit"),
    ("regenerate", "key.regenerated_before_row"),
])
def test_a_cli_killed_right_after_revoking_leaves_no_worker_serving_the_old_token(
    account: Account, creator: KeyHandle, admin_url: str, data_dir: Path, command: str,
    crash_at: str,
) -> None:
    for _ in range(8):  # pooled sessions and cached keys in both workers
        assert _fresh(account, creator.token) == 200
    extra = ["--yes"] if command == "delete" else []
    code = _cli(admin_url, crash_at, "keys", command, account.username, "creator", *extra)
    assert code == -9  # killed where asked
    statuses = [_fresh(account, creator.token) for _ in range(12)]
    if crash_at == "key.deleted_before_commit":  # died before deciding: nothing changed
        assert statuses == [200] * 12
        return
    assert statuses == [401] * 12
    if command == "delete":  # a restart finishes the cleanup the crash left owed
        restarted = ServerProcess(["--database-url", admin_url, "--data-dir", str(data_dir)],
                                  data_dir / "revocation-repair.log",
                                  {"GRANTKEY_SECRET": TEST_SECRET})
        try:
            restarted.wait_healthy()
        finally:
            restarted.stop()
        assert not role_exists(admin_url, creator.role)
        listed = httpx.get(account.keys_url, params=account.master()).json()["result"]
        assert "creator" not in [key["name"] for key in listed]
