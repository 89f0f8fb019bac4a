"""Start-up repair removes what a crash left half-made, and leaves work in progress alone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from grantkey.db import users as user_store
from grantkey.db.locks import USER_LOCK_CLASS
from grantkey.domain import names
from grantkey.domain.keys import User
from grantkey.services.container import Services
from grantkey.services.reconcile import reconcile


def half_made_user(services: Services) -> User:
    user_id = names.new_id()
    return User(id=user_id, username=f"crashed-{user_id}", database=names.database_name(user_id),
                owner_role=names.owner_role(user_id), public_role=names.public_role(user_id),
                created_at=datetime.now(UTC))


async def crash_after_create_database(services: Services, user: User) -> None:
    """What a creator killed right after CREATE DATABASE leaves behind."""
    async with services.cluster.metadata() as conn:
        await user_store.reserve_user(conn, user)
    async with services.cluster.metadata() as conn:
        await user_store.create_builtin_roles(conn, user, "x" * 32, "y" * 32)
    async with services.cluster.autocommit() as conn:
        await user_store.create_database(conn, user)


def leftovers(admin_url: str, user: User) -> tuple[Any, ...]:
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        rows = conn.execute("SELECT count(*) FROM users WHERE id = %s", [user.id]).fetchone()
        roles = conn.execute("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, %s)",
                             [f"gk_{user.id}_"]).fetchone()
        dbs = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                           [user.database]).fetchone()
    assert rows and roles and dbs
    return rows[0], roles[0], dbs[0]


def test_reconcile_removes_a_user_whose_creator_died(
    services: Services, run: Callable[[Awaitable[Any]], Any], admin_url: str
) -> None:
    user = half_made_user(services)
    run(crash_after_create_database(services, user))
    assert leftovers(admin_url, user) == (1, 2, 1)
    repair = run(reconcile(services.cluster))
    assert user.id in repair.unfinished_users
    assert leftovers(admin_url, user) == (0, 0, 0)


def test_reconcile_leaves_a_user_being_created_alone(
    services: Services, run: Callable[[Awaitable[Any]], Any], admin_url: str
) -> None:
    user = half_made_user(services)
    run(crash_after_create_database(services, user))
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as creator:
        creator.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [USER_LOCK_CLASS, user.id])
        repair = run(reconcile(services.cluster))
        assert user.id not in repair.unfinished_users
        assert leftovers(admin_url, user) == (1, 2, 1)
    run(reconcile(services.cluster))
    assert leftovers(admin_url, user) == (0, 0, 0)


def test_reconcile_drops_orphan_databases_and_roles(
    services: Services, run: Callable[[Awaitable[Any]], Any], admin_url: str
) -> None:
    user = half_made_user(services)
    run(crash_after_create_database(services, user))
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
        conn.execute("DELETE FROM users WHERE id = %s", [user.id])
    repair = run(reconcile(services.cluster))
    assert user.database in repair.orphan_databases and user.id in repair.orphan_role_owners
    assert leftovers(admin_url, user) == (0, 0, 0)
