"""Every 422 validation message of carto-compat §4, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Account, Login
from tests.support import ServerProcess, apis_only

pytestmark = pytest.mark.in_process


def post(http: httpx.Client, account: Account, body: dict[str, Any]) -> httpx.Response:
    return http.post(account.keys_url, params=account.master(), json=body)


def failed(*messages: str) -> dict[str, Any]:
    return {"errors": "Validation failed: " + ", ".join(messages), "errors_cause": None}


@pytest.mark.parametrize("grants", [None, "sql", {"type": "apis", "apis": ["sql"]}])
def test_grants_has_to_be_an_array(http: httpx.Client, account: Account, grants: Any) -> None:
    body = {"name": "k"} if grants is None else {"name": "k", "grants": grants}
    response = post(http, account, body)
    assert response.status_code == 422
    assert response.json() == failed("Grants grants has to be an array")


@pytest.mark.parametrize("grants", [[], [{"type": "database"}], apis_only("sql") * 2])
def test_only_one_apis_section_is_allowed(
    http: httpx.Client, account: Account, grants: list[Any]
) -> None:
    response = post(http, account, {"name": "k", "grants": grants})
    assert response.status_code == 422
    assert "Grants only one apis section is allowed" in response.json()["errors"]


def test_only_one_database_section_is_allowed(http: httpx.Client, account: Account) -> None:
    grants = [*apis_only("sql"), {"type": "database"}, {"type": "database"}]
    response = post(http, account, {"name": "k", "grants": grants})
    assert response.json() == failed("Grants only one database section is allowed")


def test_only_one_dataservices_section_is_allowed(http: httpx.Client, account: Account) -> None:
    grants = [*apis_only("sql"), {"type": "dataservices", "services": []},
              {"type": "dataservices", "services": []}]
    response = post(http, account, {"name": "k", "grants": grants})
    assert response.json() == failed("Grants only one dataservices section is allowed")


def test_apis_array_is_needed_for_type_apis(http: httpx.Client, account: Account) -> None:
    response = post(http, account, {"name": "k", "grants": [{"type": "apis"}]})
    assert response.json() == failed('Grants apis array is needed for type "apis"')


def test_property_value_did_not_match_allowed_values(http: httpx.Client, account: Account) -> None:
    grants = [*apis_only("sql"), {"type": "database", "tables": [
        {"schema": "public", "name": "t", "permissions": ["read"]}]}]
    response = post(http, account, {"name": "k", "grants": grants})
    assert response.status_code == 422
    assert response.json() == failed(
        "Grants The property '#/1/tables/0/permissions/0' value \"read\" did not match one of "
        "the following values: insert, select, update, delete")


def test_unknown_api_did_not_match_allowed_values(http: httpx.Client, account: Account) -> None:
    response = post(http, account, {"name": "k", "grants": apis_only("ftp")})
    assert response.json() == failed(
        "Grants The property '#/0/apis/0' value \"ftp\" did not match one of the following "
        "values: sql, maps, do")


def test_additional_properties_outside_of_the_schema(http: httpx.Client, account: Account) -> None:
    response = post(http, account, {"name": "k", "grants": [
        {"type": "apis", "apis": ["sql"], "extra": True}]})
    assert response.json() == failed(
        "Grants The property '#/0' contains additional properties [\"extra\"] outside of the "
        "schema when none are allowed")


def test_can_only_grant_table_permissions_you_have(http: httpx.Client, account: Account) -> None:
    grants = [*apis_only("sql"), {"type": "database", "tables": [
        {"schema": "public", "name": "missing", "permissions": ["select"]}]}]
    response = post(http, account, {"name": "k", "grants": grants})
    assert response.json() == failed("Grants can only grant table permissions you have")


def test_cannot_grant_system_catalogs_or_grantkey_metadata(
    http: httpx.Client, account: Account
) -> None:
    for schema, table in (("pg_catalog", "pg_authid"), ("grantkey_meta", "api_keys"),
                          ("information_schema", "tables")):
        grants = [*apis_only("sql"), {"type": "database", "tables": [
            {"schema": schema, "name": table, "permissions": ["select"]}]}]
        response = post(http, account, {"name": "k", "grants": grants})
        assert response.json() == failed("Grants can only grant table permissions you have")


def test_can_only_grant_schema_permissions_you_have(http: httpx.Client, account: Account) -> None:
    grants = [*apis_only("sql"), {"type": "database", "schemas": [
        {"name": "nowhere", "permissions": ["create"]}]}]
    response = post(http, account, {"name": "k", "grants": grants})
    assert response.json() == failed("Grants can only grant schema permissions you have")


@pytest.mark.parametrize("name", [None, "", "   "])
def test_name_cant_be_blank(http: httpx.Client, account: Account, name: Any) -> None:
    body = {"grants": apis_only("sql")} if name is None else {"name": name,
                                                              "grants": apis_only("sql")}
    assert post(http, account, body).json() == failed("Name can't be blank")


def test_name_has_already_been_taken(http: httpx.Client, account: Account) -> None:
    assert post(http, account, {"name": "dup", "grants": apis_only("sql")}).status_code == 201
    response = post(http, account, {"name": "dup", "grants": apis_only("sql")})
    assert response.json() == failed("Name has already been taken")


def test_names_are_case_sensitive(http: httpx.Client, account: Account) -> None:
    assert post(http, account, {"name": "Case", "grants": apis_only("sql")}).status_code == 201
    assert post(http, account, {"name": "case", "grants": apis_only("sql")}).status_code == 201


@pytest.mark.parametrize("name", ["Master", "Default public"])
def test_name_cannot_be_master_nor_default_public(
    http: httpx.Client, account: Account, name: str
) -> None:
    response = post(http, account, {"name": name, "grants": apis_only("sql")})
    assert response.json() == failed("Name api_key name cannot be Master nor Default public")


def test_name_and_grants_messages_are_joined(http: httpx.Client, account: Account) -> None:
    response = post(http, account, {"name": "", "grants": []})
    assert response.json() == failed("Name can't be blank",
                                     "Grants only one apis section is allowed")


def test_failed_validation_leaves_no_key(http: httpx.Client, account: Account) -> None:
    post(http, account, {"name": "half", "grants": [
        *apis_only("sql"), {"type": "database", "tables": [
            {"schema": "public", "name": "missing", "permissions": ["select"]}]}]})
    assert http.get(f"{account.keys_url}/half", params=account.master()).status_code == 404
    assert http.get(account.keys_url, params=account.master()).json()["total"] == 2


@pytest.fixture(scope="module")
def quota_server(data_dir: Path, login: Login, server: ServerProcess) -> Iterator[ServerProcess]:
    process = ServerProcess(
        login.args(data_dir), data_dir / "quota.log",
        {**login.env, "GRANTKEY_MAX_KEYS_PER_USER": "1"},
    )
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def test_key_quota_reached_is_403(
    http: httpx.Client, account: Account, quota_server: ServerProcess
) -> None:
    url = f"{quota_server.url}/user/{account.username}/api/v3/api_keys"
    first = http.post(url, params=account.master(), json={"name": "a", "grants": apis_only()})
    assert first.status_code == 201
    second = http.post(url, params=account.master(), json={"name": "b", "grants": apis_only()})
    assert second.status_code == 403
    assert second.json() == {"errors": "You have reached the limit of API keys for your plan",
                             "errors_cause": None}
