"""Maps API (carto-compat §8) over HTTP: making layergroups, their vector tiles (decoded with
a real MVT decoder), every error's message and status, JSONP, headers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import httpx
import mapbox_vector_tile  # type: ignore[import-untyped]
import psycopg
import pytest

from grantkey.services.container import Services
from tests.conftest import Account, KeyHandle
from tests.support import ServerProcess, apis_only, table_grants

pytestmark = pytest.mark.in_process

# lon/lat -> where the point lands in the zoom-0 tile (extent 4096, y down)
SETUP = """
CREATE TABLE places (id int PRIMARY KEY, name text, n numeric, f float8, b boolean,
                     founded date, seen timestamptz, tags text[], doc jsonb, nothing text,
                     the_geom geometry(Point, 4326), the_geom_webmercator geometry(Point, 3857));
INSERT INTO places (id, name, n, f, b, founded, seen, tags, doc, the_geom) VALUES
  (1, 'centre', 10.5, 0.25, true, '1535-01-18', '2020-01-02 03:04:05+00', '{a,b}',
   '{"k": [1, 2]}', ST_SetSRID(ST_MakePoint(0, 0), 4326)),
  (2, 'east', 3, -1.5, false, NULL, NULL, NULL, NULL, ST_SetSRID(ST_MakePoint(90, 0), 4326)),
  (3, 'north-west', 7, 2, NULL, NULL, NULL, NULL, NULL,
   ST_SetSRID(ST_MakePoint(-90, 66.51326044311186), 4326));
UPDATE places SET the_geom_webmercator = ST_Transform(the_geom, 3857);
CREATE INDEX ON places USING gist (the_geom_webmercator);
CREATE TABLE lines (id int, the_geom_webmercator geometry(LineString, 3857));
CREATE TABLE secrets (id int, the_geom_webmercator geometry(Point, 3857));
INSERT INTO secrets VALUES (1, ST_SetSRID(ST_MakePoint(0, 0), 3857));
"""


@pytest.fixture
def geo(postgis: None, account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, SETUP)
    owner_sql(account, f'GRANT SELECT ON places, lines TO "{account.user.public_role}"')
    return account


def maps_url(account: Account) -> str:
    return f"{account.base_url}/user/{account.username}/api/v1/map"


def layer(sql: str, **options: Any) -> dict[str, Any]:
    return {"type": "mapnik", "options": {"sql": sql, **options}}


def create(http: httpx.Client, account: Account, config: dict[str, Any],
           token: str | None = None) -> httpx.Response:
    params = {} if token is None else {"api_key": token}
    return http.post(maps_url(account), json=config, params=params)


def made(http: httpx.Client, account: Account, config: dict[str, Any],
         token: str | None = None) -> str:
    response = create(http, account, config, token)
    assert response.status_code == 200, response.text
    layergroupid: str = response.json()["layergroupid"]
    return layergroupid


def tile(http: httpx.Client, account: Account, lgid: str, zxy: str, token: str | None = None,
         layers: str | None = None) -> httpx.Response:
    path = f"{maps_url(account)}/{lgid}/" + ("" if layers is None else f"{layers}/") + zxy
    return http.get(path, params={} if token is None else {"api_key": token})


def decode(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-protobuf"
    decoded: dict[str, Any] = mapbox_vector_tile.decode(
        response.content, default_options={"y_coord_down": True})
    return decoded


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert list(body) == ["errors", "errors_with_context"]
    assert body["errors_with_context"][0]["message"] == body["errors"][0]
    return body


ALL_PLACES = {"layers": [layer("SELECT * FROM places")]}


# -- creating a layergroup -------------------------------------------------------------

def test_create_post_200_shape(http: httpx.Client, geo: Account) -> None:
    config = {"version": "1.3.0", "layers": [
        {"type": "mapnik", "id": "cities", "options": {"sql": "SELECT * FROM places"}},
        layer("SELECT * FROM lines")]}
    response = create(http, geo, config, geo.master_token)
    assert response.status_code == 200
    body = response.json()
    lgid = body["layergroupid"]
    assert re.fullmatch(r"0[0-9a-f]{39}:[0-9]+", lgid)
    assert response.headers["x-layergroup-id"] == lgid
    assert "X-Layergroup-Id" in response.headers["access-control-expose-headers"]
    base = f"{maps_url(geo)}/{lgid}"
    metadata = body["metadata"]
    assert [entry["id"] for entry in metadata["layers"]] == ["cities", "layer1"]
    assert metadata["layers"][1]["type"] == "mapnik" and metadata["layers"][1]["meta"] == {}
    vector = metadata["layers"][1]["tilejson"]["vector"]
    assert vector["tilejson"] == "2.2.0"
    assert vector["tiles"][0].startswith(f"{base}/1/{{z}}/{{x}}/{{y}}.mvt")
    assert metadata["tilejson"]["vector"]["tiles"][0].startswith(f"{base}/{{z}}/{{x}}/{{y}}.mvt")
    assert metadata["url"]["vector"]["urlTemplate"] == metadata["tilejson"]["vector"]["tiles"][0]
    assert metadata["url"]["vector"]["subdomains"] == []
    assert metadata["dataviews"] == {} and metadata["analyses"] == []
    assert "cdn_url" not in body
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["last_updated"])


def test_layergroupid_shape(http: httpx.Client, geo: Account, make_key: Callable[..., KeyHandle]
                            ) -> None:
    """The SDK joins tile paths with urljoin: the id must not read as a URL scheme. The same
    config made by the same role is the same layergroup; another role's is another."""
    first = made(http, geo, ALL_PLACES, geo.master_token)
    again = made(http, geo, ALL_PLACES, geo.master_token)
    public = made(http, geo, ALL_PLACES)
    assert first == again and first.split(":")[0] != public.split(":")[0]
    base = maps_url(geo) + "/"
    assert urljoin(base, first + "/0/0/0.mvt") == f"{base}{first}/0/0/0.mvt"


