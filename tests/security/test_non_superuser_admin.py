"""grantkey on a PostgreSQL whose admin role is not a superuser (managed PostgreSQL): a role
with CREATEDB, CREATEROLE and pg_signal_backend. What needs a superuser (the guard against
key-created code, closing large objects, PostGIS) is skipped and schema create grants are
refused; everything else holds, attacks included. On the wheel's PostgreSQL 18 (where
the admin makes key roles through per-user manager roles) and on the system's
PostgreSQL 15 (where CREATEROLE administers every role that is not a superuser)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from grantkey.cli.embedded import EmbeddedPostgres
from tests.support import TEST_SECRET, ServerProcess, table_grants

ROLE, PASSWORD = "gk_test_admin", "managed-admin-password-0123456789"
SYSTEM_15 = Path("/usr/lib/postgresql/15/bin")
NO_GUARD = ("Grants schema create is not available on this server: keys that create tables "
            "need a guard against creating code, which only a PostgreSQL superuser can install")


@pytest.fixture(scope="module", params=["pg18-wheel", "pg15-system"])
def cluster(data_dir: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedPostgres]:
    """A cluster of its own, where grantkey's metadata is made by the managed admin."""
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        pytest.skip("needs a private cluster (runs on the embedded one)")
    bin_dir = None
    if request.param == "pg15-system":
        if not (SYSTEM_15 / "initdb").exists():
            reason = "PostgreSQL 15 is not installed (apt-get install postgresql-15)"
            if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1":  # CI installs it
                pytest.fail(reason)
            pytest.skip(reason)
        bin_dir = SYSTEM_15
    private = EmbeddedPostgres(data_dir / f"managed-{request.param}", bin_dir=bin_dir)
    private.start()
    yield private
    private.stop()


@pytest.fixture(scope="module")
def admin_url(cluster: EmbeddedPostgres) -> str:
    """The private cluster's superuser (the provider's, not grantkey's)."""
    return cluster.superuser_url


@pytest.fixture(scope="module")
def managed_url(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {ROLE} LOGIN CREATEDB CREATEROLE PASSWORD '{PASSWORD}'")
        conn.execute(f"GRANT pg_signal_backend TO {ROLE}")
    params = conninfo_to_dict(admin_url)
    params.update(user=ROLE, password=PASSWORD)
    return make_conninfo("", **params)


@pytest.fixture(scope="module")
def managed(managed_url: str, cluster: EmbeddedPostgres) -> Iterator[ServerProcess]:
    home = cluster.pgdata.parent / "home"
    home.mkdir(exist_ok=True)
    server = ServerProcess(["--database-url", managed_url, "--data-dir", str(home)],
                           home.parent / "managed.log", {"GRANTKEY_SECRET": TEST_SECRET})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def cli(managed_url: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", *args, "--database-url", managed_url],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "GRANTKEY_SECRET": TEST_SECRET})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_non_superuser_admin_serves_users_and_keys_and_revokes_them(
    managed: ServerProcess, managed_url: str, admin_url: str,
) -> None:
    server = managed
    user = json.loads(cli(managed_url, "users", "create", "managed-alice", "--json"))
    master = user["master_token"]
    base = f"{server.url}/user/managed-alice"
    sql, keys = f"{base}/api/v2/sql", f"{base}/api/v3/api_keys"
    with httpx.Client(timeout=30) as http:
        assert http.get(sql, params={"api_key": master, "q": "CREATE TABLE cities (name text); "
                        "INSERT INTO cities VALUES ('Lima')"}).status_code == 200
        refused = http.post(keys, params={"api_key": master}, json={
            "name": "maker", "grants": table_grants([], create_schemas=("public",))})
        assert refused.status_code == 422 and refused.json()["errors"].endswith(NO_GUARD)
        made = http.post(keys, params={"api_key": master}, json={
            "name": "reader", "grants": table_grants([("public", "cities", ["select"])])})
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        rows = http.get(sql, params={"api_key": token, "q": "SELECT name FROM cities"})
        assert rows.json()["rows"] == [{"name": "Lima"}]
        regenerated = http.post(f"{keys}/reader/token/regenerate", params={"api_key": master})
        assert regenerated.status_code == 200, regenerated.text
        assert http.get(sql, params={"api_key": token, "q": "SELECT 1"}).status_code == 401
        token = regenerated.json()["token"]
        assert http.delete(f"{keys}/reader", params={"api_key": master}).status_code == 204
        assert http.get(sql, params={"api_key": token, "q": "SELECT 1"}).status_code == 401
    with psycopg.connect(admin_url, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname ~ %s",
                            [f"^gk_{user['database'][3:]}_k"]).fetchone()
        assert left == (0,)
    cli(managed_url, "users", "delete", "managed-alice", "--yes")


def test_attacks_hold_with_a_non_superuser_admin(
    managed: ServerProcess, managed_url: str, admin_url: str,
) -> None:
    """Planted code never runs on the admin's connections; another tenant's large-object
    grant (large objects stay open without a superuser) cannot block a deletion."""
    victim = json.loads(cli(managed_url, "users", "create", "managed-bob", "--json"))
    other = json.loads(cli(managed_url, "users", "create", "managed-eve", "--json"))
    base = f"{managed.url}/user/managed-bob"
    sql, keys = f"{base}/api/v2/sql", f"{base}/api/v3/api_keys"
    eve_sql = f"{managed.url}/user/managed-eve/api/v2/sql"
    master = {"api_key": victim["master_token"]}
    with httpx.Client(timeout=30) as http:
        planted = http.get(sql, params={**master, "q": (
            "CREATE TABLE public.trap_log (who text); GRANT INSERT ON public.trap_log TO PUBLIC;"
            "CREATE FUNCTION public.starts_with(a name, b text) RETURNS boolean LANGUAGE plpgsql "
            "AS $$BEGIN INSERT INTO public.trap_log VALUES (session_user); "
            "RETURN pg_catalog.starts_with(a::text, b); END$$;"
            "CREATE TABLE cities (name text)")})
        assert planted.status_code == 200, planted.text
        made = http.post(keys, params=master, json={
            "name": "reader", "grants": table_grants([("public", "cities", ["select"])])})
        assert made.status_code == 201, made.text
        role_name = http.get(sql, params={"api_key": made.json()["token"],
                                          "q": "SELECT current_user AS r"}).json()["rows"][0]["r"]
        lo = http.get(eve_sql, params={"api_key": other["master_token"],
                                       "q": "SELECT lo_create(0) AS oid"}).json()["rows"][0]["oid"]
        granted = http.get(eve_sql, params={"api_key": other["master_token"],
                                            "q": f'GRANT SELECT ON LARGE OBJECT {lo} TO "{role_name}"'})
        assert granted.status_code == 200, granted.text
        assert http.get(keys, params=master).status_code == 200
        assert http.delete(f"{keys}/reader", params=master).status_code == 204
        logged = http.get(sql, params={**master, "q": "SELECT count(*) AS n FROM trap_log"})
        assert logged.json()["rows"] == [{"n": 0}]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                            [role_name]).fetchone() is None
    cli(managed_url, "users", "delete", "managed-bob", "--yes")
    cli(managed_url, "users", "delete", "managed-eve", "--yes")


