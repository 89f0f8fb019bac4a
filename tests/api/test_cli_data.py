"""`grantkey data load` and `grantkey data export`: files in and out of a user's tables
through COPY, as the master or as a key, all or nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import psycopg
import pytest

from tests.conftest import Account, KeyHandle, Login
from tests.support import table_grants


def cli(login: Login, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grantkey.cli", *args, *login.args(data_dir)],
                          capture_output=True, text=True, env={**os.environ, **login.env},
                          timeout=120)


def owner_rows(admin_url: str, account: Account, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        return conn.execute(query.encode()).fetchall()


def column_types(admin_url: str, account: Account, table: str) -> list[tuple[object, ...]]:
    return owner_rows(admin_url, account, f"""
        SELECT column_name, CASE WHEN data_type = 'USER-DEFINED' THEN udt_name ELSE data_type END
        FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position""")


CITIES = ("name,population,area,capital,founded\n"
          "Lima,10000000,2672.3,true,1535-01-18\n"
          "\"Quito, DM\",2800000,372,true,\n"
          "Cusco,,385.1,false,1100\n")


def test_load_a_csv_with_create_guesses_the_types_and_loads_every_row(
        login: Login, data_dir: Path, account: Account, admin_url: str, tmp_path: Path) -> None:
    path = tmp_path / "cities.csv"
    path.write_text(CITIES)
    done = cli(login, data_dir, "data", "load", account.username, "cities", str(path), "--create")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"loaded 3 rows into public.cities from {path} in ")
    assert "loading cities.csv:" in done.stderr
    assert column_types(admin_url, account, "cities") == [
        ("name", "text"), ("population", "bigint"), ("area", "double precision"),
        ("capital", "boolean"), ("founded", "text")]
    assert owner_rows(admin_url, account, "SELECT * FROM cities ORDER BY name") == [
        ("Cusco", None, 385.1, False, "1100"), ("Lima", 10000000, 2672.3, True, "1535-01-18"),
        ("Quito, DM", 2800000, 372.0, True, None)]


def test_load_with_create_and_a_bad_row_leaves_no_table(
        login: Login, data_dir: Path, account: Account, admin_url: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("name,population\n" + "".join(f"c{i},{i}\n" for i in range(1500))
                    + "Lima,many\n")  # past the sampled rows: the column is bigint
    done = cli(login, data_dir, "data", "load", account.username, "cities", str(path), "--create")
    assert done.returncode == 1, done.stdout
    assert done.stderr.splitlines()[-1] == 'error: invalid input syntax for type bigint: "many"'
    assert done.stderr.splitlines()[-2].startswith("loading bad.csv: ")
    assert owner_rows(admin_url, account,
                      "SELECT to_regclass('public.cities') IS NULL") == [(True,)]


def test_load_as_a_key_uses_its_rights(
        login: Login, data_dir: Path, account: Account, tmp_path: Path,
        owner_sql: Callable[[Account, str], None], make_key: Callable[..., KeyHandle],
        admin_url: str) -> None:
    owner_sql(account, "CREATE TABLE cities (name text, population int, area float, "
                       "capital bool, founded text); CREATE TABLE other (name text)")
    loader = make_key(account, "loader", table_grants([("public", "cities", ["insert"])]))
    path = tmp_path / "cities.csv"
    path.write_text(CITIES)
    done = cli(login, data_dir, "data", "load", account.username, "cities", str(path),
               "--key", loader.token)
    assert done.returncode == 0, done.stderr
    other = tmp_path / "other.csv"
    other.write_text("name\nx\n")
    refused = cli(login, data_dir, "data", "load", account.username, "other", str(other),
                  "--key", loader.token)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == "error: permission denied for table other"
    unknown = cli(login, data_dir, "data", "load", account.username, "other", str(other),
                  "--key", "gkr" + "x" * 38)
    assert (unknown.returncode, unknown.stderr.strip()) == (
        2, "error: --key is not a key of this user")
    assert owner_rows(admin_url, account, "SELECT count(*) FROM other") == [(0,)]


@pytest.mark.usefixtures("postgis")
def test_load_a_geojson_with_create_makes_the_geom_and_typed_properties(
        login: Login, data_dir: Path, account: Account, admin_url: str, tmp_path: Path) -> None:
    document = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [-77.03, -12.05]},
         "properties": {"name": "Lima", "population": 10000000, "tags": ["coast"]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [1, 0], [1, 1], [0, 0]]]},
         "properties": {"name": "Block \"A\"", "population": 2.5, "extra": True}},
        {"type": "Feature", "geometry": None, "properties": {"name": None}}]}
    path = tmp_path / "places.geojson"
    path.write_bytes(orjson.dumps(document))
    done = cli(login, data_dir, "data", "load", account.username, "places", str(path), "--create")
    assert done.returncode == 0, done.stderr
    assert "loaded 3 rows into public.places" in done.stdout
    assert column_types(admin_url, account, "places") == [
        ("the_geom", "geometry"), ("name", "text"), ("population", "double precision"),
        ("tags", "jsonb"), ("extra", "boolean")]
    assert owner_rows(admin_url, account, """
        SELECT ST_AsEWKT(the_geom), name, population, tags::text, extra FROM places
        ORDER BY name NULLS LAST""") == [
        ("SRID=4326;POLYGON((0 0,1 0,1 1,0 0))", 'Block "A"', 2.5, None, True),
        ("SRID=4326;POINT(-77.03 -12.05)", "Lima", 10000000.0, '["coast"]', None),
        (None, None, None, None, None)]


def test_export_a_query_and_a_table_to_csv_files_and_standard_output(
        login: Login, data_dir: Path, account: Account, tmp_path: Path,
        owner_sql: Callable[[Account, str], None]) -> None:
    owner_sql(account, "CREATE TABLE cities (name text, population int);"
                       "INSERT INTO cities VALUES ('Lima', 10), ('Quito', NULL)")
    out = tmp_path / "out.csv"
    done = cli(login, data_dir, "data", "export", account.username, str(out),
               "--query", "SELECT name FROM cities WHERE population IS NOT NULL")
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "name\nLima\n"
    assert done.stdout.startswith(f"exported 1 rows (0.0 MiB) to {out} in ")
    whole = cli(login, data_dir, "data", "export", account.username, "-", "--table", "cities")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == "name,population\nLima,10\nQuito,\n"
    assert "exported 2 rows" in whole.stderr


def test_export_that_fails_leaves_no_file(login: Login, data_dir: Path, account: Account,
                                          tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    done = cli(login, data_dir, "data", "export", account.username, str(out),
               "--query", "SELECT 1 / 0")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: division by zero"
    assert list(tmp_path.iterdir()) == []
    both = cli(login, data_dir, "data", "export", account.username, str(out),
               "--query", "SELECT 1", "--table", "t")
    assert (both.returncode, both.stderr.strip()) == (
        2, "error: give exactly one of --query and --table")
