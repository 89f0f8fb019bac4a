"""Datasets (carto-compat §6): privacy changes and the metadata listing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Account, KeyHandle, Login
from tests.support import apis_only, table_grants

pytestmark = pytest.mark.in_process


@pytest.fixture
def tables(account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, "CREATE TABLE alpha (x int); INSERT INTO alpha VALUES (1);"
                       "CREATE TABLE beta (y int); CREATE TABLE gamma (z int);"
                       "CREATE SCHEMA other; CREATE TABLE other.delta (w int)")
    return account


def datasets_url(account: Account, name: str | None = None) -> str:
    base = f"{account.base_url}/user/{account.username}/api/v4/datasets"
    return base if name is None else f"{base}/{name}"


def patch(http: httpx.Client, account: Account, name: str, body: dict[str, Any],
          token: str | None = None) -> httpx.Response:
    return http.patch(datasets_url(account, name), json=body,
                      params={"api_key": token or account.master_token})


def test_privacy_public_and_link_are_readable_without_a_key(
    http: httpx.Client, tables: Account
) -> None:
    assert tables.sql(http, "SELECT * FROM alpha").status_code == 403
    response = patch(http, tables, "alpha", {"privacy": "public"})
    assert response.status_code == 200
    assert response.json()["privacy"] == "public" and response.json()["name"] == "alpha"
    assert tables.sql(http, "SELECT x FROM alpha").json()["rows"] == [{"x": 1}]
    assert patch(http, tables, "alpha", {"privacy": "link"}).json()["privacy"] == "link"
    assert tables.sql(http, "SELECT x FROM alpha").status_code == 200
    assert patch(http, tables, "alpha", {"privacy": "private"}).json()["privacy"] == "private"
    assert tables.sql(http, "SELECT x FROM alpha").status_code == 403


def test_privacy_in_another_schema(http: httpx.Client, tables: Account) -> None:
    assert patch(http, tables, "delta", {"privacy": "public", "schema": "other"}
                 ).status_code == 200
    assert tables.sql(http, "SELECT * FROM other.delta").status_code == 200


def test_regular_keys_inherit_public_tables_live(
    http: httpx.Client, tables: Account, make_key: Callable[..., KeyHandle]
) -> None:
    key = make_key(tables, "plain", apis_only("sql"))
    assert tables.sql(http, "SELECT * FROM beta", key.token).status_code == 403
    patch(http, tables, "beta", {"privacy": "public"})
    assert tables.sql(http, "SELECT * FROM beta", key.token).status_code == 200
    patch(http, tables, "beta", {"privacy": "private"})
    assert tables.sql(http, "SELECT * FROM beta", key.token).status_code == 403


def test_privacy_change_errors(
    http: httpx.Client, tables: Account, make_key: Callable[..., KeyHandle]
) -> None:
    bad = patch(http, tables, "alpha", {"privacy": "secret"})
    assert bad.status_code == 400 and "Wrong 'privacy' value" in bad.json()["errors"]
    missing = patch(http, tables, "nope", {"privacy": "public"})
    assert missing.status_code == 404
    assert missing.json()["errors"] == "Dataset not found: public.nope"
    key = make_key(tables, "regular", apis_only("sql"))
    forbidden = patch(http, tables, "alpha", {"privacy": "public"}, token=key.token)
    assert forbidden.status_code == 403
    assert patch(http, tables, "alpha", {"privacy": "public"}, token="gkrbad").status_code == 401


def test_listing_for_master_with_modes_and_pagination(
    http: httpx.Client, tables: Account
) -> None:
    patch(http, tables, "beta", {"privacy": "link"})
    response = http.get(datasets_url(tables), params={"api_key": tables.master_token,
                                                      "per_page": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 4 and body["count"] == 2
    assert set(body["_links"]) == {"first", "last", "next"}
    everything = http.get(datasets_url(tables), params={"api_key": tables.master_token}).json()
    rows = {(d["schema"], d["name"]): d for d in everything["result"]}
    assert rows[("public", "beta")]["privacy"] == "link"
    assert rows[("public", "alpha")]["privacy"] == "private"
    assert all(d["mode"] == "rw" for d in rows.values())
    assert set(rows[("public", "alpha")]) == {"schema", "name", "privacy", "updated_at", "mode"}


def test_listing_needs_master_or_table_metadata(
    http: httpx.Client, tables: Account, make_key: Callable[..., KeyHandle]
) -> None:
    plain = make_key(tables, "plain", table_grants([("public", "alpha", ["select"])]))
    assert http.get(datasets_url(tables), params={"api_key": plain.token}).status_code == 403
    assert http.get(datasets_url(tables), params={"api_key": "default_public"}).status_code == 403
    assert http.get(datasets_url(tables)).status_code == 401  # no key at all
    grants = table_grants([("public", "alpha", ["select"])])
    grants[1]["table_metadata"] = []
    meta = make_key(tables, "meta", grants)
    listed = http.get(datasets_url(tables), params={"api_key": meta.token}).json()["result"]
    modes = {d["name"]: d["mode"] for d in listed}
    assert modes == {"alpha": "r", "beta": None, "gamma": None, "delta": None}


def test_cli_sets_privacy(http: httpx.Client, tables: Account, login: Login) -> None:
    env = {**os.environ, **login.env}
    result = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", "datasets", "privacy", tables.username, "gamma",
         "public", "--database-url", login.database_url], capture_output=True, text=True,
        env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "public.gamma is now public" in result.stdout
    assert tables.sql(http, "SELECT * FROM gamma").status_code == 200
