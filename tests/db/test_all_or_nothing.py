"""A failure injected at each step of creating a key or a user leaves nothing behind."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest

from grantkey import faults
from grantkey.services.container import Services
from tests.conftest import Account
from tests.support import table_grants

KEY_STEPS = ["key.validated", "key.role_created", "key.privileges_granted", "key.row_inserted"]
USER_STEPS = ["user.reserved", "user.roles_created", "user.database_created",
              "user.keys_inserted", "user.database_prepared"]


@pytest.fixture(autouse=True)
def disarm() -> Iterator[None]:
    yield
    faults.disarm_all()


def cluster_state(admin_url: str) -> tuple[set[str], set[str], set[str]]:
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        roles = {r for (r,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname ~ '^gk_'")}
        databases = {d for (d,) in conn.execute(
            "SELECT datname FROM pg_database WHERE datname ~ '^gk_'")}
        users = {u for (u,) in conn.execute("SELECT username FROM users")}
    return roles, databases, users


def key_rows(admin_url: str, database: str) -> list[str]:
    with psycopg.connect(admin_url, dbname=database) as conn:
        return [n for (n,) in conn.execute("SELECT name FROM grantkey_meta.api_keys")]


@pytest.mark.parametrize("step", KEY_STEPS)
def test_failure_at_each_key_creation_step_leaves_nothing(
    step: str, account: Account, services: Services, run: Callable[[Awaitable[Any]], Any],
    owner_sql: Callable[[Account, str], None], admin_url: str,
) -> None:
    owner_sql(account, "CREATE TABLE t (id serial PRIMARY KEY)")
    before = cluster_state(admin_url)
    master = run(services.keys.master_principal(account.user))
    faults.arm(step)
    with pytest.raises(faults.InjectedFault):
        run(services.keys.create(master, "doomed", table_grants(
            [("public", "t", ["select", "insert"])], create_schemas=("public",))))
    assert cluster_state(admin_url) == before
    assert sorted(key_rows(admin_url, account.user.database)) == ["Default public", "Master"]
    faults.disarm_all()
    run(services.keys.create(master, "doomed", table_grants([("public", "t", ["select"])])))


@pytest.mark.parametrize("step", USER_STEPS)
def test_failure_at_each_user_creation_step_leaves_nothing(
    step: str, services: Services, run: Callable[[Awaitable[Any]], Any], admin_url: str,
    server: Any,
) -> None:
    before = cluster_state(admin_url)
    faults.arm(step)
    with pytest.raises(faults.InjectedFault):
        run(services.users.create(f"doomed-{step.replace('.', '-').replace('_', '-')}"))
    assert cluster_state(admin_url) == before


def test_failure_in_key_deletion_keeps_the_key_whole(
    account: Account, services: Services, run: Callable[[Awaitable[Any]], Any],
    admin_url: str, owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(account, "CREATE TABLE t (id int)")
    master = run(services.keys.master_principal(account.user))
    run(services.keys.create(master, "kept", table_grants([("public", "t", ["select"])])))
    before = cluster_state(admin_url)
    faults.arm("key.deleted_before_commit")
    with pytest.raises(faults.InjectedFault):
        run(services.keys.delete(master, "kept"))
    assert cluster_state(admin_url) == before
    assert "kept" in key_rows(admin_url, account.user.database)
