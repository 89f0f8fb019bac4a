"""The real `carto` SDK's SQLClient against a live grantkey server."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Account

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
carto_auth = pytest.importorskip("carto.auth")
carto_keys = pytest.importorskip("carto.api_keys")
carto_sql = pytest.importorskip("carto.sql")
carto_exceptions = pytest.importorskip("carto.exceptions")


def client(account: Account, token: str) -> object:
    return carto_auth.APIKeyAuthClient(
        base_url=f"{account.base_url}/user/{account.username}/", api_key=token)


@pytest.fixture
def sdk_account(account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, "CREATE TABLE granted (id int); INSERT INTO granted VALUES (1), (2);"
                       "CREATE TABLE hidden (secret text)")
    return account


def test_sql_client_with_master_key(sdk_account: Account) -> None:
    sql = carto_sql.SQLClient(client(sdk_account, sdk_account.master_token))
    result = sql.send("SELECT id FROM granted ORDER BY id")
    assert result["rows"] == [{"id": 1}, {"id": 2}] and result["total_rows"] == 2
    csv = sql.send("SELECT id FROM granted ORDER BY id", format="csv")
    assert csv.decode().splitlines() == ["id", "1", "2"]


def test_sql_client_with_a_regular_key_and_permission_denied(sdk_account: Account) -> None:
    keys = carto_keys.APIKeyManager(client(sdk_account, sdk_account.master_token))
    token = keys.create(name="sdk-sql", apis=["sql"], tables=[
        {"schema": "public", "name": "granted", "permissions": ["select"]}]).token
    auth = client(sdk_account, token)
    sql = carto_sql.SQLClient(auth)
    assert sql.send("SELECT count(*) AS n FROM granted")["rows"] == [{"n": 2}]
    # pyrestcli turns every 403 into the text "Access denied" (as it does against CARTO):
    with pytest.raises(carto_exceptions.CartoException, match="Access denied"):
        sql.send("SELECT * FROM hidden")
    # ...while the answer the SDK received names the problem, per carto-compat §5:
    raw = auth.send("api/v2/sql", "GET", params={"q": "SELECT * FROM hidden"})  # type: ignore[attr-defined]
    assert raw.status_code == 403
    assert raw.json() == {"error": ["permission denied for table hidden"], "hint": (
        'key "sdk-sql" has no permission on public.hidden. Keys are immutable: create a key '
        "with the permission the statement needs")}
