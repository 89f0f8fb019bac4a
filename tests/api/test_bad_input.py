"""Bad input gets a clear 4xx, never a 500 or a stack trace (invariant 8)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Account
from tests.support import apis_only

pytestmark = pytest.mark.in_process


@pytest.mark.parametrize("segment", ["%00", "%FF", "%ED%A0%80", "a%00b", "x" * 5000])
def test_odd_key_names_in_the_url_are_404(
    http: httpx.Client, account: Account, segment: str
) -> None:
    for method in ("GET", "DELETE"):
        response = http.request(method, f"{account.keys_url}/{segment}", params=account.master())
        assert response.status_code == 404
        assert response.json()["errors"].startswith("API key not found")


@pytest.mark.parametrize("username", ["%00", "%FF", "..", "a" * 300, "UPPER", "a%20b"])
def test_odd_usernames_in_the_url_are_404(
    http: httpx.Client, account: Account, username: str
) -> None:
    response = http.get(f"{account.base_url}/user/{username}/api/v3/api_keys",
                        params=account.master())
    assert response.status_code == 404
    assert "we can't find grantkey user" in response.json()["errors"]


@pytest.mark.parametrize("text", ["a\x00b", "\x00"])
def test_nul_bytes_in_grants_are_a_validation_error(
    http: httpx.Client, account: Account, text: str
) -> None:
    grants = [*apis_only("sql"), {"type": "database", "tables": [
        {"schema": "public", "name": text, "permissions": ["select"]}],
        "schemas": [{"name": text, "permissions": ["create"]}]}]
    response = http.post(account.keys_url, params=account.master(),
                         json={"name": "nul", "grants": grants})
    assert response.status_code == 422
    assert "can only grant" in response.json()["errors"]


def test_nul_byte_in_key_name_is_a_validation_error(http: httpx.Client, account: Account) -> None:
    response = http.post(account.keys_url, params=account.master(),
                         json={"name": "a\x00b", "grants": apis_only("sql")})
    assert response.status_code == 422
    assert "Name can't contain control, format or invisible characters" in response.json()["errors"]


def test_key_name_of_10000_characters_is_a_validation_error(
    http: httpx.Client, account: Account
) -> None:
    response = http.post(account.keys_url, params=account.master(),
                         json={"name": "n" * 10_000, "grants": apis_only("sql")})
    assert response.status_code == 422
    assert "Name is too long" in response.json()["errors"]


def test_invalid_utf8_body_is_400(http: httpx.Client, account: Account) -> None:
    response = http.post(account.keys_url, params=account.master(), content=b'{"name": "\xff"}',
                         headers={"content-type": "application/json"})
    assert response.status_code == 400


def test_json_body_that_is_not_an_object_is_400(http: httpx.Client, account: Account) -> None:
    response = http.post(account.keys_url, params=account.master(), json=[1, 2])
    assert response.status_code == 400
    assert "JSON object" in response.json()["errors"]


def test_many_grant_entries_are_validated_without_crashing(
    http: httpx.Client, account: Account
) -> None:
    tables = [{"schema": "public", "name": f"t{i}", "permissions": ["select"]}
              for i in range(10_000)]
    response = http.post(account.keys_url, params=account.master(),
                         json={"name": "big", "grants": [*apis_only("sql"),
                                                         {"type": "database", "tables": tables}]})
    assert response.status_code == 422
    assert response.json()["errors"] == ("Validation failed: Grants can only grant table "
                                         "permissions you have")


def test_unknown_routes_and_methods_answer_json(http: httpx.Client, account: Account) -> None:
    missing = http.get(f"{account.base_url}/nowhere")
    assert missing.status_code == 404 and missing.json() == {"error": ["Not Found"]}
    wrong = http.put(account.keys_url, params=account.master())
    assert wrong.status_code == 405 and "Allow" in wrong.headers


def test_sql_query_over_the_size_limit_is_400(http: httpx.Client, account: Account) -> None:
    q = "SELECT 1 -- " + "x" * 300_000
    response = http.post(account.sql_url, data={"q": q, "api_key": account.master_token})
    assert response.status_code == 400
    assert response.json() == {"error": ["The sql query is too long: the limit is 262144 bytes"]}


def test_sql_query_with_a_nul_byte_is_400(http: httpx.Client, account: Account) -> None:
    response = http.post(account.sql_url, json={"q": "SELECT 1\x00", "api_key":
                                                account.master_token})
    assert response.status_code == 400 and "NUL" in response.json()["error"][0]


@pytest.mark.parametrize(("name", "value"), [("rows_per_page", "10000000000"),
                                             ("rows_per_page", "0"), ("page", "-1"),
                                             ("dp", "99"), ("dp", "x")])
def test_absurd_sql_paging_parameters_are_400(
    http: httpx.Client, account: Account, name: str, value: str
) -> None:
    response = account.sql(http, "SELECT 1", account.master_token, **{name: value})
    assert response.status_code == 400
    assert response.json()["error"][0].startswith(f"Invalid {name} parameter")


@pytest.mark.parametrize("value", ["²", "٣", "９"])
def test_digits_that_are_not_ascii_answer_400_everywhere(
    http: httpx.Client, account: Account, value: str,
) -> None:
    datasets = f"{account.base_url}/user/{account.username}/api/v4/datasets"
    for url, params in [
        (account.keys_url, {"page": value}), (account.keys_url, {"per_page": value}),
        (datasets, {"page": value}),
        (account.sql_url, {"q": "SELECT 1", "page": value, "rows_per_page": "1"}),
        (account.sql_url, {"q": "SELECT 1", "rows_per_page": value}),
        (account.sql_url, {"q": "SELECT 1", "format": "geojson", "dp": value}),
    ]:
        response = http.get(url, params={**account.master(), **params})
        assert response.status_code == 400, (url, params, response.text)
