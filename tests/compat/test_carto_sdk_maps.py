"""The real `carto` SDK's AnonymousMap and NamedMapManager against a live grantkey server (the
subprocess `grantkey serve`), and tiles fetched from the URLs the SDK builds, with the key
appended."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import mapbox_vector_tile  # type: ignore[import-untyped]
import pytest

from tests.api.test_maps_api import SETUP
from tests.conftest import Account

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
carto_auth = pytest.importorskip("carto.auth")
carto_keys = pytest.importorskip("carto.api_keys")
carto_maps = pytest.importorskip("carto.maps")

CONFIG = {"version": "1.3.0", "layers": [
    {"type": "mapnik", "id": "places", "options": {"sql": "SELECT * FROM places"}}]}
# (a name holding "template" breaks the SDK's NamedMapManager.all, against CARTO too)
TEMPLATE = {"version": "0.0.1", "name": "sdk_cities",
            "auth": {"method": "token", "valid_tokens": ["t0ken"]},
            "placeholders": {"who": {"type": "sql_literal", "default": "east"}},
            "layergroup": {"layers": [{"type": "mapnik", "id": "places", "options": {
                "sql": "SELECT * FROM places WHERE name = '<%= who %>'"}}]},
            "view": {}}  # the SDK sends every field it knows: a template without one fails there


def client(account: Account, token: str) -> Any:
    return carto_auth.APIKeyAuthClient(
        base_url=f"{account.base_url}/user/{account.username}/", api_key=token)


@pytest.fixture
def sdk_geo(postgis: None, account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, SETUP)
    return account


def names(url: str, token: str) -> set[str]:
    response = httpx.get(url, params={"api_key": token}, timeout=30)
    assert response.status_code == 200, response.text
    decoded = mapbox_vector_tile.decode(response.content)
    return {feature["properties"]["name"] for feature in decoded["places"]["features"]}


def test_anonymous_map_instantiate_and_its_tiles(sdk_geo: Account) -> None:
    keys = carto_keys.APIKeyManager(client(sdk_geo, sdk_geo.master_token))
    token = keys.create(name="sdk-map", apis=["maps"], tables=[
        {"schema": "public", "name": "places", "permissions": ["select"]}]).token
    anonymous = carto_maps.AnonymousMap(client(sdk_geo, token))
    anonymous.instantiate(CONFIG)
    assert anonymous.layergroupid.split(":")[0].startswith("0")
    assert anonymous.metadata["layers"][0]["id"] == "places"
    url = anonymous.get_tile_url(0, 0, 0, extension="mvt")
    assert url.startswith(f"{sdk_geo.base_url}/user/{sdk_geo.username}/api/v1/map/"
                          f"{anonymous.layergroupid}/0/0/0.mvt")
    assert names(url, token) == {"centre", "east", "north-west"}
    assert names(anonymous.get_tile_url(0, 0, 0, layer_id="0", extension="mvt"), token)


def test_named_map_manager_flow(sdk_geo: Account) -> None:
    auth = client(sdk_geo, sdk_geo.master_token)
    manager = carto_maps.NamedMapManager(auth)
    made = manager.create(template=TEMPLATE)
    assert made.template_id == "sdk_cities"
    fetched = manager.get("sdk_cities")
    assert fetched.layergroup == TEMPLATE["layergroup"]
    assert [m.template_id for m in manager.all()] == ["sdk_cities"]
    fetched.placeholders = {"who": {"type": "sql_literal", "default": "centre"}}
    fetched.save()
    assert manager.get("sdk_cities").placeholders["who"]["default"] == "centre"
    fetched.instantiate({"who": "north-west"}, auth="t0ken")
    assert fetched.layergroupid.split(":")[0].startswith("0")
    tile = fetched.get_tile_url(0, 0, 0, extension="mvt")  # the direct named tile, auth_token
    assert "auth_token=t0ken" in tile
    response = httpx.get(tile + f"&api_key={sdk_geo.master_token}", timeout=30)
    assert response.status_code == 200
    fetched.delete()
    assert manager.all() == []
