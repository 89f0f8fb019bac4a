"""`grantkey serve` on the embedded PostgreSQL, and the CLI working beside it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.cli.pg_binaries import RECORD, system_candidates
from tests.support import ServerProcess

COMMANDS = [[], ["serve"], ["users"], ["users", "create"], ["users", "list"],
            ["users", "delete"], ["users", "repair"], ["keys"], ["keys", "list"], ["keys", "create"],
            ["keys", "delete"], ["keys", "regenerate"], ["datasets"],
            ["datasets", "privacy"], ["datasets", "list"], ["audit"], ["data"], ["data", "load"],
            ["data", "export"], ["jobs"], ["jobs", "list"], ["jobs", "show"], ["jobs", "cancel"]]


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRANTKEY_")}
    return subprocess.run([sys.executable, "-m", "grantkey.cli", *args, "--data-dir",
                           str(data_dir)], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def embedded_dir(data_dir: Path) -> Iterator[Path]:
    path = data_dir / "embedded-serve"
    yield path
    EmbeddedPostgres(path).stop()


@pytest.fixture(scope="module")
def embedded_server(embedded_dir: Path) -> Iterator[ServerProcess]:
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    process = ServerProcess(["--data-dir", str(embedded_dir)], embedded_dir.parent / "emb.log",
                            env)
    try:
        process.wait_healthy(timeout=60)
        yield process
    finally:
        process.stop()


@pytest.mark.slow  # starts its own server
def test_serve_starts_on_a_fresh_data_dir_with_embedded_postgres(
    embedded_server: ServerProcess, embedded_dir: Path
) -> None:
    health = httpx.get(embedded_server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert EmbeddedPostgres(embedded_dir).is_running()
    secret = embedded_dir / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    hba = (embedded_dir / "pg" / "pg_hba.conf").read_text()
    assert "scram-sha-256" in hba and "host" not in hba.replace("# Written by grantkey", "")


@pytest.mark.slow  # starts its own server
def test_a_second_serve_on_the_same_data_directory_is_refused_and_the_first_keeps_serving(
    embedded_server: ServerProcess, embedded_dir: Path
) -> None:
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    second = ServerProcess(["--data-dir", str(embedded_dir)], embedded_dir.parent / "emb-2nd.log",
                           env)
    try:
        code = second.process.wait(60)
    finally:
        second.stop()
    log = second.log_path.read_text()
    assert code == 1 and "another `grantkey serve` (pid" in log, log
    assert str(embedded_server.process.pid) in log
    assert "Traceback" not in log
    assert EmbeddedPostgres(embedded_dir).is_running()
    assert httpx.get(embedded_server.url + "/health").status_code == 200


@pytest.mark.slow  # starts its own server
def test_the_server_works_as_a_routine_admin_that_is_not_a_superuser(
    embedded_server: ServerProcess, embedded_dir: Path
) -> None:
    """Key creation, SQL and revocation on a served embedded cluster: every session the
    server holds afterwards is the routine admin's or a key role's, never the superuser's."""
    created = cli("users", "create", "routine-user", "--json", data_dir=embedded_dir)
    assert created.returncode == 0, created.stderr
    master = {"api_key": json.loads(created.stdout)["master_token"]}
    base = f"{embedded_server.url}/user/routine-user"
    try:
        made = httpx.post(f"{base}/api/v3/api_keys", params=master, json={
            "name": "k", "grants": [{"type": "apis", "apis": ["sql"]}]})
        assert made.status_code == 201, made.text
        rows = httpx.get(f"{base}/api/v2/sql", params={"q": "SELECT 1 AS a",
                                                        "api_key": made.json()["token"]})
        assert rows.json()["rows"] == [{"a": 1}]
        assert httpx.delete(f"{base}/api/v3/api_keys/k", params=master).status_code == 204
        with psycopg.connect(EmbeddedPostgres(embedded_dir).superuser_url) as conn:
            logins = {name for (name,) in conn.execute(
                "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE backend_type = "
                "'client backend' AND pid <> pg_backend_pid()")}
            routine = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                                   "WHERE rolname = 'grantkey_app'").fetchone()
    finally:
        assert cli("users", "delete", "routine-user", "--yes",
                   data_dir=embedded_dir).returncode == 0
    assert routine == (False, True, True)
    assert "grantkey_app" in logins
    assert {name for name in logins if not name.startswith("gk_")} == {"grantkey_app"}, logins


