"""A data directory made by the previous release starts with this one and is upgraded:
numbered migrations recorded in the metadata and in the user database, the guard against
key-created code installed, keys still working; a second start has nothing to do."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.errors import SetupError
from tests.support import ServerProcess
from tests.upgrade.previous_release import OldInstallation, build, release_available


@pytest.fixture(scope="module")
def old(data_dir: Path) -> Iterator[OldInstallation]:
    if not release_available():
        pytest.skip("the previous release is not in this clone's git history")
    made = build(data_dir / "old-release", data_dir / "old-release-source")
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
        assert versions(old, "grantkey", "public.schema_migrations") == [1, 2, 3, 4, 5]
        assert versions(old, user_database, "grantkey_meta.schema_migrations") == [
            1, 2, 3, 4, 5]
        # the storage quota's trigger reached the old table
        trigger = httpx.get(sql, params={"api_key": old.master_token, "q":
                            "SELECT count(*) AS n FROM pg_trigger WHERE tgname = "
                            "'grantkey_quota' AND tgrelid = 'public.cities'::regclass"}).json()
        assert trigger["rows"] == [{"n": 1}]
    finally:
        server.stop()
    assert "upgraded 1 user database(s)" in server.log_path.read_text()
    again = serve(old, "upgrade-2.log")
    again.stop()
    assert "upgraded" not in again.log_path.read_text()  # nothing left to do


def test_a_data_directory_of_another_postgresql_major_is_refused(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres(tmp_path / "d")
    cluster.pgdata.mkdir(parents=True)
    (cluster.pgdata / "PG_VERSION").write_text("17\n")
    with pytest.raises(SetupError, match="made by PostgreSQL 17"):
        cluster.start()
