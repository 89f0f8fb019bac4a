"""A flood of slow requests from one key (the default public key: no key at all) takes at
most its share of the connections: the user's master and another user keep being served."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Account, Login
from tests.support import ServerProcess

# each test starts its own server or cluster: out of the inner loop
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def six_slots(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """Six connections: a key gets 3 at most, a user 4."""
    server = ServerProcess(
        login.args(data_dir), data_dir / "flood.log",
        {**login.env, "GRANTKEY_SQL_MAX_CONNECTIONS": "6",
         "GRANTKEY_SQL_KEY_SHARE": "0.5", "GRANTKEY_SQL_USER_SHARE": "0.75",
         "GRANTKEY_SQL_POOL_WAIT": "1.5"})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def test_a_flood_of_anonymous_requests_leaves_the_master_and_other_users_served(
    six_slots: ServerProcess, account: Account, make_account: Callable[[], Account],
) -> None:
    neighbour = make_account()
    sql = f"{six_slots.url}/user/{account.username}/api/v2/sql"
    other_sql = f"{six_slots.url}/user/{neighbour.username}/api/v2/sql"

    def slow(_: int) -> int:
        return httpx.get(sql, params={"q": "SELECT pg_sleep(3)"}, timeout=30).status_code

    with ThreadPoolExecutor(24) as pool:
        flood = [pool.submit(slow, i) for i in range(24)]
        time.sleep(0.7)  # the flood holds its share, the rest of it waits
        master = [httpx.get(sql, params={"q": "SELECT 1 AS one", "api_key": account.master_token},
                            timeout=30) for _ in range(5)]
        other = [httpx.get(other_sql, params={"q": "SELECT 2 AS two"}, timeout=30)
                 for _ in range(5)]
        statuses = [f.result() for f in flood]
    assert [r.status_code for r in master] == [200] * 5, [r.text for r in master]
    assert [r.status_code for r in other] == [200] * 5, [r.text for r in other]
    assert statuses.count(200) >= 3 and statuses.count(429) > 0, statuses
    assert set(statuses) <= {200, 429}
