"""A data directory made by an earlier release starts with this one and is upgraded:
numbered migrations recorded in the metadata and in the user database, the guard against
key-created code installed, the databases and roles handed to the routine admin (not a
superuser), which then creates and deletes keys; a second start has nothing to do.

Three earlier releases: one from before numbered migrations, one from before the routine
admin (its users already at user migration 5, so only the hand-over is left to do), and the
commit before the quota withheld CREATE (user migrations 7 and 8 over a key with schema
create)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.db.bootstrap import METADATA_MIGRATIONS
from grantkey.db.migrations import USER_LATEST
from grantkey.errors import SetupError
from tests.support import ServerProcess
from tests.upgrade.previous_release import (
    PREVIOUS_RELEASES,
    OldInstallation,
    build,
    release_available,
)

# each test starts its own server or cluster: out of the inner loop
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=PREVIOUS_RELEASES, ids=lambda release: release[:7])
def old(data_dir: Path, request: pytest.FixtureRequest) -> Iterator[OldInstallation]:
    release: str = request.param
    if not release_available(release):
        pytest.fail(f"release {release} is not in this clone's git history (a shallow clone?)")
    made = build(release, data_dir / f"old-{release[:7]}", data_dir / f"old-{release[:7]}-src")
    yield made
    EmbeddedPostgres(made.data_dir).stop()


def serve(old: OldInstallation, name: str) -> ServerProcess:
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    process = ServerProcess(["--data-dir", str(old.data_dir)], old.data_dir.parent / name, env)
    process.wait_healthy(timeout=90)
    return process


def versions(old: OldInstallation, dbname: str, table: str) -> list[int]:
    cluster = EmbeddedPostgres(old.data_dir)
    with psycopg.connect(cluster.superuser_url, dbname=dbname) as conn:
        return [v for (v,) in conn.execute(f"SELECT version FROM {table} ORDER BY version")]


def test_a_data_directory_of_the_previous_release_is_upgraded_at_start(old: OldInstallation) -> None:
    server = serve(old, "upgrade-1.log")
    try:
        base = f"{server.url}/user/{old.username}"
        keys = httpx.get(f"{base}/api/v3/api_keys", params={"api_key": old.master_token})
        assert keys.status_code == 200
        assert "maker" in [k["name"] for k in keys.json()["result"]]
        sql = f"{base}/api/v2/sql"
        rows = httpx.get(sql, params={"q": "SELECT name FROM cities", "api_key": old.key_token})
        assert rows.json()["rows"] == [{"name": "Lima"}]
        # the guard reached the old database: the old key with schema create makes no code
        code = httpx.get(sql, params={"api_key": old.key_token, "q":
                         "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'"})
        assert code.status_code == 403 and "an API key cannot run" in code.text
        made = httpx.get(sql, params={"api_key": old.key_token, "q": "CREATE TABLE t2 (a int)"})
        assert made.status_code == 200
        database = httpx.get(sql, params={"api_key": old.master_token,
                                          "q": "SELECT current_database() AS d"}).json()
        user_database = database["rows"][0]["d"]
        assert versions(old, "grantkey", "public.schema_migrations") == [
            m.version for m in METADATA_MIGRATIONS]
        assert versions(old, user_database, "grantkey_meta.schema_migrations") == list(
            range(1, USER_LATEST + 1))
        # the storage quota's trigger reached the old table
        trigger = httpx.get(sql, params={"api_key": old.master_token, "q":
                            "SELECT count(*) AS n FROM pg_trigger WHERE tgname = "
                            "'grantkey_quota' AND tgrelid = 'public.cities'::regclass"}).json()
        assert trigger["rows"] == [{"n": 1}]
        routine_admin_manages_the_old_user(old, base)
    finally:
        server.stop()
    assert "upgraded 1 user database(s)" in server.log_path.read_text()
    again = serve(old, "upgrade-2.log")
    again.stop()
    assert "upgraded" not in again.log_path.read_text()  # nothing left to do


def routine_admin_manages_the_old_user(old: OldInstallation, base: str) -> None:
    """The server logs in as the routine admin, which can now make and revoke keys of a
    user the superuser made, the old key included."""
    with psycopg.connect(EmbeddedPostgres(old.data_dir).superuser_url) as conn:
        logins = conn.execute("SELECT DISTINCT usename::text FROM pg_stat_activity "
                              "WHERE backend_type = 'client backend' AND usename <> "
                              "current_user AND usename !~ '^gk_'").fetchall()
        superuser = conn.execute("SELECT rolsuper FROM pg_roles "
                                 "WHERE rolname = 'grantkey_app'").fetchone()
    assert logins == [("grantkey_app",)] and superuser == (False,)
    keys, master = f"{base}/api/v3/api_keys", {"api_key": old.master_token}
    grants = [{"type": "apis", "apis": ["sql"]}, {"type": "database", "tables": [
        {"schema": "public", "name": "cities", "permissions": ["select", "insert"]}]}]
    made = httpx.post(keys, params=master, json={"name": "new", "grants": grants})
    assert made.status_code == 201, made.text
    rows = httpx.get(f"{base}/api/v2/sql", params={"q": "SELECT name FROM cities",
                                                    "api_key": made.json()["token"]})
    assert rows.json()["rows"] == [{"name": "Lima"}], rows.text
    for name in ("new", "maker"):
        assert httpx.delete(f"{keys}/{name}", params=master).status_code == 204
    gone = httpx.get(f"{base}/api/v2/sql", params={"q": "SELECT 1", "api_key": old.key_token})
    assert gone.status_code == 401


def test_a_data_directory_of_another_postgresql_major_is_refused(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres(tmp_path / "d")
    cluster.pgdata.mkdir(parents=True)
    (cluster.pgdata / "PG_VERSION").write_text("17\n")
    with pytest.raises(SetupError, match="made by PostgreSQL 17"):
        cluster.start()
