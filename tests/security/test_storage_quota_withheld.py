"""The storage quota, over its limit, withholds CREATE on every schema, so that nothing can
make a table where no event trigger fires (`EXPLAIN ANALYZE CREATE TABLE AS …`, which the
quota's DDL refusal and write trigger never see); it comes back, exactly as it was, once
under the limit or with the quota lifted. See docs/security.md."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest

from grantkey.services.container import Services
from grantkey.services.upgrade import apply_storage_quotas
from grantkey.settings import Settings
from tests.conftest import Account, KeyHandle
from tests.security.quota_support import (
    COPY_LOOP,
    SNEAKY,
    assert_no_create,
    back_under_the_limit,
    over_the_limit,
    schema_acl,
    withholding,
)
from tests.support import table_grants


@pytest.mark.parametrize("create", SNEAKY)
def test_past_the_quota_the_master_cannot_copy_a_table_where_no_event_trigger_fires(
    http: httpx.Client, limited: Account, admin_url: str, create: str,
) -> None:
    over_the_limit(http, limited, admin_url)
    assert_no_create(limited.sql(http, create, limited.master_token))
    assert_no_create(limited.sql(http, "SET search_path = public; " + create,
                                 limited.master_token))
    back_under_the_limit(http, limited, admin_url)
    made = limited.sql(http, create, limited.master_token)
    assert made.status_code == 200, made.text


def test_past_the_quota_a_key_cannot_copy_a_table_where_no_event_trigger_fires(
    http: httpx.Client, limited: Account, admin_url: str, make_key: Callable[..., KeyHandle],
) -> None:
    maker = make_key(limited, "maker", table_grants([("public", "big", ["select"])],
                                                    create_schemas=("public",)))
    over_the_limit(http, limited, admin_url)
    assert_no_create(limited.sql(http, SNEAKY[0], maker.token))
    assert_no_create(limited.sql(http, SNEAKY[1].replace("sneaky", "public.sneaky"),
                                 maker.token))


def test_past_the_quota_create_is_withheld_from_every_schema_and_role(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    """The master's own schemas, and grants it made to PUBLIC and with grant option."""
    owner_sql(limited, "CREATE SCHEMA extra; GRANT CREATE, USAGE ON SCHEMA extra TO PUBLIC")
    over_the_limit(http, limited, admin_url)
    for schema in ("public", "extra"):
        assert not [item for item in schema_acl(admin_url, limited, schema)
                    if "C" in item.split("=")[-1].split("/")[0]], schema
        assert_no_create(limited.sql(
            http, f"EXPLAIN ANALYZE CREATE TABLE {schema}.sneaky AS SELECT * FROM big",
            limited.master_token))
    assert_no_create(limited.sql(  # the default public key, through the PUBLIC grant
        http, "EXPLAIN ANALYZE CREATE TABLE extra.sneaky AS SELECT 1 AS id"))


def test_create_comes_back_as_it_was_once_under_the_quota(
    http: httpx.Client, limited: Account, admin_url: str, make_key: Callable[..., KeyHandle],
    owner_sql: Callable[[Account, str], None],
) -> None:
    maker = make_key(limited, "maker", table_grants([], create_schemas=("public",)))
    owner_sql(limited, "CREATE SCHEMA extra; GRANT CREATE ON SCHEMA extra TO PUBLIC")
    before = {schema: schema_acl(admin_url, limited, schema) for schema in ("public", "extra")}

    def shown() -> Any:
        got = http.get(f"{limited.keys_url}/maker", params={"api_key": limited.master_token})
        assert got.status_code == 200, got.text
        return got.json()["grants"]

    granted = shown()
    assert "create" in granted[1]["schemas"][0]["permissions"]
    over_the_limit(http, limited, admin_url)
    assert shown() == granted  # withheld, the key's grant is still its own
    back_under_the_limit(http, limited, admin_url)
    assert {schema: schema_acl(admin_url, limited, schema) for schema in before} == before
    made = limited.sql(http, "EXPLAIN ANALYZE CREATE TABLE mine AS SELECT 1 AS id", maker.token)
    assert made.status_code == 200, made.text


