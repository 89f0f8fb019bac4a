"""Auth API v3 endpoints E1-E5 over real HTTP: success shapes, statuses, errors."""

from __future__ import annotations

import re
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Account
from tests.support import apis_only, table_grants

pytestmark = pytest.mark.in_process

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000")
FORBIDDEN = "You don't have permission to access that resource"


def create(http: httpx.Client, account: Account, name: str, grants: object) -> httpx.Response:
    return http.post(account.keys_url, params=account.master(),
                     json={"name": name, "grants": grants})


def test_create_regular_key_answers_201_with_the_key_object(
    http: httpx.Client, account: Account, owner_sql: object
) -> None:
    owner_sql(account, "CREATE TABLE cities (id serial PRIMARY KEY, name text)")  # type: ignore[operator]
    response = create(http, account, "app", table_grants(
        [("public", "cities", ["select", "insert"])], create_schemas=("public",)))
    assert response.status_code == 201
    key = response.json()
    assert set(key) == {"name", "user", "type", "token", "grants", "created_at", "updated_at",
                        # grantkey's additions (carto-compat §4 allows them)
                        "expires_at", "expired", "limits", "rate_limit", "restrictions",
                        "last_used_at", "token_rotated_at",
                        "old_token_stops_at"}
    assert key["name"] == "app" and key["type"] == "regular"
    assert key["user"] == {"username": account.username}
    assert re.fullmatch(r"gkr[0-9A-Za-z]{38}", key["token"])
    assert TIMESTAMP.fullmatch(key["created_at"]) and TIMESTAMP.fullmatch(key["updated_at"])
    assert key["grants"] == [
        {"type": "apis", "apis": ["sql"]},
        {"type": "database",
         "tables": [{"schema": "public", "name": "cities", "permissions": ["insert", "select"],
                     "owner": False}],
         "schemas": [{"name": "public", "permissions": ["create", "usage"]}]},
    ]
    body = response.text.replace(key["token"], "")  # a random token may spell anything
    assert '"id"' not in body and "gk_" not in body  # no ids or role names


def test_create_accepts_the_collection_url_with_a_trailing_slash(
    http: httpx.Client, account: Account
) -> None:
    response = http.post(account.keys_url + "/", params=account.master(),
                         json={"name": "slash", "grants": apis_only("sql")})
    assert response.status_code == 201


def test_create_with_dataservices_and_table_metadata_shows_them(
    http: httpx.Client, account: Account
) -> None:
    grants = [{"type": "apis", "apis": []},
              {"type": "database", "table_metadata": []},
              {"type": "dataservices", "services": ["geocoding", "routing"]}]
    key = create(http, account, "meta", grants).json()
    assert key["grants"] == [
        {"type": "apis", "apis": []},
        {"type": "database", "tables": [], "schemas": [], "table_metadata": []},
        {"type": "dataservices", "services": ["geocoding", "routing"]},
    ]


def test_show_key_returns_the_same_object(http: httpx.Client, account: Account) -> None:
    created = create(http, account, "shown", apis_only("maps")).json()
    response = http.get(f"{account.keys_url}/shown", params=account.master())
    assert response.status_code == 200
    assert response.json() == created


def test_show_key_with_a_hostile_name_in_the_url(http: httpx.Client, account: Account) -> None:
    name = "my key; DROP ROLE x -- ünïcode \"q\" 'q' %"
    assert create(http, account, name, apis_only("sql")).status_code == 201
    response = http.get(f"{account.keys_url}/{quote(name, safe='')}", params=account.master())
    assert response.status_code == 200 and response.json()["name"] == name


def test_show_unknown_key_is_404_api_key_not_found(http: httpx.Client, account: Account) -> None:
    response = http.get(f"{account.keys_url}/nope", params=account.master())
    assert response.status_code == 404
    assert response.json() == {"errors": "API key not found: nope", "errors_cause": None}


def test_master_and_default_keys_exist_with_fixed_names_and_types(
    http: httpx.Client, account: Account
) -> None:
    master = http.get(f"{account.keys_url}/Master", params=account.master()).json()
    default = http.get(f"{account.keys_url}/Default%20public", params=account.master()).json()
    assert (master["type"], master["token"]) == ("master", account.master_token)
    assert (default["type"], default["token"]) == ("default", "default_public")
    for key in (master, default):
        assert key["grants"][1] == {"type": "database", "tables": [], "schemas": []}


def test_delete_regular_key_answers_204_with_empty_body(
    http: httpx.Client, account: Account
) -> None:
    token = create(http, account, "gone", apis_only("sql")).json()["token"]
    response = http.delete(f"{account.keys_url}/gone", params=account.master())
    assert response.status_code == 204 and response.content == b""
    assert http.get(f"{account.keys_url}/gone", params=account.master()).status_code == 404
    assert http.get(account.keys_url, params={"api_key": token}).status_code == 401


