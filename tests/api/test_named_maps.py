"""Named maps (carto-compat §8): CRUD with CARTO's shapes and messages, placeholders with
CARTO's escaping, open and token templates, instantiation and direct tiles; and grantkey's
publishing keys: a template renders with the rights of the key that saved it, or, saved by
the master, of a key made for it holding SELECT on exactly the relations its layers read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import mapbox_vector_tile  # type: ignore[import-untyped]
import psycopg
import pytest

from tests.api.test_maps_api import SETUP, maps_url
from tests.conftest import Account, KeyHandle
from tests.support import apis_only, table_grants

pytestmark = pytest.mark.in_process


@pytest.fixture
def geo(postgis: None, account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, SETUP + "CREATE VIEW east AS SELECT * FROM places WHERE id = 2;")
    return account


def template(name: str = "cities", sql: str = "SELECT * FROM places WHERE name <> '<%= skip %>'",
             **extra: Any) -> dict[str, Any]:
    return {"version": "0.0.1", "name": name, "auth": {"method": "open"},
            "placeholders": {"skip": {"type": "sql_literal", "default": "none"}},
            "layergroup": {"layers": [{"type": "mapnik", "id": "pts",
                                       "options": {"sql": sql}}]}, **extra}


def named(account: Account) -> str:
    return f"{maps_url(account)}/named"


def save(http: httpx.Client, account: Account, body: dict[str, Any],
         token: str | None = None) -> httpx.Response:
    return http.post(named(account), json=body,
                     params={"api_key": token or account.master_token})


def tile_of(http: httpx.Client, answer: dict[str, Any], zxy: str = "0/0/0") -> httpx.Response:
    url: str = answer["metadata"]["tilejson"]["vector"]["tiles"][0]
    z, x, y = zxy.split("/")
    return http.get(url.replace("{z}", z).replace("{x}", x).replace("{y}", y))


def names_in(response: httpx.Response, layer: str = "pts") -> set[str]:
    assert response.status_code == 200, response.text
    decoded = mapbox_vector_tile.decode(response.content)
    return {f["properties"]["name"] for f in decoded[layer]["features"]}


def test_crud_shapes(http: httpx.Client, geo: Account) -> None:
    created = save(http, geo, template())
    assert created.status_code == 200 and created.json() == {"template_id": "cities"}
    listed = http.get(named(geo), params=geo.master())
    assert listed.json() == {"template_ids": ["cities"]}
    shown = http.get(f"{named(geo)}/cities", params=geo.master())
    assert shown.json() == {"template": {**template(), "view": {}}}  # CARTO's defaults filled
    changed = template(sql="SELECT * FROM places")
    updated = http.put(f"{named(geo)}/cities", json=changed, params=geo.master())
    assert updated.status_code == 200 and updated.json() == {"template_id": "cities"}
    assert http.get(f"{named(geo)}/cities", params=geo.master()).json() == {
        "template": {**changed, "view": {}}}
    assert http.delete(f"{named(geo)}/cities", params=geo.master()).status_code == 204
    gone = http.get(f"{named(geo)}/cities", params=geo.master())
    assert gone.status_code == 404
    assert gone.json()["errors"] == [f"Template 'cities' of user '{geo.username}' does not exist"]


@pytest.mark.parametrize(("change", "message"), [
    ({"version": "0.0.2"}, "Unsupported template version 0.0.2"),
    ({"name": ""}, "Missing template name"),
    ({"name": "bad name"}, "Invalid characters in template name 'bad name'"),
    ({"layergroup": {"layers": []}}, "Missing or empty layers array from layergroup config"),
    ({"placeholders": {"1x": {"type": "number", "default": 1}}},
     "Invalid characters in placeholder name '1x'"),
    ({"placeholders": {"x": {"type": "number"}}}, "Missing default for placeholder 'x'"),
    ({"placeholders": {"x": {"default": 1}}}, "Missing type for placeholder 'x'"),
    ({"auth": {"method": "token"}}, "Invalid 'token' authentication: missing valid_tokens"),
    ({"auth": {"method": "token", "valid_tokens": []}},
     "Invalid 'token' authentication: no valid_tokens"),
    ({"auth": {"method": "magic"}}, "Unsupported authentication method: magic"),
])
def test_template_validation_messages(http: httpx.Client, geo: Account, change: dict[str, Any],
                                      message: str) -> None:
    response = save(http, geo, {**template(), **change})
    assert response.status_code == 400, response.text
    assert response.json()["errors"] == [message]


def test_duplicate_and_rename_are_refused(http: httpx.Client, geo: Account) -> None:
    assert save(http, geo, template()).status_code == 200
    again = save(http, geo, template())
    assert again.status_code == 400
    assert again.json()["errors"] == [f"Template 'cities' of user '{geo.username}' already exists"]
    renamed = http.put(f"{named(geo)}/cities", json=template(name="other"), params=geo.master())
    assert renamed.status_code == 400
    assert renamed.json()["errors"] == [
        "Cannot update name of a map template ('cities' != 'other')"]


def test_instantiate_with_placeholders_and_their_escaping(http: httpx.Client,
                                                          geo: Account) -> None:
    assert save(http, geo, template()).status_code == 200
    anonymous = http.post(f"{named(geo)}/cities", json={})  # an open template: no key
    assert anonymous.status_code == 200, anonymous.text
    assert names_in(tile_of(http, anonymous.json())) == {"centre", "east", "north-west"}
    skip = http.post(f"{named(geo)}/cities", json={"skip": "east", "api_key": geo.master_token})
    assert skip.status_code == 200
    assert names_in(tile_of(http, skip.json())) == {"centre", "north-west"}
    quoted = http.post(f"{named(geo)}/cities", json={"skip": "x' OR name = 'east"})
    assert names_in(tile_of(http, quoted.json())) == {"centre", "east", "north-west"}


@pytest.mark.parametrize(("kind", "value", "message"), [
    ("number", "1; DROP TABLE places", "Invalid number value for template parameter 'v': "
                                       "1; DROP TABLE places"),
    ("number", {"a": 1}, "Invalid number value for template parameter 'v': {'a': 1}"),
    ("css_color", "red;}", "Invalid css_color value for template parameter 'v': red;}"),
])
def test_bad_parameter_values_are_400(http: httpx.Client, geo: Account, kind: str,
                                      value: object, message: str) -> None:
    default = 1 if kind == "number" else "#fff"
    body = template(name="typed", sql="SELECT * FROM places",
                    placeholders={"v": {"type": kind, "default": default}})
    assert save(http, geo, body).status_code == 200
    response = http.post(f"{named(geo)}/typed", json={"v": value})
    assert response.status_code == 400 and response.json()["errors"] == [message]


def test_token_templates_need_their_token_to_instantiate_and_for_every_tile(
        http: httpx.Client, geo: Account) -> None:
    body = template(name="secret", auth={"method": "token", "valid_tokens": ["s3cret"]})
    assert save(http, geo, body).status_code == 200
    for params in ({}, {"auth_token": "wrong"}):
        refused = http.post(f"{named(geo)}/secret", json={}, params=params)
        assert refused.status_code == 403
        assert refused.json()["errors"] == ["Unauthorized template instantiation"]
    made = http.post(f"{named(geo)}/secret", json={}, params={"auth_token": "s3cret"})
    assert made.status_code == 200
    url = made.json()["metadata"]["tilejson"]["vector"]["tiles"][0]
    assert "auth_token=s3cret" in url
    assert names_in(tile_of(http, made.json()))
    bare = url.replace("&auth_token=s3cret", "").replace("{z}/{x}/{y}", "0/0/0")
    assert http.get(bare).status_code == 403
    direct = f"{named(geo)}/secret/0/0/0.mvt"
    assert http.get(direct).status_code == 403
    assert names_in(http.get(direct, params={"auth_token": "s3cret"}))


def test_direct_named_tiles(http: httpx.Client, geo: Account) -> None:
    assert save(http, geo, template()).status_code == 200
    assert names_in(http.get(f"{named(geo)}/cities/0/0/0.mvt")) == {
        "centre", "east", "north-west"}
    assert names_in(http.get(f"{named(geo)}/cities/all/0/0/0.mvt"))
    assert http.get(f"{named(geo)}/cities/7/0/0/0.mvt").status_code == 400
    assert http.get(f"{named(geo)}/nothing/0/0/0.mvt").status_code == 404


def test_a_master_template_renders_as_a_key_that_reads_exactly_its_relations(
        http: httpx.Client, geo: Account, admin_url: str) -> None:
    """Saved by the master, a template gets a key of its own: `maps` and SELECT on what its
    layers read (a view stays a view), nothing of the owner's power: an injected relation
    through a placeholder is refused."""
    body = template(name="pick", sql='SELECT * FROM "<%= t %>"',
                    placeholders={"t": {"type": "sql_ident", "default": "east"}})
    assert save(http, geo, body).status_code == 200
    keys = http.get(geo.keys_url, params=geo.master()).json()["result"]
    (made_for,) = [k for k in keys if k["name"].startswith("named map pick (")]
    tables = {(t["schema"], t["name"]) for t in made_for["grants"][1]["tables"]}
    assert tables == {("public", "east")}  # the view, not the table behind it
    assert names_in(http.get(f"{named(geo)}/pick/0/0/0.mvt")) == {"east"}
    # nothing else: not even a public table (it is not a member of the reader role)
    assert http.patch(f"{geo.base_url}/user/{geo.username}/api/v4/datasets/places",
                      params=geo.master(), json={"privacy": "public"}).status_code == 200
    with psycopg.connect(admin_url, dbname=geo.user.database) as conn:
        member_of = conn.execute(
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            "JOIN pg_roles k ON k.oid = m.member JOIN grantkey_meta.api_keys a "
            "ON a.role = k.rolname WHERE a.name LIKE 'named map pick (%'").fetchall()
    assert not [r for (r,) in member_of if r.endswith("_reader")], member_of
    for other in ("places", "secrets", 'east" UNION SELECT * FROM "secrets'):
        response = http.post(f"{named(geo)}/pick", json={"t": other})
        assert response.status_code in (403, 404), response.text
    assert http.delete(f"{named(geo)}/pick", params=geo.master()).status_code == 204
    keys = http.get(geo.keys_url, params=geo.master()).json()["result"]
    assert not [k for k in keys if k["name"].startswith("named map pick")]


def test_a_regular_keys_template_renders_with_its_rights_and_dies_with_it(
        http: httpx.Client, geo: Account, make_key: Callable[..., KeyHandle]) -> None:
    publisher = make_key(geo, "publisher", table_grants([("public", "places", ["select"])],
                                                        ("maps",)))
    other = make_key(geo, "other", apis_only("maps"))
    assert save(http, geo, template(name="mine"), publisher.token).status_code == 200
    assert http.get(named(geo), params={"api_key": publisher.token}).json() == {
        "template_ids": ["mine"]}
    assert http.get(named(geo), params={"api_key": other.token}).json() == {"template_ids": []}
    assert http.get(f"{named(geo)}/mine", params={"api_key": other.token}).status_code == 404
    assert http.get(named(geo), params=geo.master()).json() == {"template_ids": ["mine"]}
    made = http.post(f"{named(geo)}/mine", json={})
    assert names_in(tile_of(http, made.json())) == {"centre", "east", "north-west"}
    assert http.delete(f"{geo.keys_url}/publisher", params=geo.master()).status_code == 204
    assert tile_of(http, made.json()).status_code == 401
    refused = http.post(f"{named(geo)}/mine", json={})
    assert refused.status_code == 403
    assert "published this template was deleted or regenerated" in refused.json()["errors"][0]


def test_deleting_a_template_ends_its_tiles_at_once(http: httpx.Client, geo: Account) -> None:
    assert save(http, geo, template()).status_code == 200
    made = http.post(f"{named(geo)}/cities", json={}).json()
    assert tile_of(http, made).status_code == 200
    assert http.delete(f"{named(geo)}/cities", params=geo.master()).status_code == 204
    assert tile_of(http, made).status_code in (401, 404)


def test_only_the_master_and_maps_keys_manage_templates(
        http: httpx.Client, geo: Account, make_key: Callable[..., KeyHandle]) -> None:
    sql_only = make_key(geo, "sql-only", apis_only("sql"))
    for token in ("default_public", sql_only.token):
        response = save(http, geo, template(), token)
        assert response.status_code == 403 and response.json()["errors"] == ["Forbidden"]
        assert http.get(named(geo), params={"api_key": token}).status_code == 403
    assert http.get(named(geo)).status_code == 403  # no key: the default public key


# -- from a review of the first version -----------------------------------------------------

def test_editing_a_template_ends_the_tiles_of_its_earlier_layergroups(
        http: httpx.Client, geo: Account, make_key: Callable[..., KeyHandle]) -> None:
    """Was a break: an edited template's old tile URLs kept drawing the old SQL."""
    publisher = make_key(geo, "editor", table_grants([("public", "places", ["select"])],
                                                     ("maps",)))
    assert save(http, geo, template(name="edited"), publisher.token).status_code == 200
    old = http.post(f"{named(geo)}/edited", json={}).json()
    assert tile_of(http, old).status_code == 200
    narrower = template(name="edited", sql="SELECT id, the_geom_webmercator FROM places")
    assert http.put(f"{named(geo)}/edited", json=narrower,
                    params={"api_key": publisher.token}).status_code == 200
    gone = tile_of(http, old)
    assert gone.status_code == 404
    assert "changed since this map was made" in gone.json()["errors"][0] or \
        "Invalid or nonexistent map configuration token" in gone.json()["errors"][0]
    new = http.post(f"{named(geo)}/edited", json={}).json()
    decoded = mapbox_vector_tile.decode(tile_of(http, new).content)
    assert all(set(f["properties"]) == {"id"} for f in decoded["pts"]["features"])