@pytest.mark.slow  # starts its own server
def test_serve_runs_a_postgresql_with_postgis_when_the_machine_has_one(
    embedded_server: ServerProcess, embedded_dir: Path
) -> None:
    """A fresh data directory gets the system's PostgreSQL with PostGIS (CI installs it:
    GRANTKEY_REQUIRE_POSTGIS=1), records it, says so at start and in /health, and a new
    user's key runs PostGIS SQL; without one, the wheel's, said just as plainly."""
    with_postgis = [b for b in system_candidates() if b.postgis]
    if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1":
        assert with_postgis, "CI installs postgresql-15-postgis-3"
    log = embedded_server.log_path.read_text()
    health = httpx.get(embedded_server.url + "/health").json()
    if not with_postgis:
        assert "no PostGIS (Debian/Ubuntu: apt-get install postgresql-15-postgis-3" in log
        assert health["postgis"] is False
        return
    newest = with_postgis[0]
    assert f"PostgreSQL {newest.major} from {newest.bin}: PostGIS available" in log
    assert health["postgis"] is True
    assert (embedded_dir / RECORD).read_text().strip() == str(newest.bin)
    assert (embedded_dir / "pg" / "PG_VERSION").read_text().strip() == newest.major
    created = cli("users", "create", "mapper", "--json", data_dir=embedded_dir)
    assert created.returncode == 0, created.stderr
    try:
        point = httpx.get(f"{embedded_server.url}/user/mapper/api/v2/sql", params={
            "q": "SELECT ST_AsText(ST_MakePoint(1, 2)) AS p",
            "api_key": json.loads(created.stdout)["master_token"]})
        assert point.status_code == 200, point.text
        assert point.json()["rows"] == [{"p": "POINT(1 2)"}]
    finally:
        assert cli("users", "delete", "mapper", "--yes", data_dir=embedded_dir).returncode == 0


@pytest.mark.slow  # starts its own server
def test_cli_works_while_the_server_runs_and_serve_restarts_keep_data(
    embedded_server: ServerProcess, embedded_dir: Path
) -> None:
    created = cli("users", "create", "cli-user", "--json", data_dir=embedded_dir)
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert document["username"] == "cli-user" and document["master_token"].startswith("gkm")
    url = f"{embedded_server.url}/user/cli-user/api/v3/api_keys"
    token = document["master_token"]
    assert httpx.get(url, params={"api_key": token}).json()["total"] == 2

    listed = cli("users", "list", "--json", data_dir=embedded_dir)
    assert [u["username"] for u in json.loads(listed.stdout)] == ["cli-user"]

    made = cli("keys", "create", "cli-user", "reader", "--api", "sql", "--json",
               data_dir=embedded_dir)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert httpx.get(f"{url}/reader", params={"api_key": key["token"]}).status_code == 200
    regenerated = cli("keys", "regenerate", "cli-user", "reader", "--json", data_dir=embedded_dir)
    new_token = json.loads(regenerated.stdout)["token"]
    assert httpx.get(f"{url}/reader", params={"api_key": key["token"]}).status_code == 401
    keys = json.loads(cli("keys", "list", "cli-user", "--json", data_dir=embedded_dir).stdout)
    assert [k["name"] for k in keys] == ["Master", "Default public", "reader"]
    missing = cli("datasets", "privacy", "cli-user", "nope", "public", data_dir=embedded_dir)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        "error: Dataset not found: public.nope")
    missing = cli("keys", "delete", "cli-user", "nope", "--yes", data_dir=embedded_dir)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no API key named 'nope'"
    missing = cli("keys", "list", "nobody", data_dir=embedded_dir)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no user named 'nobody'"
    assert cli("keys", "delete", "cli-user", "reader", data_dir=embedded_dir).returncode == 2
    assert cli("keys", "delete", "cli-user", "reader", "--yes",
               data_dir=embedded_dir).returncode == 0
    assert httpx.get(f"{url}/reader", params={"api_key": new_token}).status_code == 401

    assert embedded_server.stop(signal.SIGTERM) == 0
    assert not EmbeddedPostgres(embedded_dir).is_running(), "SIGTERM must stop PostgreSQL too"
    again = ServerProcess(["--data-dir", str(embedded_dir)], embedded_dir.parent / "emb2.log",
                          {k: "" for k in os.environ if k.startswith("GRANTKEY_")})
    try:
        again.wait_healthy(timeout=60)
        url = f"{again.url}/user/cli-user/api/v3/api_keys"
        assert httpx.get(url, params={"api_key": token}).json()["total"] == 2
        deleted = cli("users", "delete", "cli-user", "--yes", data_dir=embedded_dir)
        assert deleted.returncode == 0, deleted.stderr
    finally:
        assert again.stop(signal.SIGINT) == 0
    assert not EmbeddedPostgres(embedded_dir).is_running(), "SIGINT must stop PostgreSQL too"


