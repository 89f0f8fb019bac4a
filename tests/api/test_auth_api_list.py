"""Listing keys (E1): pagination links, exact totals, ordering, filters, self-view."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.conftest import Account
from tests.support import apis_only

pytestmark = pytest.mark.in_process


@pytest.fixture
def five_keys(http: httpx.Client, account: Account) -> Account:
    """Master, default public and three regular keys: five in all."""
    for name in ("charlie", "alpha", "bravo"):
        response = http.post(account.keys_url, params=account.master(),
                             json={"name": name, "grants": apis_only("sql")})
        assert response.status_code == 201
    return account


def page_of(href: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(href).query)


def test_list_pagination_links_for_5_keys_with_per_page_2(
    http: httpx.Client, five_keys: Account
) -> None:
    url = five_keys.keys_url
    first = http.get(url, params={**five_keys.master(), "per_page": 2}).json()
    assert (first["total"], first["count"]) == (5, 2)
    assert set(first["_links"]) == {"first", "last", "next"}
    assert page_of(first["_links"]["last"]["href"])["page"] == ["3"]
    assert page_of(first["_links"]["next"]["href"])["page"] == ["2"]

    middle = http.get(url, params={**five_keys.master(), "per_page": 2, "page": 2}).json()
    assert set(middle["_links"]) == {"first", "last", "prev", "next"}
    assert page_of(middle["_links"]["prev"]["href"])["page"] == ["1"]
    assert page_of(middle["_links"]["next"]["href"])["page"] == ["3"]

    last = http.get(url, params={**five_keys.master(), "per_page": 2, "page": 3}).json()
    assert (last["total"], last["count"]) == (5, 1)
    assert set(last["_links"]) == {"first", "last", "prev"}
    names = [k["name"] for p in (first, middle, last) for k in p["result"]]
    assert len(set(names)) == 5


def test_list_links_keep_other_parameters_but_never_echo_api_key(
    http: httpx.Client, five_keys: Account
) -> None:
    body = http.get(five_keys.keys_url, params={**five_keys.master(), "per_page": 2,
                                                "order": "name"}).json()
    for link in body["_links"].values():
        query = page_of(link["href"])
        assert "api_key" not in query
        assert query["order"] == ["name"] and query["per_page"] == ["2"]
    assert five_keys.master_token not in str(body["_links"])


def test_list_items_have_self_links(http: httpx.Client, five_keys: Account) -> None:
    body = http.get(five_keys.keys_url, params=five_keys.master()).json()
    for key in body["result"]:
        shown = http.get(key["_links"]["self"], params=five_keys.master())
        assert shown.json()["name"] == key["name"]


def test_list_orders_master_then_default_then_regular(
    http: httpx.Client, five_keys: Account
) -> None:
    body = http.get(five_keys.keys_url, params={**five_keys.master(), "order": "name"}).json()
    assert [k["type"] for k in body["result"]] == ["master", "default", "regular", "regular",
                                                   "regular"]
    assert [k["name"] for k in body["result"][2:]] == ["alpha", "bravo", "charlie"]
    desc = http.get(five_keys.keys_url, params={**five_keys.master(), "order": "name",
                                                "order_direction": "desc"}).json()
    assert [k["name"] for k in desc["result"][2:]] == ["charlie", "bravo", "alpha"]


def test_list_default_order_is_updated_at(http: httpx.Client, five_keys: Account) -> None:
    body = http.get(five_keys.keys_url, params=five_keys.master()).json()
    assert [k["name"] for k in body["result"][2:]] == ["charlie", "alpha", "bravo"]


@pytest.mark.parametrize(("type_filter", "expected"), [
    ("master", ["master"]),
    ("regular", ["regular"] * 3),
    ("default,master", ["master", "default"]),
    (" default , regular ", ["default", "regular", "regular", "regular"]),
    ("", ["master", "default", "regular", "regular", "regular"]),
])
def test_list_type_filter(
    http: httpx.Client, five_keys: Account, type_filter: str, expected: list[str]
) -> None:
    body = http.get(five_keys.keys_url, params={**five_keys.master(), "type": type_filter}).json()
    assert [k["type"] for k in body["result"]] == expected
    assert body["total"] == len(expected)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("page", "0", "Wrong 'page' parameter value."),
    ("page", "-1", "Wrong 'page' parameter value."),
    ("page", "x", "Wrong 'page' parameter value."),
    ("per_page", "0", "Wrong 'per_page' parameter value."),
    ("per_page", "100000000", "Wrong 'per_page' parameter value."),
    ("order", "id", "Wrong 'order' parameter value. Valid values are one of "
                    "[\"type\", \"name\", \"updated_at\"]"),
    ("order_direction", "up", "Wrong 'order_direction' parameter value. Valid values are one "
                              "of [\"asc\", \"desc\"]"),
    ("type", "master,root", "Wrong 'type' parameter value. Valid values are one of "
                            "[\"master\", \"default\", \"regular\"]"),
])
def test_list_bad_parameters_are_400(
    http: httpx.Client, account: Account, name: str, value: str, message: str
) -> None:
    response = http.get(account.keys_url, params={**account.master(), name: value})
    assert response.status_code == 400
    assert response.json() == {"errors": message, "errors_cause": None}


def test_non_master_list_sees_only_itself(http: httpx.Client, five_keys: Account) -> None:
    token = http.get(f"{five_keys.keys_url}/alpha", params=five_keys.master()).json()["token"]
    body = http.get(five_keys.keys_url, params={"api_key": token}).json()
    assert body["total"] == 1 and [k["name"] for k in body["result"]] == ["alpha"]
    public = http.get(five_keys.keys_url, params={"api_key": "default_public"}).json()
    assert public["total"] == 1 and public["result"][0]["type"] == "default"


def test_non_master_show_other_key_is_404(http: httpx.Client, five_keys: Account) -> None:
    token = http.get(f"{five_keys.keys_url}/alpha", params=five_keys.master()).json()["token"]
    assert http.get(f"{five_keys.keys_url}/alpha", params={"api_key": token}).status_code == 200
    for other in ("bravo", "Master"):
        response = http.get(f"{five_keys.keys_url}/{other}", params={"api_key": token})
        assert response.status_code == 404
        assert response.json()["errors"] == f"API key not found: {other}"