def test_delete_unknown_key_is_404(http: httpx.Client, account: Account) -> None:
    response = http.delete(f"{account.keys_url}/nope", params=account.master())
    assert response.status_code == 404
    assert response.json()["errors"] == "API key not found: nope"


def test_delete_master_or_default_key_is_403(http: httpx.Client, account: Account) -> None:
    for name in ("Master", "Default%20public"):
        response = http.delete(f"{account.keys_url}/{name}", params=account.master())
        assert response.status_code == 403
        assert response.json() == {"errors": FORBIDDEN, "errors_cause": None}


def test_regenerate_returns_a_new_token_and_the_old_one_stops_working(
    http: httpx.Client, account: Account
) -> None:
    old = create(http, account, "rot", apis_only("sql")).json()
    response = http.post(f"{account.keys_url}/rot/token/regenerate", params=account.master())
    assert response.status_code == 200
    new = response.json()
    assert new["token"] != old["token"] and new["name"] == "rot"
    assert http.get(f"{account.keys_url}/rot", params={"api_key": old["token"]}).status_code == 401
    assert http.get(f"{account.keys_url}/rot", params={"api_key": new["token"]}).status_code == 200


def test_regenerate_master_token(http: httpx.Client, account: Account) -> None:
    response = http.post(f"{account.keys_url}/Master/token/regenerate", params=account.master())
    assert response.status_code == 200
    new_token = response.json()["token"]
    assert new_token.startswith("gkm") and new_token != account.master_token
    assert http.get(account.keys_url, params=account.master()).status_code == 401
    assert http.get(account.keys_url, params={"api_key": new_token}).status_code == 200


def test_regenerate_default_public_is_403_and_token_unchanged(
    http: httpx.Client, account: Account
) -> None:
    response = http.post(f"{account.keys_url}/Default%20public/token/regenerate",
                         params=account.master())
    assert response.status_code == 403
    assert response.json()["errors"] == FORBIDDEN
    shown = http.get(f"{account.keys_url}/Default%20public", params=account.master()).json()
    assert shown["token"] == "default_public"


def test_regenerate_unknown_key_is_404(http: httpx.Client, account: Account) -> None:
    response = http.post(f"{account.keys_url}/nope/token/regenerate", params=account.master())
    assert response.status_code == 404


def test_non_master_key_cannot_create_delete_or_regenerate_401(
    http: httpx.Client, account: Account
) -> None:
    token = create(http, account, "weak", apis_only("sql")).json()["token"]
    weak = {"api_key": token}
    for api_key in (weak, {"api_key": "default_public"}):
        assert http.post(account.keys_url, params=api_key,
                         json={"name": "x", "grants": apis_only("sql")}).status_code == 401
        assert http.delete(f"{account.keys_url}/weak", params=api_key).status_code == 401
        assert http.post(f"{account.keys_url}/weak/token/regenerate",
                         params=api_key).status_code == 401


def test_keys_are_not_editable_no_put_or_patch(http: httpx.Client, account: Account) -> None:
    create(http, account, "fixed", apis_only("sql"))
    for method in ("PUT", "PATCH"):
        response = http.request(method, f"{account.keys_url}/fixed", params=account.master(),
                                json={"name": "fixed", "grants": apis_only("maps")})
        assert response.status_code in (404, 405)
    shown = http.get(f"{account.keys_url}/fixed", params=account.master()).json()
    assert shown["grants"][0] == {"type": "apis", "apis": ["sql"]}


def test_unknown_user_is_404_naming_the_user(http: httpx.Client, account: Account) -> None:
    response = http.get(f"{account.base_url}/user/nobody-here/api/v3/api_keys",
                        params=account.master())
    assert response.status_code == 404
    assert "grantkey user 'nobody-here'" in response.json()["errors"]


def test_u_prefix_and_host_form_reach_the_same_keys(http: httpx.Client, account: Account) -> None:
    via_u = http.get(f"{account.base_url}/u/{account.username}/api/v3/api_keys",
                     params=account.master())
    via_host = http.get(f"{account.base_url}/api/v3/api_keys", params=account.master(),
                        headers={"Host": f"{account.username}.example.com"})
    assert via_u.status_code == via_host.status_code == 200
    assert via_u.json()["total"] == via_host.json()["total"] == 2


def test_create_with_a_body_that_is_not_json_is_400(http: httpx.Client, account: Account) -> None:
    response = http.post(account.keys_url, params=account.master(), content=b"{nope",
                         headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["errors"]
