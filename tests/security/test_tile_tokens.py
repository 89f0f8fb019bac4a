"""Tile tokens (carto-compat §8): a layergroup's tile URLs carry a token bound to that
layergroup and that key instead of the key, accepted on that layergroup's tiles only, dead
the instant the key is deleted or regenerated (in every process of the server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.api.test_maps_api import SETUP, layer, maps_url
from tests.conftest import Account, KeyHandle
from tests.support import table_grants

PLACES = {"layers": [layer("SELECT * FROM places")]}
EAST = {"layers": [layer("SELECT * FROM places WHERE id = 2")]}
REQUESTS_AFTER = 40  # spread over the server's two worker processes


@pytest.fixture
def geo(postgis: None, account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, SETUP)
    return account


@pytest.fixture
def reader(geo: Account, make_key: Callable[..., KeyHandle]) -> KeyHandle:
    return make_key(geo, "map-reader", table_grants([("public", "places", ["select"])],
                                                    ("maps",)))


def make_map(http: httpx.Client, account: Account, config: dict[str, Any],
             token: str | None) -> dict[str, Any]:
    params = {} if token is None else {"api_key": token}
    response = http.post(maps_url(account), json=config, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def tile_url(body: dict[str, Any], zxy: str = "0/0/0") -> str:
    template: str = body["metadata"]["tilejson"]["vector"]["tiles"][0]
    z, x, y = zxy.split("/")
    return template.replace("{z}", z).replace("{x}", x).replace("{y}", y)


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["api_key"][0]


def test_tilejson_urls_carry_a_tile_token_not_the_key(http: httpx.Client, geo: Account,
                                                      reader: KeyHandle) -> None:
    for token in (reader.token, geo.master_token):
        response = http.post(maps_url(geo), json=PLACES, params={"api_key": token})
        assert response.status_code == 200
        assert token not in response.text
        tile_token = token_of(tile_url(response.json()))
        assert tile_token.startswith("gkt")
        assert http.get(tile_url(response.json())).status_code == 200


def test_default_public_maps_carry_no_credential(http: httpx.Client, geo: Account,
                                                 owner_sql: Callable[[Account, str], None]
                                                 ) -> None:
    owner_sql(geo, f'GRANT SELECT ON places TO "{geo.user.public_role}"')
    body = make_map(http, geo, PLACES, None)
    assert "?" not in tile_url(body)
    assert http.get(tile_url(body)).status_code == 200


def test_tile_token_refused_on_another_layergroup(http: httpx.Client, geo: Account,
                                                  reader: KeyHandle) -> None:
    first = make_map(http, geo, PLACES, reader.token)
    second = make_map(http, geo, EAST, reader.token)
    foreign = tile_url(second).split("?")[0] + "?api_key=" + token_of(tile_url(first))
    response = http.get(foreign)
    assert response.status_code == 401
    assert response.json()["errors_with_context"][0]["subtype"] == "api-key-not-found"


def test_tile_token_refused_under_another_user(http: httpx.Client, geo: Account,
                                               reader: KeyHandle,
                                               make_account: Callable[[], Account]) -> None:
    other = make_account()
    body = make_map(http, geo, PLACES, reader.token)
    elsewhere = tile_url(body).replace(f"/user/{geo.username}/", f"/user/{other.username}/")
    assert http.get(elsewhere).status_code == 401


def test_tile_token_refused_on_the_sql_api_and_on_map_creation(
        http: httpx.Client, geo: Account, reader: KeyHandle) -> None:
    tile_token = token_of(tile_url(make_map(http, geo, PLACES, reader.token)))
    assert geo.sql(http, "SELECT 1", tile_token).status_code == 401
    response = http.post(maps_url(geo), json=PLACES, params={"api_key": tile_token})
    assert response.status_code == 401
    response = http.get(f"{geo.base_url}/user/{geo.username}/api/v3/api_keys",
                        params={"api_key": tile_token})
    assert response.status_code == 401


@pytest.mark.parametrize("alter", [
    lambda t: t[:-1], lambda t: t[:-10], lambda t: t + "A",
    lambda t: t[:20] + ("B" if t[20] != "B" else "C") + t[21:],
    lambda t: t[:10] + "+" + t[11:], lambda t: t[:10] + "/" + t[11:],
    lambda t: "gkt", lambda t: "gkt" + "x" * 500, lambda t: t.upper(),
    lambda t: t[:30] + "%00" + t[30:], lambda t: t + "=",
])
def test_altered_tile_tokens_are_401(http: httpx.Client, geo: Account, reader: KeyHandle,
                                     alter: Callable[[str], str]) -> None:
    url = tile_url(make_map(http, geo, PLACES, reader.token))
    altered = alter(token_of(url))
    response = http.get(url.split("?")[0], params={"api_key": altered})
    assert response.status_code == 401, (altered, response.text)


def test_the_raw_key_still_works_on_tile_urls(http: httpx.Client, geo: Account,
                                              reader: KeyHandle) -> None:
    url = tile_url(make_map(http, geo, PLACES, reader.token)).split("?")[0]
    assert http.get(url, params={"api_key": reader.token}).status_code == 200
    assert http.get(url, headers={"Authorization": f"Bearer {reader.token}"}).status_code == 200


@pytest.mark.parametrize("revoke", ["delete", "regenerate"])
def test_tile_token_dies_with_its_key_in_every_process(
        http: httpx.Client, geo: Account, reader: KeyHandle, revoke: str) -> None:
    url = tile_url(make_map(http, geo, PLACES, reader.token))
    for _ in range(6):  # both worker processes have served (and cached) the key
        assert http.get(url).status_code == 200
    key_url = f"{geo.keys_url}/{reader.name}"
    if revoke == "delete":
        assert http.delete(key_url, params=geo.master()).status_code == 204
    else:
        response = http.post(f"{key_url}/token/regenerate", params=geo.master())
        assert response.status_code == 200
    statuses = {http.get(url).status_code for _ in range(REQUESTS_AFTER)}
    assert statuses == {401}
