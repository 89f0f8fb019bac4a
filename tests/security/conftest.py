"""Fixtures of the security tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Account, KeyHandle, Login
from tests.security.quota_support import HEADROOM, set_quota
from tests.support import ServerProcess, table_grants


@pytest.fixture
def limited(account: Account, admin_url: str,
            owner_sql: Callable[[Account, str], None]) -> Iterator[Account]:
    """An account with a table `big` and a quota 3 MB above its size, not yet reached."""
    owner_sql(account, "CREATE TABLE big (id int, pad text); "
                       "CREATE TABLE other (id int, pad text)")
    set_quota(admin_url, account, HEADROOM)
    yield account
    set_quota(admin_url, account, None)


@pytest.fixture(scope="module")
def harsh(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """One worker with small limits: uploads may pause 2 s, a COPY may run 8 s, a client
    that reads nothing is dropped after 2 s; 6 key-role connections (3 per key, 4 per user)
    and 1 s of waiting for one."""
    server = ServerProcess(
        [*login.args(data_dir), "--workers", "1"], data_dir / "copy-attacks.log",
        {**login.env, "GRANTKEY_COPY_MAX_BYTES": str(256 * 2**20),
         "GRANTKEY_BODY_TIMEOUT": "2", "GRANTKEY_COPY_TIMEOUT": "8",
         "GRANTKEY_SEND_TIMEOUT": "2", "GRANTKEY_SQL_MAX_CONNECTIONS": "6",
         "GRANTKEY_SQL_POOL_WAIT": "1", "GRANTKEY_SQL_TIMEOUT": "3",
         "GRANTKEY_SQL_MASTER_TIMEOUT": "3"})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture
def loader(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    """A key that may read and insert `cities`; `secrets` is the owner's alone; `ids` has a
    primary key and may be read and filled by the key too."""
    owner_sql(account, "CREATE TABLE cities (name text, population int);"
                       "INSERT INTO cities VALUES ('Lima', 10), ('Quito', 3);"
                       "CREATE TABLE secrets (s text); INSERT INTO secrets VALUES ('hush');"
                       "CREATE TABLE ids (id int PRIMARY KEY, pad text)")
    return make_key(account, "loader", table_grants([
        ("public", "cities", ["select", "insert"]), ("public", "ids", ["select", "insert"])]))
