"""3,000 regular keys granted SELECT on one table: past PostgreSQL's direct-grant limit."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from grantkey.services.container import Services
from tests.conftest import Account, builtin_handle
from tests.support import table_grants

KEYS = 3000


@pytest.mark.slow
def test_3000_keys_with_select_on_one_table_all_work(
    account: Account, services: Services, run: Callable[[Awaitable[Any]], Any],
    owner_sql: Callable[[Account, str], None], admin_url: str, box: Any,
) -> None:
    owner_sql(account, "CREATE TABLE popular (id int); INSERT INTO popular VALUES (42)")
    grants = table_grants([("public", "popular", ["select"])])

    async def create_all() -> list[tuple[str, str]]:
        master = await services.keys.master_principal(account.user)
        made = []
        for index in range(KEYS):
            view = await services.keys.create(master, f"key-{index}", grants)
            assert view.token is not None
            made.append((view.record.role, view.token))
        return made

    keys = run(create_all())
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        acl_size = conn.execute(
            "SELECT cardinality(relacl) FROM pg_class WHERE relname = 'popular'").fetchone()
        allowed = conn.execute(
            "SELECT count(*) FROM unnest(%s::text[]) AS r(name) "
            "WHERE has_table_privilege(r.name, 'public.popular', 'SELECT')",
            [[role for role, _ in keys]]).fetchone()
    assert acl_size is not None and acl_size[0] <= 2, "the table's ACL must stay small"
    assert allowed == (KEYS,)
    sample = [keys[0], keys[-1], *random.sample(keys, 25)]
    for role, token in sample:
        with builtin_handle(services, box, account, role, token).connect() as conn:
            assert conn.execute("SELECT id FROM popular").fetchall() == [(42,)]
