"""The real `carto` SDK's BatchSQLClient against a live server, with a regular key (CARTO
allows only the master)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import table_grants

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("job_runners")]
carto_auth = pytest.importorskip("carto.auth")
carto_sql = pytest.importorskip("carto.sql")
carto_exceptions = pytest.importorskip("carto.exceptions")


@pytest.fixture
def writer(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE log (n int)")
    return make_key(account, "writer", table_grants([("public", "log", ["select", "insert"])]))


def batch(account: Account, token: str) -> Any:
    client = carto_auth.APIKeyAuthClient(
        base_url=f"{account.base_url}/user/{account.username}/", api_key=token)
    return carto_sql.BatchSQLClient(client)


def logged(http: httpx.Client, account: Account) -> list[int]:
    answer = account.sql(http, "SELECT n FROM log ORDER BY n", account.master_token)
    return [row["n"] for row in answer.json()["rows"]]


def test_create_read_and_wait_for_completion(account: Account, writer: KeyHandle,
                                             http: httpx.Client) -> None:
    jobs = batch(account, writer.token)
    created = jobs.create(["INSERT INTO log VALUES (1)", "INSERT INTO log VALUES (2)"])
    assert created["status"] == "pending" and created["user"] == account.username
    assert jobs.read(created["job_id"])["job_id"] == created["job_id"]
    finished = jobs.create_and_wait_for_completion("INSERT INTO log VALUES (3)")
    assert finished["status"] == "done"
    assert jobs.read(created["job_id"])["status"] == "done"
    assert logged(http, account) == [1, 2, 3]


def test_a_failed_job_raises_from_create_and_wait(account: Account, writer: KeyHandle) -> None:
    jobs = batch(account, writer.token)
    with pytest.raises(carto_exceptions.CartoException, match="failed"):
        jobs.create_and_wait_for_completion("INSERT INTO nope VALUES (1)")


def test_update_a_pending_job_then_cancel_it_and_cancel_a_done_one(
        account: Account, writer: KeyHandle, http: httpx.Client) -> None:
    jobs = batch(account, writer.token)
    master = batch(account, account.master_token)
    blocker = master.create("SELECT pg_sleep(60)")  # the user's later jobs wait behind it
    pending = jobs.create("INSERT INTO log VALUES (1)")
    updated = jobs.update(pending["job_id"], "INSERT INTO log VALUES (2)")
    assert updated["query"] == "INSERT INTO log VALUES (2)"
    assert jobs.cancel(pending["job_id"]) == "cancelled"
    assert master.cancel(blocker["job_id"]) == "cancelled"
    done = jobs.create_and_wait_for_completion("INSERT INTO log VALUES (3)")
    assert jobs.cancel(done["job_id"]) == "done"  # the SDK's reading of CARTO's 400
    assert logged(http, account) == [3]


def test_another_keys_job_is_not_found_through_the_sdk(
        account: Account, writer: KeyHandle, make_key: Callable[..., KeyHandle]) -> None:
    other = make_key(account, "other", table_grants([("public", "log", ["select"])]))
    created = batch(account, writer.token).create("SELECT 1")
    with pytest.raises(carto_exceptions.CartoException, match="not found"):
        batch(account, other.token).read(created["job_id"])
    with pytest.raises(carto_exceptions.CartoException, match="not found"):
        batch(account, other.token).cancel(created["job_id"])