@pytest.mark.parametrize("name", ["Alice", "-x", "a_b", "a" * 64, "..", "a b", "ü", ""])
def test_users_create_refuses_bad_usernames_with_exit_code_2(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", "users", "create", "--data-dir",
         str(tmp_path / "unused"), "--", name], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid username" in result.stderr
    assert not (tmp_path / "unused" / "pg").exists(), "nothing is started for bad input"


def test_users_delete_needs_yes(tmp_path: Path) -> None:
    result = cli("users", "delete", "someone", data_dir=tmp_path)
    assert result.returncode == 2 and "--yes" in result.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "grantkey")
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "grantkey.cli", *command, "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage:" in result.stdout
    assert len(result.stdout.splitlines()) > 3


@pytest.mark.parametrize("command", [["users", "list"], ["users", "create", "bob"],
                                     ["keys", "list", "bob"], ["datasets", "list", "bob"]])
def test_a_mistyped_data_dir_is_refused_and_creates_nothing(
    command: list[str], tmp_path: Path,
) -> None:
    typo = tmp_path / "grantkey-dta"
    result = cli(*command, data_dir=typo)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: {typo} holds no grantkey data directory: check --data-dir (or "
        "GRANTKEY_DATA_DIR), or run `grantkey serve` once to create it there")
    assert not (typo / "pg").exists()


@pytest.mark.parametrize("command", [["users", "list"], ["serve", "--port", "0"]])
def test_an_unreachable_database_url_prints_one_line(command: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRANTKEY_")}
    env["GRANTKEY_SECRET"] = "c" * 64
    result = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", *command, "--data-dir", str(tmp_path),
         "--database-url", "host=127.0.0.1 port=1 user=nobody dbname=nowhere"],
        capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: PostgreSQL is unavailable: connection failed"), lines
    assert "Connection refused" in lines[-1] and "Traceback" not in result.stderr


def test_keys_create_refuses_grants_mixed_with_other_grant_options(tmp_path: Path) -> None:
    result = cli("keys", "create", "bob", "k", "--grants", '[{"type":"apis","apis":["sql"]}]',
                 "--api", "maps", data_dir=tmp_path)
    assert result.returncode == 2
    assert "--grants is the whole grants array" in result.stderr


@pytest.mark.slow  # starts its own server
def test_a_cli_command_never_stops_the_postgresql_of_a_running_server(tmp_path: Path) -> None:
    """While a server holds the data directory (it may be restarting PostgreSQL), a CLI
    command that found PostgreSQL stopped starts it and leaves it running."""
    import fcntl

    home = tmp_path / "held"
    cluster = EmbeddedPostgres(home)
    cluster.start()
    cluster.stop()
    with (home / "serve.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `grantkey serve` does
        try:
            listed = cli("users", "list", "--json", data_dir=home)
            assert listed.returncode == 0, listed.stderr
            assert cluster.is_running(), "the CLI stopped the server's PostgreSQL"
        finally:
            cluster.stop()
    listed = cli("users", "list", "--json", data_dir=home)  # no server: started and stopped
    assert listed.returncode == 0 and not cluster.is_running()