def test_a_failed_edit_by_the_master_leaves_the_template_working(http: httpx.Client,
                                                                 geo: Account) -> None:
    """Was a break: the old key was deleted before the new one was made."""
    assert save(http, geo, template(name="kept")).status_code == 200
    broken = template(name="kept", sql="SELECT * FROM nowhere")
    response = http.put(f"{named(geo)}/kept", json=broken, params=geo.master())
    assert response.status_code == 404
    assert response.json()["errors_with_context"][0]["type"] == "layer"
    assert names_in(http.get(f"{named(geo)}/kept/0/0/0.mvt")) == {"centre", "east",
                                                                  "north-west"}
    keys = http.get(geo.keys_url, params=geo.master()).json()["result"]
    assert len([k for k in keys if k["name"].startswith("named map kept")]) == 1


def test_a_master_template_reading_what_everyone_reads_needs_no_grant(
        http: httpx.Client, geo: Account) -> None:
    body = template(name="catalog", sql="SELECT 'feature' AS name, "
                    "ST_SetSRID(ST_MakePoint(0, 0), 3857) AS the_geom_webmercator "
                    "FROM information_schema.sql_features LIMIT 1")
    assert save(http, geo, body).status_code == 200
    assert names_in(http.get(f"{named(geo)}/catalog/0/0/0.mvt")) == {"feature"}