def test_create_get_with_config(http: httpx.Client, geo: Account) -> None:
    response = http.get(maps_url(geo), params={"config": json.dumps(ALL_PLACES)})
    assert response.status_code == 200
    assert response.json()["layergroupid"] == made(http, geo, ALL_PLACES)


def test_create_carto_js_analyses_form(http: httpx.Client, geo: Account) -> None:
    config = {"layers": [{"type": "mapnik", "id": "L", "options": {"source": {"id": "a0"}}}],
              "analyses": [{"id": "a0", "type": "source",
                            "params": {"query": "SELECT * FROM places WHERE id = 2"}}]}
    lgid = made(http, geo, config)
    features = decode(tile(http, geo, lgid, "0/0/0.mvt"))["L"]["features"]
    assert [f["properties"]["name"] for f in features] == ["east"]


def test_create_tolerates_sdk_extra_keys(http: httpx.Client, geo: Account) -> None:
    config = {**ALL_PLACES, "api_key": geo.master_token, "client": "carto-python-sdk"}
    assert made(http, geo, config) != ""


@pytest.mark.parametrize(("send", "message"), [
    (lambda http, url: http.get(url), 'layergroup GET needs a "config" parameter'),
    (lambda http, url: http.post(url, content=json.dumps(ALL_PLACES),
                                 headers={"content-type": "text/plain"}),
     "POST data must be of type application/json"),
    (lambda http, url: http.post(url, content=b"{not json",
                                 headers={"content-type": "application/json"}),
     "The request body is not valid JSON"),
    (lambda http, url: http.post(url, json={"version": "1.0.0"}),
     "Missing layers array from layergroup config"),
    (lambda http, url: http.post(url, json={"layers": []}),
     "Missing layers array from layergroup config"),
    (lambda http, url: http.post(url, json={"layers": [{"type": "mapnik"}]}),
     "Missing options from layer 0 of layergroup config"),
    (lambda http, url: http.post(url, json={"version": "1.9.0", **ALL_PLACES}),
     "Unsupported layergroup configuration version 1.9.0"),
    (lambda http, url: http.post(url, json={"layers": [{"type": "mapnik", "options": {}}]}),
     "Missing sql for layer 0 options"),
    (lambda http, url: http.post(url, json={"layers": [layer("SELECT 1", cartocss="#l{}")]}),
     "Layer 0 asks for raster tiles (cartocss): grantkey serves vector tiles only (.mvt); "
     "remove cartocss from the layer's options"),
])
def test_create_bad_config_400(http: httpx.Client, geo: Account, send: Any, message: str) -> None:
    body = error_of(send(http, maps_url(geo)), 400)
    assert body["errors"] == [message]
    assert body["errors_with_context"][0]["type"] == "unknown"