def test_another_tenants_database_grant_cannot_keep_a_deleted_users_roles_alive(
    managed: ServerProcess, managed_url: str, admin_url: str,
) -> None:
    """`GRANT CONNECT ON DATABASE` (a grant on a shared object, recorded with no database)
    from another tenant to each of a user's roles, the manager roles included (which the
    admin may SET ROLE to but does not inherit): deleting the user still drops them all."""
    victim = json.loads(cli(managed_url, "users", "create", "managed-victim", "--json"))
    other = json.loads(cli(managed_url, "users", "create", "managed-intruder", "--json"))
    prefix = f"gk_{victim['database'][3:]}_"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        roles = [name for (name,) in conn.execute(
            "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, %s)", [prefix])]
    with psycopg.connect(admin_url) as conn:
        if conn.info.server_version >= 160000:
            assert f"{prefix}maker" in roles and f"{prefix}granter" in roles, roles
    grantees = ", ".join(f'"{role}"' for role in roles)
    granted = httpx.get(f"{managed.url}/user/managed-intruder/api/v2/sql", params={
        "api_key": other["master_token"],
        "q": f'GRANT CONNECT, TEMPORARY ON DATABASE "{other["database"]}" TO {grantees}'})
    assert granted.status_code == 200, granted.text
    deleted = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", "users", "delete", "managed-victim", "--yes",
         "--database-url", managed_url], capture_output=True, text=True, timeout=60,
        env={**os.environ, "GRANTKEY_SECRET": TEST_SECRET})
    with psycopg.connect(admin_url, autocommit=True) as conn:
        left = conn.execute("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, %s)",
                            [prefix]).fetchall()
    assert deleted.returncode == 0 and left == [], (left, deleted.stderr)
    cli(managed_url, "users", "delete", "managed-intruder", "--yes")


def test_a_superuser_url_lets_a_non_superuser_admin_install_the_guard(
    managed: ServerProcess, managed_url: str, admin_url: str,
) -> None:
    """GRANTKEY_SUPERUSER_URL: the CLI installs the guard (and closes large objects) as the
    superuser; everything else still runs as the non-superuser admin."""
    result = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", "users", "create", "managed-carol", "--json",
         "--database-url", managed_url], capture_output=True, text=True, timeout=60,
        env={**os.environ, "GRANTKEY_SECRET": TEST_SECRET, "GRANTKEY_SUPERUSER_URL": admin_url})
    assert result.returncode == 0, result.stderr
    master = {"api_key": json.loads(result.stdout)["master_token"]}
    base = f"{managed.url}/user/managed-carol"
    with httpx.Client(timeout=30) as http:
        made = http.post(f"{base}/api/v3/api_keys", params=master, json={
            "name": "maker", "grants": table_grants([], create_schemas=("public",))})
        assert made.status_code == 201, made.text
        code = http.get(f"{base}/api/v2/sql", params={
            "api_key": made.json()["token"],
            "q": "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'"})
        assert code.status_code == 403 and "an API key cannot run" in code.text
        lo = http.get(f"{base}/api/v2/sql", params={**master, "q": "SELECT lo_create(0)"})
        assert lo.status_code == 403
        assert http.delete(f"{base}/api/v3/api_keys/maker", params=master).status_code == 204
    cli(managed_url, "users", "delete", "managed-carol", "--yes")


@pytest.mark.slow  # starts its own server
def test_a_storage_quota_without_a_superuser_stops_the_start_with_a_clear_message(
    managed_url: str, cluster: EmbeddedPostgres,
) -> None:
    """Its triggers need a superuser: rather than a quota that does not hold, no start."""
    home = cluster.pgdata.parent / "quota-home"
    home.mkdir(exist_ok=True)
    server = ServerProcess(["--database-url", managed_url, "--data-dir", str(home)],
                           home.parent / "managed-quota.log",
                           {"GRANTKEY_SECRET": TEST_SECRET, "GRANTKEY_STORAGE_QUOTA": "1GB"})
    try:
        server.process.wait(60)
    finally:
        server.stop()
    assert server.process.returncode != 0
    log = server.log_path.read_text()
    assert "GRANTKEY_STORAGE_QUOTA needs a PostgreSQL superuser" in log, log[-2000:]
