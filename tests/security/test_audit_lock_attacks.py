"""Attacks on the events seam through locks a tenant holds (issue 12 item 2), kept as tests:
one tenant's stalled changes must not take the connections another tenant's revocation
needs, concurrent changes must not answer 500, a failure after the audit row leaves
nothing. See tests/security/test_audit_attacks.py for the rest."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from grantkey.domain.secrets_box import SecretBox
from grantkey.services.container import Services
from tests.conftest import Account, KeyHandle, builtin_handle
from tests.support import apis_only, end_backends, table_grants

MakeKey = Callable[[Account, str, Any], KeyHandle]
OwnerSql = Callable[[Account, str], None]


def audit_rows(admin_url: str, username: str) -> list[dict[str, Any]]:
    with psycopg.connect(admin_url, dbname="grantkey", row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM public.audit_log WHERE username = %s ORDER BY id",
                            [username]).fetchall()


@pytest.fixture
def victim_and_attacker(make_account: Callable[[], Account]) -> tuple[Account, Account]:
    return make_account(), make_account()


def deletion_time_under_a_flood(
    run: Callable[[Any], Any], services: Services, victims_master: Any,
    holder: psycopg.Connection[Any], attempt: Callable[[], Awaitable[Any]],
) -> float:
    """Seconds the victim's key `doomed` takes to be deleted while 16 tasks repeat the
    attacker's `attempt` (each stalled on the rows `holder` keeps); inf after 20 s. The
    holder is rolled back and closed at the end."""

    async def attack() -> float:
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                try:
                    await attempt()
                except Exception:  # the attacker's own failures
                    await asyncio.sleep(0.01)

        floods = [asyncio.ensure_future(flood()) for _ in range(16)]
        try:
            await asyncio.sleep(1.5)  # every flooding attempt now waits on the held rows
            started = time.monotonic()
            try:
                await asyncio.wait_for(services.keys.delete(victims_master, "doomed"), 20)
            except TimeoutError:
                return float("inf")
            return time.monotonic() - started
        finally:
            stop.set()
            holder.rollback()
            await asyncio.wait(floods, timeout=30)

    try:
        took: float = run(attack())
    finally:
        holder.close()
    return took


# -- one tenant's locks against another's revocation -------------------------------------------

@dataclass
class Stall:
    """The attacker's master and table `held`, the victim's key `doomed`, and each master's
    principal; `hold()` opens the attacker's session holding the catalog rows."""

    attacker: Account
    doomed: KeyHandle
    attackers_master: Any
    victims_master: Any
    conninfo: str

    def hold(self) -> psycopg.Connection[Any]:
        holder = psycopg.connect(self.conninfo)
        # uncommitted: the schema's and the table's catalog rows stay held (every privacy
        # change grants USAGE on the schema first, then SELECT on the table)
        holder.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
        holder.execute("ALTER TABLE held ADD COLUMN y int")
        return holder


@pytest.fixture
def stall(victim_and_attacker: tuple[Account, Account], make_key: MakeKey, owner_sql: OwnerSql,
          services: Services, box: SecretBox, run: Callable[[Any], Any]) -> Stall:
    victim, attacker = victim_and_attacker
    owner_sql(attacker, "CREATE TABLE held (x int)")
    doomed = make_key(victim, "doomed", apis_only("sql"))
    master = builtin_handle(services, box, attacker, attacker.user.owner_role,
                            attacker.master_token)
    return Stall(attacker, doomed, run(services.keys.master_principal(attacker.user)),
                 run(services.keys.master_principal(victim.user)), master.conninfo)


def assert_revocation_unblocked(stall: Stall, services: Services, run: Callable[[Any], Any],
                                attempt: Callable[[], Awaitable[Any]]) -> None:
    """The victim's key deletion takes under 3 s while the attacker floods `attempt`
    against its own held rows, and the deleted key's role logs in no more."""
    took = deletion_time_under_a_flood(run, services, stall.victims_master, stall.hold(),
                                       attempt)
    assert took < 3.0, took
    with pytest.raises(psycopg.OperationalError):
        stall.doomed.connect()


def test_privacy_changes_stalled_on_a_tenants_own_lock_do_not_block_another_tenants_revocation(
    stall: Stall, services: Services, run: Callable[[Any], Any],
) -> None:
    """A master holds its schema's and table's catalog rows (an uncommitted `GRANT` and
    `ALTER TABLE`, as any SQL API request may within its time limit, 25 s by default) and
    sends privacy changes of that table, many at once. Each waits on the lock in the user's
    database; none may hold a connection another tenant's revocation needs meanwhile (the
    metadata pool: 8 per process), or the victim's key deletion waits out the pool's 10 s
    timeout. In one process (the services the server's workers run), so that the flood and
    the deletion surely share one pool."""
    assert_revocation_unblocked(stall, services, run, lambda: services.datasets.set_privacy(
        stall.attackers_master, "public", "held", "public"))


