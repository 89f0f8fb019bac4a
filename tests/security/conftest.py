"""Fixtures of the security tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import Account
from tests.security.quota_support import HEADROOM, set_quota


@pytest.fixture
def limited(account: Account, admin_url: str,
            owner_sql: Callable[[Account, str], None]) -> Iterator[Account]:
    """An account with a table `big` and a quota 3 MB above its size, not yet reached."""
    owner_sql(account, "CREATE TABLE big (id int, pad text); "
                       "CREATE TABLE other (id int, pad text)")
    set_quota(admin_url, account, HEADROOM)
    yield account
    set_quota(admin_url, account, None)