@pytest.mark.parametrize("change", [
    "REVOKE CREATE ON SCHEMA extra FROM PUBLIC", "GRANT USAGE ON SCHEMA extra TO PUBLIC",
    "ALTER SCHEMA extra RENAME TO other", "DROP OWNED BY CURRENT_USER",
    "BEGIN ISOLATION LEVEL REPEATABLE READ; REVOKE ALL ON SCHEMA extra FROM PUBLIC; COMMIT",
])
def test_a_schema_privilege_change_is_refused_while_create_is_withheld(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None], change: str,
) -> None:
    """It would meet an ACL that is not the real one (and be undone when CREATE comes
    back): refused with a clear message; a table's privileges stay open; once under the
    limit, the change is made and holds."""
    owner_sql(limited, "CREATE SCHEMA extra; GRANT CREATE, USAGE ON SCHEMA extra TO PUBLIC")
    before = schema_acl(admin_url, limited, "extra")
    over_the_limit(http, limited, admin_url)
    refused = limited.sql(http, change, limited.master_token)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"][0] in (  # GRANT and ALTER store: the quota refuses them
        "schema privileges cannot change while the database is over its storage quota",
        "DB Quota exceeded")
    table = limited.sql(http, "REVOKE ALL ON big FROM PUBLIC", limited.master_token)
    assert table.status_code == 200, table.text
    back_under_the_limit(http, limited, admin_url)
    assert schema_acl(admin_url, limited, "extra") == before
    revoked = limited.sql(http, "REVOKE CREATE ON SCHEMA extra FROM PUBLIC",
                          limited.master_token)
    assert revoked.status_code == 200, revoked.text
    refused = limited.sql(http, "CREATE TABLE extra.t (id int)")
    assert refused.status_code == 403, refused.text


def test_keys_made_and_deleted_while_create_is_withheld_hold_to_the_quota(
    http: httpx.Client, limited: Account, admin_url: str, make_key: Callable[..., KeyHandle],
    owner_sql: Callable[[Account, str], None],
) -> None:
    """A key made over the limit has CREATE withheld at once; deleting one (or dropping a
    schema) breaks nothing; the privilege role the keys share is not taken for an orphan."""
    owner_sql(limited, "CREATE SCHEMA gone")
    first = make_key(limited, "first", table_grants([], create_schemas=("public", "gone")))
    doomed = make_key(limited, "doomed", table_grants([], create_schemas=("public",)))
    over_the_limit(http, limited, admin_url)
    late = make_key(limited, "late", table_grants([("public", "big", ["select"])],
                                                  create_schemas=("public",)))
    assert_no_create(limited.sql(http, SNEAKY[0], late.token))
    deleted = http.delete(f"{limited.keys_url}/doomed", params={"api_key": limited.master_token})
    assert deleted.status_code in (200, 204), deleted.text
    assert limited.sql(http, "SELECT 1", doomed.token).status_code == 401
    dropped = limited.sql(http, "DROP SCHEMA gone", limited.master_token)
    assert dropped.status_code == 200, dropped.text
    back_under_the_limit(http, limited, admin_url)
    for key in (first, late):
        made = limited.sql(http, f"CREATE TABLE made_by_{key.name} (id int)", key.token)
        assert made.status_code == 200, made.text


def test_lifting_the_quota_gives_create_back(
    http: httpx.Client, limited: Account, admin_url: str, settings: Settings,
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    over_the_limit(http, limited, admin_url)

    async def lift() -> dict[str, str]:
        services = Services(replace(settings, storage_quota="-1"), admin_url)
        await services.open(migrate=False)
        try:
            return await apply_storage_quotas(services.cluster, "-1")
        finally:
            await services.close()

    assert limited.user.username in run(lift())
    assert withholding(admin_url, limited) is False
    made = limited.sql(http, SNEAKY[0], limited.master_token)
    assert made.status_code == 200, made.text


def test_a_request_that_crosses_the_quota_cannot_go_on_copying_tables_to_its_end(
    http: httpx.Client, limited: Account,
) -> None:
    """The database is swept every second while a request of its user runs: CREATE is
    withheld from the request that crossed the limit, not only from the next one. (Before,
    this loop made a copy every tenth of a second to the end of its time limit.)"""
    done = limited.sql(http, COPY_LOOP, limited.master_token)
    assert done.status_code == 200, done.text
    row = done.json()["rows"][0]
    assert row["refused_at"], f"{row['copies']} copies made over the limit, none refused"
    assert row["copies"] == int(row["refused_at"]) - 1


def test_a_request_that_fails_is_swept_after_too(
    http: httpx.Client, limited: Account, admin_url: str,
) -> None:
    """A table made where no event trigger fires by a request that then fails (committed
    first) gets the trigger all the same: the sweep follows every request, not only those
    that return rows."""
    failed = limited.sql(http, "BEGIN; EXPLAIN ANALYZE CREATE TABLE sneaky AS SELECT 1 AS id; "
                               "COMMIT; SELECT 1 / 0", limited.master_token)
    assert failed.status_code == 400, failed.text
    deadline = time.monotonic() + 10
    with psycopg.connect(admin_url, dbname=limited.user.database, autocommit=True) as conn:
        while not conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'grantkey_quota' "
                               "AND tgrelid = 'public.sneaky'::regclass").fetchall():
            assert time.monotonic() < deadline, "the failed request was never swept"
            time.sleep(0.05)
