"""The seed's worked example, end to end through the SQL API and the datasets listing."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Account
from tests.support import table_grants

pytestmark = pytest.mark.in_process

SETUP = """
CREATE TABLE world_population (id serial PRIMARY KEY, country text, people bigint);
INSERT INTO world_population (country, people) VALUES ('Chile', 19), ('Peru', 33);
CREATE TABLE liked_cities (id serial PRIMARY KEY, name text);
CREATE TABLE national_incomes (country text, income numeric);
INSERT INTO national_incomes VALUES ('Chile', 1);
"""


@pytest.fixture
def example(http: httpx.Client, account: Account,
            owner_sql: Callable[[Account, str], None]) -> tuple[Account, str]:
    owner_sql(account, SETUP)
    grants = table_grants([("public", "world_population", ["select"]),
                           ("public", "liked_cities", ["select", "insert"])],
                          create_schemas=("public",))
    grants[1]["table_metadata"] = []
    response = http.post(account.keys_url, params=account.master(),
                         json={"name": "worked", "grants": grants})
    assert response.status_code == 201
    return account, response.json()["token"]


def status(http: httpx.Client, account: Account, token: str, q: str) -> tuple[int, str]:
    response = account.sql(http, q, token)
    body = response.json()
    return response.status_code, (body.get("error") or [""])[0]


def test_worked_example_through_the_sql_api(
    http: httpx.Client, example: tuple[Account, str]
) -> None:
    account, token = example
    ok = account.sql(http, "SELECT country FROM world_population ORDER BY id", token)
    assert ok.status_code == 200 and [r["country"] for r in ok.json()["rows"]] == ["Chile", "Peru"]
    for q in ("UPDATE world_population SET people = 0",
              "DELETE FROM world_population",
              "INSERT INTO world_population (country) VALUES ('x')"):
        assert status(http, account, token, q) == (403, "permission denied for table "
                                                    "world_population")
    inserted = account.sql(http, "INSERT INTO liked_cities (name) VALUES ('Lima')", token)
    assert inserted.status_code == 200 and inserted.json()["total_rows"] == 1
    assert status(http, account, token, "SELECT * FROM national_incomes") == (
        403, "permission denied for table national_incomes")
    assert status(http, account, token, "DELETE FROM national_incomes")[0] == 403

    made = account.sql(http, "CREATE TABLE my_copy AS SELECT * FROM world_population", token)
    assert made.status_code == 200
    assert account.sql(http, "ALTER TABLE my_copy ADD COLUMN note text", token).status_code == 200
    assert account.sql(http, "DROP TABLE my_copy", token).status_code == 200
    assert status(http, account, token, "DROP TABLE world_population") == (
        400, "must be owner of table world_population")


def test_worked_example_table_metadata_lists_without_reading(
    http: httpx.Client, example: tuple[Account, str]
) -> None:
    account, token = example
    listing = http.get(f"{account.base_url}/user/{account.username}/api/v4/datasets",
                       params={"api_key": token})
    assert listing.status_code == 200
    by_name = {d["name"]: d for d in listing.json()["result"]}
    assert set(by_name) == {"world_population", "liked_cities", "national_incomes"}
    assert by_name["national_incomes"]["mode"] is None
    assert by_name["world_population"]["mode"] == "r"
    assert by_name["liked_cities"]["mode"] == "rw"
    assert status(http, account, token, "SELECT * FROM national_incomes")[0] == 403
