"""The real `carto` SDK (1.11.3, unchanged) against a live grantkey server over HTTP."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Account

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

carto_auth = pytest.importorskip("carto.auth")
carto_keys = pytest.importorskip("carto.api_keys")
rest_exceptions = pytest.importorskip("pyrestcli.exceptions")  # what the SDK raises


def manager(account: Account, token: str | None = None) -> object:
    client = carto_auth.APIKeyAuthClient(
        base_url=f"{account.base_url}/user/{account.username}/",
        api_key=token or account.master_token,
    )
    return carto_keys.APIKeyManager(client)


@pytest.fixture
def sdk_account(account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, "CREATE TABLE sdk_table (id serial PRIMARY KEY, name text)")
    return account


def test_sdk_create_get_all_and_filter(sdk_account: Account) -> None:
    keys = manager(sdk_account)
    created = keys.create(  # type: ignore[attr-defined]
        name="sdk-key", apis=["sql", "maps"],
        tables=[{"schema": "public", "name": "sdk_table", "permissions": ["select", "insert"]}],
    )
    assert created.name == "sdk-key" and created.type == "regular"
    assert created.token.startswith("gkr")
    assert created.created_at is not None  # the SDK parsed our timestamp format

    fetched = keys.get("sdk-key")  # type: ignore[attr-defined]
    assert fetched.token == created.token
    assert fetched.grants.apis == ["sql", "maps"]
    assert [t.name for t in fetched.grants.tables] == ["sdk_table"]
    assert sorted(fetched.grants.tables[0].permissions) == ["insert", "select"]

    everything = keys.all()  # type: ignore[attr-defined]
    assert sorted(k.name for k in everything) == ["Default public", "Master", "sdk-key"]
    masters = keys.filter(type="master")  # type: ignore[attr-defined]
    assert [k.type for k in masters] == ["master"]
    builtins = keys.filter(type="default,master")  # type: ignore[attr-defined]
    assert sorted(k.type for k in builtins) == ["default", "master"]


def test_sdk_pages_through_many_keys(sdk_account: Account) -> None:
    keys = manager(sdk_account)
    for index in range(25):  # more than the default page of 20
        keys.create(name=f"many-{index}", apis=["sql"])  # type: ignore[attr-defined]
    assert len(keys.all()) == 27  # type: ignore[attr-defined]


def test_sdk_regenerate_token(sdk_account: Account) -> None:
    keys = manager(sdk_account)
    key = keys.create(name="rotating", apis=["sql"])  # type: ignore[attr-defined]
    old = key.token
    key.regenerate_token()
    assert keys.get("rotating").token != old  # type: ignore[attr-defined]


def test_sdk_delete(sdk_account: Account) -> None:
    keys = manager(sdk_account)
    key = keys.create(name="doomed", apis=["sql"])  # type: ignore[attr-defined]
    key.delete()
    with pytest.raises(rest_exceptions.NotFoundException):
        keys.get("doomed")  # type: ignore[attr-defined]


def test_sdk_missing_key_raises_not_found_with_api_key_not_found(sdk_account: Account) -> None:
    keys = manager(sdk_account)
    with pytest.raises(rest_exceptions.NotFoundException) as caught:
        keys.get("does-not-exist")  # type: ignore[attr-defined]
    assert "API key not found" in str(caught.value)


def test_sdk_with_a_regular_key_sees_only_itself(sdk_account: Account) -> None:
    token = manager(sdk_account).create(name="self", apis=["sql"]).token  # type: ignore[attr-defined]
    mine = manager(sdk_account, token)
    assert [k.name for k in mine.all()] == ["self"]  # type: ignore[attr-defined]
