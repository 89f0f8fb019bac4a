"""format=geojson against a PostgreSQL that has PostGIS.

The embedded wheel has no PostGIS. These tests start a throwaway cluster with the
system's PostgreSQL 15 binaries when Debian's `postgresql-15-postgis-3` is installed
(`.ci/run` installs it), and skip with the reason otherwise — unless
GRANTKEY_REQUIRE_POSTGIS=1 (set by `.ci/run`), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.services.container import Services
from grantkey.settings import Settings
from tests.support import TEST_SECRET, ServerProcess

# each test starts its own server or cluster: out of the inner loop
pytestmark = pytest.mark.slow

SYSTEM_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGIS_CONTROL = Path("/usr/share/postgresql/15/extension/postgis.control")


@pytest.fixture(scope="module")
def postgis_cluster(data_dir: Path) -> Iterator[str]:
    if not (SYSTEM_BIN / "initdb").exists() or not POSTGIS_CONTROL.exists():
        reason = ("PostGIS is not installed (apt-get install postgresql-15-postgis-3): "
                  "format=geojson tests need it")
        if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = EmbeddedPostgres(data_dir / "postgis15", bin_dir=SYSTEM_BIN)
    cluster.start()
    try:
        yield cluster.superuser_url  # used as an external superuser admin
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def geo(postgis_cluster: str, data_dir: Path) -> Iterator[tuple[str, str]]:
    """A grantkey server on the PostGIS cluster, and one user with a geometry table."""
    settings = Settings(data_dir=data_dir, database_url=postgis_cluster, secret=TEST_SECRET)

    async def create_user() -> str:
        services = Services(settings, postgis_cluster)
        await services.open()
        try:
            return (await services.users.create("geo")).master_token
        finally:
            await services.close()

    token = asyncio.run(create_user())
    with psycopg.connect(postgis_cluster, dbname="grantkey") as conn:
        row = conn.execute("SELECT database FROM users WHERE username = 'geo'").fetchone()
        assert row is not None
        (database,) = row
    with psycopg.connect(postgis_cluster, dbname=database, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(database + "_owner")))
        conn.execute("CREATE TABLE places (id int, name text, the_geom geometry(Point, 4326));"
                     "INSERT INTO places VALUES (1, 'a', ST_SetSRID(ST_MakePoint("
                     "1.123456789, 2.987654321), 4326)), (2, 'b', NULL)")
    server = ServerProcess(["--database-url", postgis_cluster, "--data-dir", str(data_dir)],
                           data_dir / "postgis-server.log", {"GRANTKEY_SECRET": TEST_SECRET})
    try:
        server.wait_healthy()
        yield f"{server.url}/user/geo/api/v2/sql", token
    finally:
        server.stop()


def test_new_user_databases_get_postgis(geo: tuple[str, str]) -> None:
    url, token = geo
    response = httpx.get(url, params={"q": "SELECT postgis_version() AS v", "api_key": token})
    assert response.status_code == 200 and response.json()["rows"][0]["v"]


def test_a_user_database_without_postgis_on_a_server_with_it_is_400_saying_so(
    geo: tuple[str, str], postgis_cluster: str, data_dir: Path,
) -> None:
    settings = Settings(data_dir=data_dir, database_url=postgis_cluster, secret=TEST_SECRET)

    async def users(action: str) -> str:
        services = Services(settings, postgis_cluster)
        await services.open()
        try:
            if action == "create":
                return (await services.users.create("flat")).master_token
            await services.users.delete("flat")
            return ""
        finally:
            await services.close()

    token = asyncio.run(users("create"))
    try:
        with psycopg.connect(postgis_cluster, dbname="grantkey") as conn:
            row = conn.execute("SELECT database FROM users WHERE username = 'flat'").fetchone()
        assert row is not None
        with psycopg.connect(postgis_cluster, dbname=row[0], autocommit=True) as conn:
            conn.execute("DROP EXTENSION postgis")  # as a database made before PostGIS was
        url = geo[0].replace("/user/geo/", "/user/flat/")
        response = httpx.get(url, params={"q": "SELECT 1", "api_key": token, "format": "geojson"})
        assert response.status_code == 400
        assert "this user's database does not have" in response.json()["error"][0]
    finally:
        asyncio.run(users("delete"))


def test_geojson_is_a_feature_collection_with_dp(geo: tuple[str, str]) -> None:
    url, token = geo
    response = httpx.get(url, params={"q": "SELECT * FROM places ORDER BY id", "api_key": token,
                                      "format": "geojson", "dp": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "FeatureCollection"
    first, second = body["features"]
    assert first == {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.123, 2.988]},
                     "properties": {"id": 1, "name": "a"}}
    assert second["geometry"] is None and second["properties"] == {"id": 2, "name": "b"}
    default = httpx.get(url, params={"q": "SELECT * FROM places WHERE id = 1",
                                     "api_key": token, "format": "geojson"}).json()
    assert default["features"][0]["geometry"]["coordinates"] == [1.123457, 2.987654]
    assert response.headers["content-disposition"] == "attachment; filename=cartodb-query.geojson"


def test_geojson_of_a_query_ending_in_a_line_comment(geo: tuple[str, str]) -> None:
    url, token = geo
    response = httpx.get(url, params={"q": "SELECT * FROM places WHERE id = 1 -- one",
                                      "api_key": token, "format": "geojson"})
    assert response.status_code == 200, response.text
    assert [f["properties"]["id"] for f in response.json()["features"]] == [1]


def test_geometry_fields_describe_type_and_srid(geo: tuple[str, str]) -> None:
    url, token = geo
    body = httpx.get(url, params={"q": "SELECT the_geom FROM places", "api_key": token}).json()
    assert body["fields"]["the_geom"] == {"type": "geometry", "wkbtype": "Point", "dims": 2,
                                          "srid": 4326, "pgtype": "geometry"}


def test_geojson_of_a_query_without_the_geom_is_400(geo: tuple[str, str]) -> None:
    url, token = geo
    response = httpx.get(url, params={"q": "SELECT 1 AS x", "api_key": token,
                                      "format": "geojson"})
    assert response.status_code == 400
    assert "the_geom" in response.json()["error"][0]