def test_key_creations_stalled_on_a_tenants_own_lock_do_not_block_another_tenants_revocation(
    stall: Stall, services: Services, run: Callable[[Any], Any],
) -> None:
    """The same attack through key creation: a creation holds a metadata connection for the
    user's key lock while it works in the user's database, where its GRANT on a table waits
    on the master's held catalog row. The creations queued behind it must not hold one each
    (16 of them took the process's 8, and the victim's deletion failed on the pool's 10 s
    timeout): they queue in the process, holding nothing."""
    grants = table_grants([("public", "held", ["select"])])
    counter = iter(range(10**6))
    assert_revocation_unblocked(stall, services, run, lambda: services.keys.create(
        stall.attackers_master, f"f{next(counter)}", grants))


def test_tampered_logins_waiting_on_a_stalled_key_lock_do_not_block_another_tenants_revocation(
    stall: Stall, make_key: MakeKey, services: Services, run: Callable[[Any], Any],
    admin_url: str,
) -> None:
    """The same attack through the role repair (found reviewing the queue above): a key
    whose role's password its own client changed finds its login refused, and the repair
    waits for the user's key lock, which a key creation stalled on the held catalog row
    keeps. Each such request must wait without holding a metadata connection."""
    tampered = make_key(stall.attacker, "tampered", apis_only("sql"))
    with tampered.connect() as conn:
        conn.execute("ALTER ROLE CURRENT_USER PASSWORD 'changed by its client'")
    end_backends(admin_url, role=tampered.role)
    tampered_key = run(services.resolver.resolve(stall.attacker.user, tampered.token,
                                                 fresh=True))
    grants = table_grants([("public", "held", ["select"])])
    counter = iter(range(10**6))

    async def query() -> None:
        running = await services.sql.start(tampered_key, "SELECT 1 AS a")
        await running.aclose()

    async def attempt() -> None:  # one creation keeps the lock; the queries queue for it
        await asyncio.gather(
            services.keys.create(stall.attackers_master, f"f{next(counter)}", grants),
            *(query() for _ in range(4)), return_exceptions=True)

    assert_revocation_unblocked(stall, services, run, attempt)


def test_concurrent_privacy_changes_of_one_table_never_answer_500(
    account: Account, owner_sql: OwnerSql,
) -> None:
    """Two GRANTs on one catalog row at once: PostgreSQL fails the second with 'tuple
    concurrently updated' (XX000)."""
    owner_sql(account, "CREATE TABLE raced (x int)")
    url = f"{account.base_url}/user/{account.username}/api/v4/datasets/raced"

    def change(privacy: str) -> int:
        with httpx.Client(timeout=60, headers={"Connection": "close"}) as client:
            answer = client.patch(url, params=account.master(), json={"privacy": privacy})
            return answer.status_code

    statuses: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            statuses += pool.map(change, ["public", "link", "private", "public"] * 2)
    assert all(status < 500 for status in statuses), statuses


def test_a_privacy_change_failing_after_its_event_is_recorded_leaves_neither(
    account: Account, owner_sql: OwnerSql, services: Services, admin_url: str,
    run: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the metadata connection taken late (above), a failure after the audit row was
    inserted still rolls back both the row and the change."""
    owner_sql(account, "CREATE TABLE watched (x int)")
    before = len(audit_rows(admin_url, account.username))
    real = services.events.record

    async def record_then_fail(meta: Any, event: Any) -> None:
        await real(meta, event)
        raise RuntimeError("injected after the audit row")

    monkeypatch.setattr(services.events, "record", record_then_fail)
    with pytest.raises(RuntimeError):
        run(services.datasets.change_privacy(account.user, "public", "watched", "public"))
    monkeypatch.undo()
    assert len(audit_rows(admin_url, account.username)) == before
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        granted = conn.execute(
            "SELECT pg_catalog.has_table_privilege(%s, 'public.watched', 'SELECT')",
            [account.user.public_role]).fetchone()
    assert granted == (False,)
    # the control: the same change, uninjected, grants and is recorded
    run(services.datasets.change_privacy(account.user, "public", "watched", "public"))
    assert len(audit_rows(admin_url, account.username)) == before + 1
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        granted = conn.execute(
            "SELECT pg_catalog.has_table_privilege(%s, 'public.watched', 'SELECT')",
            [account.user.public_role]).fetchone()
    assert granted == (True,)