def test_create_jsonp_error_is_200(http: httpx.Client, geo: Account) -> None:
    response = http.get(maps_url(geo), params={"callback": "cb"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.text.startswith("cb(") and response.text.endswith(");")
    assert json.loads(response.text[3:-2])["errors"] == [
        'layergroup GET needs a "config" parameter']


def test_create_jsonp_success(http: httpx.Client, geo: Account) -> None:
    response = http.get(maps_url(geo), params={"config": json.dumps(ALL_PLACES),
                                               "callback": "cb"})
    assert response.status_code == 200 and response.text.startswith("cb({")
    assert json.loads(response.text[3:-2])["layergroupid"] == response.headers["x-layergroup-id"]


def test_create_layer_sql_permission_error_names_the_layer(http: httpx.Client, geo: Account
                                                           ) -> None:
    config = {"layers": [layer("SELECT * FROM places"),
                         {"type": "mapnik", "id": "hidden",
                          "options": {"sql": "SELECT * FROM secrets"}}]}
    body = error_of(create(http, geo, config), 403)
    assert body["errors"] == ["permission denied for table secrets"]
    assert body["errors_with_context"][0] == {
        "type": "layer", "message": "permission denied for table secrets",
        "layer": {"id": "hidden", "index": 1, "type": "mapnik"},
        "hint": 'key "Default public" has no permission on public.secrets. Keys are immutable: '
                "create a key with the permission the statement needs"}


def test_create_layer_sql_missing_table_is_404(http: httpx.Client, geo: Account) -> None:
    body = error_of(create(http, geo, {"layers": [layer("SELECT * FROM nowhere")]}), 404)
    assert body["errors"] == ['relation "nowhere" does not exist']
    assert body["errors_with_context"][0]["layer"]["index"] == 0


def test_create_layer_without_its_geom_column_400(http: httpx.Client, geo: Account) -> None:
    body = error_of(create(http, geo, {"layers": [layer("SELECT id FROM places")]}), 404)
    assert "the_geom_webmercator" in body["errors"][0]
    assert body["errors_with_context"][0]["type"] == "layer"


def test_create_layer_timeout_429(http: httpx.Client, geo: Account) -> None:
    """The limit is enforced from outside (the in-process app's limit: 3 s)."""
    slow = "SELECT * FROM places WHERE pg_sleep(10) IS NOT NULL"
    lgid = made(http, geo, {"layers": [layer(slow)]})  # the probes read no row
    body = error_of(tile(http, geo, lgid, "0/0/0.mvt"), 429)
    assert body["errors_with_context"][0] == {
        "type": "limit", "subtype": "datasource",
        "message": "You are over platform's limits: SQL query timeout error. Refactor your "
                   "query before running again or contact your administrator for more details."}


def test_several_statements_in_a_layer_are_refused_and_nothing_runs(
        http: httpx.Client, geo: Account) -> None:
    escape = "SELECT * FROM places) AS q; DELETE FROM places; SELECT * FROM (SELECT * FROM places"
    response = create(http, geo, {"layers": [layer(escape)]}, geo.master_token)
    assert response.status_code == 400
    count = geo.sql(http, "SELECT count(*) AS n FROM places", geo.master_token).json()
    assert count["rows"] == [{"n": 3}]


def test_a_trailing_comment_in_a_layer_does_not_break_its_tiles(http: httpx.Client,
                                                                 geo: Account) -> None:
    lgid = made(http, geo, {"layers": [layer("SELECT * FROM places -- all of them")]})
    assert len(decode(tile(http, geo, lgid, "0/0/0.mvt"))["layer0"]["features"]) == 3


# -- tiles ------------------------------------------------------------------------------

def test_tile_geometry_positions_and_layer_names(http: httpx.Client, geo: Account) -> None:
    config = {"layers": [{"type": "mapnik", "id": "pts", "options": {"sql": "SELECT * FROM places"}},
                         layer("SELECT id, the_geom FROM places", geom_column="the_geom")]}
    decoded = decode(tile(http, geo, made(http, geo, config), "0/0/0.mvt"))
    assert set(decoded) == {"pts", "layer1"}
    for name in ("pts", "layer1"):
        assert decoded[name]["extent"] == 4096
        where = {f["properties"]["id"]: f["geometry"]["coordinates"]
                 for f in decoded[name]["features"]}
        assert where == {1: [2048, 2048], 2: [3072, 2048], 3: [1024, 1024]}
        assert all(f["geometry"]["type"] == "Point" for f in decoded[name]["features"])


def test_geometry_columns_of_any_srid_are_drawn_where_they_are(
        http: httpx.Client, geo: Account, owner_sql: Callable[[Account, str], None]) -> None:
    """The SRID a column declares is read from its type (PostGIS's type modifier): 4326,
    and 900913, above the 20-bit sign boundary of the modifier's SRID field."""
    owner_sql(geo, "CREATE TABLE google (id int, geom geometry(Point, 900913));"
                   "INSERT INTO google VALUES (1, ST_SetSRID(ST_MakePoint(10018754.17, 0), "
                   "900913))")
    lgid = made(http, geo, {"layers": [layer("SELECT * FROM google", geom_column="geom")]},
                geo.master_token)
    (point,) = decode(tile(http, geo, lgid, "0/0/0.mvt", geo.master_token))["layer0"]["features"]
    assert point["geometry"]["coordinates"] == [3072, 2048]


def test_a_column_named_like_the_wrapping_is_a_property(http: httpx.Client, geo: Account) -> None:
    lgid = made(http, geo, {"layers": [layer("SELECT id, name AS cdbq, the_geom_webmercator "
                                             "FROM places WHERE id = 1")]})
    (feature,) = decode(tile(http, geo, lgid, "0/0/0.mvt"))["layer0"]["features"]
    assert feature["properties"] == {"id": 1, "cdbq": "centre"}


@pytest.mark.parametrize(("layers", "message"), [
    ([{"id": "1", "options": {"sql": "SELECT 1"}}], "Invalid id for layer 0"),
    ([{"id": "all", "options": {"sql": "SELECT 1"}}], "Invalid id for layer 0"),
    ([{"id": "layer1", "options": {"sql": "SELECT 1"}}, {"options": {"sql": "SELECT 1"}}],
     "Layer ids must be unique"),
    ([{"options": {"sql": "SELECT 1 -- " + "x" * 200_000}},
      {"options": {"sql": "SELECT 1 -- " + "x" * 100_000}}], "The layers' sql is too long"),
])
def test_layer_ids_that_a_filter_could_not_tell_apart_and_too_much_sql_are_400(
        http: httpx.Client, geo: Account, layers: list[dict[str, Any]], message: str) -> None:
    body = error_of(create(http, geo, {"layers": layers}), 400)
    assert body["errors"][0].startswith(message)


def test_a_layer_with_two_columns_of_one_name_is_400_naming_it(http: httpx.Client,
                                                                geo: Account) -> None:
    body = error_of(create(http, geo, {"layers": [layer(
        "SELECT p.id, q.id, p.the_geom_webmercator FROM places p JOIN places q USING (name)")]}),
        400)
    assert body["errors"] == ["the layer's columns must have distinct names, none of them "
                              "__grantkey_geom (found twice: id)"]
    assert body["errors_with_context"][0]["layer"]["index"] == 0


def test_tile_properties_types(http: httpx.Client, geo: Account) -> None:
    decoded = decode(tile(http, geo, made(http, geo, ALL_PLACES), "0/0/0.mvt"))
    by_id = {f["properties"]["id"]: f["properties"] for f in decoded["layer0"]["features"]}
    assert by_id[1] == {"id": 1, "name": "centre", "n": 10.5, "f": 0.25, "b": True,
                        "founded": "1535-01-18", "seen": "2020-01-02T03:04:05+00:00",
                        "tags": '["a", "b"]', "doc": '{"k": [1, 2]}'}
    assert by_id[2] == {"id": 2, "name": "east", "n": 3, "f": -1.5, "b": False}
    assert "nothing" not in by_id[3] and "b" not in by_id[3]  # NULLs left out


def test_empty_tile_is_204(http: httpx.Client, geo: Account) -> None:
    lgid = made(http, geo, ALL_PLACES)
    response = tile(http, geo, lgid, "3/0/7.mvt")  # the south-west of the world: no point
    assert response.status_code == 204 and response.content == b""
    response = tile(http, geo, made(http, geo, {"layers": [layer("SELECT * FROM lines")]}),
                    "0/0/0.mvt")
    assert response.status_code == 204


def test_tile_layer_filter(http: httpx.Client, geo: Account) -> None:
    config = {"layers": [{"type": "mapnik", "id": "a", "options": {"sql": "SELECT * FROM places"}},
                         {"type": "mapnik", "id": "b",
                          "options": {"sql": "SELECT * FROM places WHERE id = 1"}}]}
    lgid = made(http, geo, config)
    for selector, expected in (("all", {"a", "b"}), ("mapnik", {"a", "b"}), ("0", {"a"}),
                               ("1", {"b"}), ("0,1", {"a", "b"}), ("b", {"b"}),
                               ("a,b", {"a", "b"})):
        assert set(decode(tile(http, geo, lgid, "0/0/0.mvt", layers=selector))) == expected
    for bad in ("2", "c", "0,9", "-1", "a,,b"):
        body = error_of(tile(http, geo, lgid, "0/0/0.mvt", layers=bad), 400)
        assert body["errors"] == ["Invalid layer filtering"]


@pytest.mark.parametrize("zxy", ["-1/0/0.mvt", "0/0/1.mvt", "1/2/0.mvt", "a/0/0.mvt",
                                 "0/0/0.5.mvt", "31/0/0.mvt", "0/0/x.mvt"])
def test_tile_bad_coordinates_400(http: httpx.Client, geo: Account, zxy: str) -> None:
    body = error_of(tile(http, geo, made(http, geo, ALL_PLACES), zxy), 400)
    assert body["errors"][0].startswith("Invalid tile coordinates")


@pytest.mark.parametrize("zxy", ["0/0/0.png", "0/0/0.json", "0/0/0.grid.json", "0/0/0"])
def test_tile_unsupported_format_400(http: httpx.Client, geo: Account, zxy: str) -> None:
    body = error_of(tile(http, geo, made(http, geo, ALL_PLACES), zxy), 400)
    assert "vector tiles (.mvt)" in body["errors"][0]


def test_unknown_layergroup_404(http: httpx.Client, geo: Account) -> None:
    for lgid in ("0" + "a" * 39 + ":1", "nonsense"):
        body = error_of(tile(http, geo, lgid, "0/0/0.mvt"), 404)
        assert body["errors"] == [f"Invalid or nonexistent map configuration token '{lgid}'"]


def test_tile_clipping_and_buffer(http: httpx.Client, geo: Account,
                                  owner_sql: Callable[[Account, str], None]) -> None:
    """In the north-east zoom-1 tile (x 0..20037508 m, y 0..20037508 m; 4096 units), the
    default 64 px buffer is 1024 units, about 5,009,377 m: a line crossing the tile's west
    edge is cut there, a point 4,000 km out is kept, one 6,000 km out is not."""
    owner_sql(geo, """
        INSERT INTO lines VALUES (1, ST_SetSRID(
            'LINESTRING(-15000000 10018754, 10018754 10018754)'::geometry, 3857));
        CREATE TABLE near (id int, the_geom_webmercator geometry(Point, 3857));
        INSERT INTO near VALUES (1, ST_SetSRID(ST_MakePoint(-4000000, 10018754), 3857)),
                                (2, ST_SetSRID(ST_MakePoint(-6000000, 10018754), 3857));""")
    lgid = made(http, geo, {"layers": [layer("SELECT * FROM lines"), layer("SELECT * FROM near")]},
                geo.master_token)
    decoded = decode(tile(http, geo, lgid, "1/1/0.mvt", geo.master_token))
    (line,) = decoded["layer0"]["features"]
    assert line["geometry"]["coordinates"] == [[-1024, 2048], [2048, 2048]]
    assert [f["properties"]["id"] for f in decoded["layer1"]["features"]] == [1]
    lgid = made(http, geo, {"buffersize": {"mvt": 0}, "layers": [layer("SELECT * FROM lines")]},
                geo.master_token)
    (line,) = decode(tile(http, geo, lgid, "1/1/0.mvt", geo.master_token))["layer0"]["features"]
    assert line["geometry"]["coordinates"] == [[0, 2048], [2048, 2048]]


def test_tile_minzoom_maxzoom(http: httpx.Client, geo: Account) -> None:
    config = {"layers": [{"type": "mapnik", "id": "far", "options": {
                  "sql": "SELECT * FROM places", "maxzoom": 1}},
              {"type": "mapnik", "id": "close", "options": {
                  "sql": "SELECT * FROM places", "minzoom": 2}}]}
    lgid = made(http, geo, config)
    assert set(decode(tile(http, geo, lgid, "0/0/0.mvt"))) == {"far"}
    assert set(decode(tile(http, geo, lgid, "2/2/2.mvt"))) == {"close"}
    only_far = made(http, geo, {"layers": [config["layers"][0]]})
    assert tile(http, geo, only_far, "5/16/16.mvt").status_code == 204


def test_tile_headers(http: httpx.Client, geo: Account) -> None:
    public = tile(http, geo, made(http, geo, ALL_PLACES), "0/0/0.mvt")
    assert public.headers["cache-control"] == "public,max-age=300"
    assert public.headers["vary"] == "Authorization"
    assert public.headers["access-control-allow-origin"] == "*"
    assert "X-Layergroup-Id" in public.headers["access-control-expose-headers"]
    assert public.headers["last-modified"].endswith(" GMT")
    keyed = tile(http, geo, made(http, geo, ALL_PLACES, geo.master_token), "0/0/0.mvt",
                 geo.master_token)
    assert keyed.headers["cache-control"] == "private,max-age=300"


def test_vector_simplify_extent_simplifies(http: httpx.Client, geo: Account,
                                           owner_sql: Callable[[Account, str], None]) -> None:
    """At zoom 0 a tile unit is about 9.8 km: a bend of 50 km (5 units) is drawn, and
    simplified away at 256 units to the tile (a tolerance of about 157 km)."""
    owner_sql(geo, "INSERT INTO lines SELECT 2, ST_SetSRID(ST_MakeLine(ARRAY["
                   "ST_MakePoint(0, 0), ST_MakePoint(5000000, 50000), ST_MakePoint(10000000, 0)]), "
                   "3857)")
    plain = made(http, geo, {"layers": [layer("SELECT * FROM lines")]}, geo.master_token)
    simple = made(http, geo, {"layers": [layer("SELECT * FROM lines",
                                               vector_simplify_extent=256)]}, geo.master_token)
    kept = decode(tile(http, geo, plain, "0/0/0.mvt", geo.master_token))
    cut = decode(tile(http, geo, simple, "0/0/0.mvt", geo.master_token))
    assert len(kept["layer0"]["features"][0]["geometry"]["coordinates"]) == 3
    assert len(cut["layer0"]["features"][0]["geometry"]["coordinates"]) == 2


# -- credentials ------------------------------------------------------------------------

def test_maps_unknown_key_401(http: httpx.Client, geo: Account) -> None:
    body = error_of(create(http, geo, ALL_PLACES, "no-such-key"), 401)
    assert body == {"errors": ["Unauthorized"], "errors_with_context": [
        {"type": "auth", "subtype": "api-key-not-found", "message": "Unauthorized"}]}


def test_maps_key_without_maps_grant_403(http: httpx.Client, geo: Account,
                                         make_key: Callable[..., KeyHandle]) -> None:
    sql_only = make_key(geo, "sql-only", table_grants([("public", "places", ["select"])]))
    maps = make_key(geo, "maps", table_grants([("public", "places", ["select"])], ("maps",)))
    lgid = made(http, geo, ALL_PLACES, maps.token)
    expected = {"errors": ["Forbidden"], "errors_with_context": [
        {"type": "auth", "subtype": "api-key-does-not-grant-access", "message": "Forbidden",
         "hint": 'key "sql-only" has no grant for the maps API (its APIs: sql); create a key '
                 'with "maps" in its apis'}]}
    assert error_of(create(http, geo, ALL_PLACES, sql_only.token), 403) == expected
    assert error_of(tile(http, geo, lgid, "0/0/0.mvt", sql_only.token), 403) == expected


def test_maps_basic_user_mismatch_403(http: httpx.Client, geo: Account) -> None:
    response = http.post(maps_url(geo), json=ALL_PLACES, auth=("someone-else", geo.master_token))
    body = error_of(response, 403)
    assert body["errors"] == ["Forbidden"]
    assert body["errors_with_context"][0]["subtype"] == "api-key-username-mismatch"


def test_maps_credential_order_and_body_key(http: httpx.Client, geo: Account) -> None:
    """Basic > Bearer > query api_key > map_key > body; an Authorization header never falls
    through to the others."""
    url = maps_url(geo)
    private = {"layers": [layer("SELECT * FROM secrets")]}
    assert http.post(url, json={**private, "api_key": geo.master_token}).status_code == 200
    assert http.post(url, json=private, params={"map_key": geo.master_token}).status_code == 200
    assert http.post(url, json=private, headers={
        "Authorization": f"Bearer {geo.master_token}"}).status_code == 200
    assert http.post(url, json=private, params={"api_key": geo.master_token},
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.post(url, json={**private, "api_key": geo.master_token},
                     params={"api_key": "default_public"}).status_code == 403


def test_maps_no_key_is_default_public(http: httpx.Client, geo: Account) -> None:
    lgid = made(http, geo, ALL_PLACES)
    assert len(decode(tile(http, geo, lgid, "0/0/0.mvt"))["layer0"]["features"]) == 3


def test_tile_made_by_a_regular_key_needs_that_keys_rights(
        http: httpx.Client, geo: Account, make_key: Callable[..., KeyHandle],
        services: Any, run: Any) -> None:
    """A layergroup id grants nothing: each tile runs as the key that asks for it."""
    reader = make_key(geo, "reader", table_grants([("public", "secrets", ["select"])], ("maps",)))
    other = make_key(geo, "other", apis_only("maps"))
    lgid = made(http, geo, {"layers": [layer("SELECT * FROM secrets")]}, reader.token)
    assert tile(http, geo, lgid, "0/0/0.mvt", reader.token).status_code == 200
    for token in (None, other.token):
        body = error_of(tile(http, geo, lgid, "0/0/0.mvt", token), 403)
        assert body["errors"] == ["permission denied for table secrets"]
    master = run(services.keys.master_principal(geo.user))
    run(services.keys.delete(master, "reader"))
    assert error_of(tile(http, geo, lgid, "0/0/0.mvt", reader.token), 401)["errors"] == [
        "Unauthorized"]


# -- where layergroups live ---------------------------------------------------------------

def test_layergroup_is_served_by_another_server(http: httpx.Client, geo: Account,
                                                server: ServerProcess) -> None:
    """Made in this process, drawn by the `grantkey serve --workers 2` subprocess (both of
    its workers): the config lives in PostgreSQL, not in a process's memory."""
    lgid = made(http, geo, ALL_PLACES)
    url = f"{server.url}/user/{geo.username}/api/v1/map/{lgid}/0/0/0.mvt"
    with httpx.Client(timeout=30) as other:
        for _ in range(4):
            response = other.get(url)
            assert response.status_code == 200
            assert len(decode(response)["layer0"]["features"]) == 3


def test_layergroup_expires_after_the_idle_setting(
        http: httpx.Client, geo: Account, server: ServerProcess, services: Services,
        run: Callable[..., Any], admin_url: str) -> None:
    lgid = made(http, geo, ALL_PLACES)
    kept = made(http, geo, {"layers": [layer("SELECT * FROM places WHERE id = 1")]})
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
        conn.execute("UPDATE layergroups SET last_used_at = now() - interval '31 days' "
                     "WHERE hash = %s", [lgid.split(":")[0]])
    assert run(services.maps.expire()) >= 1  # GRANTKEY_MAPS_IDLE_DAYS: 30
    base = f"{server.url}/user/{geo.username}/api/v1/map"
    with httpx.Client(timeout=30) as other:
        response = other.get(f"{base}/{lgid}/0/0/0.mvt")
        assert response.status_code == 404
        assert response.json()["errors"] == [
            f"Invalid or nonexistent map configuration token '{lgid}'"]
        assert other.get(f"{base}/{kept}/0/0/0.mvt").status_code == 200


def test_cache_buster_changes_when_a_table_changes(
        http: httpx.Client, geo: Account, owner_sql: Callable[[Account, str], None]) -> None:
    first = create(http, geo, ALL_PLACES).json()
    again = create(http, geo, ALL_PLACES).json()
    assert again["layergroupid"] == first["layergroupid"]
    owner_sql(geo, "INSERT INTO places (id, name) VALUES (9, 'new');"
                   "SELECT pg_stat_force_next_flush()")
    changed = create(http, geo, ALL_PLACES).json()
    hash_, buster = changed["layergroupid"].split(":")
    assert hash_ == first["layergroupid"].split(":")[0]
    assert int(buster) > int(first["layergroupid"].split(":")[1])
    assert changed["last_updated"] > first["last_updated"]
    no_table = create(http, geo, {"layers": [layer(
        "SELECT ST_SetSRID(ST_MakePoint(0, 0), 3857) AS the_geom_webmercator")]}).json()
    assert no_table["layergroupid"].endswith(":0")
    assert no_table["last_updated"] == "1970-01-01T00:00:00.000Z"


def test_options_on_maps_paths_is_200_with_cors(http: httpx.Client, geo: Account) -> None:
    for path in ("", "/0abc:1/0/0/0.mvt"):
        response = http.options(maps_url(geo) + path)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"


# -- the preview page (the browser test: tests/api/test_maps_preview.py) ------------------

def test_preview_page_carries_a_tile_token_escapes_layer_ids_and_sets_a_csp(
        http: httpx.Client, geo: Account, make_key: Callable[..., KeyHandle]) -> None:
    key = make_key(geo, "viewer", table_grants([("public", "places", ["select"])], ("maps",)))
    hostile = "</script><script>alert(1)</script>"
    config = {"layers": [{"type": "mapnik", "id": hostile,
                          "options": {"sql": "SELECT * FROM places"}}]}
    lgid = made(http, geo, config, key.token)
    response = http.get(f"{maps_url(geo)}/{lgid}/preview", params={"api_key": key.token})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    assert key.token not in page and "?api_key=gkt" in page
    assert hostile not in page and "\\u003c/script\\u003e" in page
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp
    assert "https://unpkg.com" in csp and "connect-src 'self'" in csp
    assert response.headers["cache-control"] == "no-store"


def test_preview_page_refused_says_why_in_the_page(
        http: httpx.Client, geo: Account, make_key: Callable[..., KeyHandle]) -> None:
    sql_only = make_key(geo, "sql-only", apis_only("sql"))
    lgid = made(http, geo, ALL_PLACES)
    refused = http.get(f"{maps_url(geo)}/{lgid}/preview", params={"api_key": sql_only.token})
    assert refused.status_code == 403 and "cannot be shown (403): Forbidden" in refused.text
    unknown = http.get(f"{maps_url(geo)}/0{'b' * 39}:1/preview")
    assert unknown.status_code == 404
    assert "Invalid or nonexistent map configuration token" in unknown.text
    public = http.get(f"{maps_url(geo)}/{lgid}/preview")
    assert public.status_code == 200 and "api_key" not in public.text
