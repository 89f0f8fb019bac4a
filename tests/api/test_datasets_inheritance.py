"""Privacy applies to a whole inheritance or partition tree: reading a parent reads its
children's rows, so a private child of a public parent would leak through the parent."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Account

pytestmark = pytest.mark.in_process


@pytest.fixture
def trees(account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, """
        CREATE TABLE parent (a text);
        CREATE TABLE child (b int) INHERITS (parent);
        CREATE TABLE grandchild () INHERITS (child);
        INSERT INTO parent VALUES ('p'); INSERT INTO child VALUES ('c', 1);
        INSERT INTO grandchild VALUES ('g', 2);
        CREATE TABLE measures (day date, v int) PARTITION BY RANGE (day);
        CREATE TABLE measures_2026 PARTITION OF measures
            FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        INSERT INTO measures VALUES ('2026-05-01', 7);
    """)
    return account


def patch(http: httpx.Client, account: Account, table: str, privacy: str) -> httpx.Response:
    url = f"{account.base_url}/user/{account.username}/api/v4/datasets/{table}"
    return http.patch(url, params=account.master(), json={"privacy": privacy})


def test_making_a_parent_public_or_private_takes_its_whole_tree(
    http: httpx.Client, trees: Account,
) -> None:
    assert patch(http, trees, "parent", "public").status_code == 200
    for table in ("parent", "child", "grandchild"):
        assert trees.sql(http, f"SELECT * FROM {table}").status_code == 200, table
    listed = {d["name"]: d["privacy"] for d in http.get(
        f"{trees.base_url}/user/{trees.username}/api/v4/datasets",
        params=trees.master()).json()["result"]}
    assert listed["child"] == listed["grandchild"] == "public"
    assert patch(http, trees, "parent", "private").status_code == 200
    for table in ("parent", "child", "grandchild"):
        assert trees.sql(http, f"SELECT * FROM {table}").status_code == 403, table


@pytest.mark.parametrize(("table", "parent"), [
    ("child", "public.parent"), ("grandchild", "public.child"),
    ("measures_2026", "public.measures"),
])
def test_a_member_of_a_tree_cannot_be_given_its_own_privacy(
    http: httpx.Client, trees: Account, table: str, parent: str,
) -> None:
    response = patch(http, trees, table, "public")
    assert response.status_code == 400
    assert response.json()["errors"] == (
        f"public.{table} inherits from (or is a partition of) {parent}: privacy applies to a "
        "whole inheritance tree, so change the privacy of its root")
    assert trees.sql(http, f"SELECT * FROM {table}").status_code == 403


def test_a_partitioned_table_made_public_takes_its_partitions(
    http: httpx.Client, trees: Account,
) -> None:
    assert patch(http, trees, "measures", "link").status_code == 200
    assert trees.sql(http, "SELECT v FROM measures").json()["rows"] == [{"v": 7}]
    assert trees.sql(http, "SELECT v FROM measures_2026").json()["rows"] == [{"v": 7}]