def test_when_the_key_of_a_master_template_cannot_be_made_it_is_400_in_the_maps_shape(
        http: httpx.Client, geo: Account, in_process_app: Any) -> None:
    keys = in_process_app.app.state.services.keys
    keys.max_keys_per_user = 1
    try:
        assert save(http, geo, template(name="one")).status_code == 200
        response = save(http, geo, template(name="two"))
    finally:
        keys.max_keys_per_user = 0
    assert response.status_code == 400
    assert response.json()["errors"] == [
        "The key this template renders as could not be made: You have reached the limit "
        "of API keys for your plan"]


@pytest.mark.parametrize("path", ["a%00b", "a%00b/0/0/0.mvt", "K%E2%84%AA", "\u212a/0/0/0.mvt"])
def test_names_no_template_can_have_are_404_not_500(http: httpx.Client, geo: Account,
                                                    path: str) -> None:
    assert http.get(f"{named(geo)}/{path}", params=geo.master()).status_code == 404


def test_huge_or_deep_templates_and_parameters_are_400(http: httpx.Client, geo: Account) -> None:
    deep: dict[str, Any] = {}
    for _ in range(40):
        deep = {"x": deep}
    nested = template(name="deep")
    nested["layergroup"]["layers"][0]["options"]["extra"] = deep
    assert save(http, geo, nested).status_code == 400
    many = template(name="many", sql="SELECT * FROM places WHERE name <> '"
                    + "<%= skip %>" * 5000 + "'")
    assert save(http, geo, many).status_code == 200
    too_long = http.post(f"{named(geo)}/many", json={"skip": "x" * 20_000})
    assert too_long.status_code == 400 and "too long" in too_long.json()["errors"][0]
    too_large = http.post(f"{named(geo)}/many", json={"skip": "x" * 5_000})
    assert too_large.status_code == 400 and "too large" in too_large.json()["errors"][0]


def test_a_signed_number_cannot_join_the_text_before_it(http: httpx.Client,
                                                        geo: Account) -> None:
    body = template(name="signed", sql="SELECT * FROM places WHERE id > 1-<%= n %>",
                    placeholders={"n": {"type": "number", "default": 0}})
    assert save(http, geo, body).status_code == 200
    made = http.post(f"{named(geo)}/signed", json={"n": "-1"})  # 1-(-1): id > 2
    assert names_in(tile_of(http, made.json())) == {"north-west"}


def test_the_template_limit_is_409_with_carto_s_message(
        http: httpx.Client, geo: Account, in_process_app: Any) -> None:
    named_maps = in_process_app.app.state.services.named_maps
    named_maps.max_templates = 1
    try:
        assert save(http, geo, template(name="first")).status_code == 200
        second = save(http, geo, template(name="second"))
        assert second.status_code == 409
        assert second.json()["errors"] == [
            f"User '{geo.username}' reached limit on number of templates (1/1)"]
    finally:
        named_maps.max_templates = 1000
