"""The psycopg internals we lean on (grantkey/db/pg_wire.py), against a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from grantkey.db import pg_wire
from grantkey.db.pg_wire import CopyRefused, StreamingCursor, finish_reset, send_reset
from grantkey.db.sql_exec import _several_statements
from tests.conftest import Account


async def _run(conninfo: str, query: str, size: int = 2000) -> tuple[list[int], StreamingCursor]:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cursor = StreamingCursor(conn)
        sizes = [len(batch) async for batch in cursor.batches(query, size)]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        return sizes, cursor


def test_rows_arrive_in_batches_of_the_requested_size(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str,
) -> None:
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)
    sizes, cursor = run(_run(conninfo, "SELECT g FROM generate_series(1, 5000) g"))
    assert sizes == [2000, 2000, 1000]
    assert [c.name for c in cursor.description or []] == ["g"]


def test_an_empty_result_keeps_its_columns_and_a_write_its_row_count(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str,
) -> None:
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)
    sizes, cursor = run(_run(conninfo, "SELECT 1 AS a, 'x'::text AS b WHERE false"))
    assert sizes == [] and [c.name for c in cursor.description or []] == ["a", "b"]
    sizes, cursor = run(_run(conninfo, "CREATE TEMP TABLE t AS SELECT generate_series(1, 3) AS a"))
    assert sizes == [] and cursor.description is None
    assert cursor.affected_rows == 3


def test_several_statements_are_refused_before_running_and_told_from_syntax_errors(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str,
) -> None:
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)
    with pytest.raises(psycopg.errors.SyntaxError) as several:
        run(_run(conninfo, "CREATE TABLE ran (a int); SELECT 1"))
    assert _several_statements(several.value)
    with pytest.raises(psycopg.errors.SyntaxError) as typo:
        run(_run(conninfo, "SELEC 1"))
    assert not _several_statements(typo.value)
    with psycopg.connect(conninfo) as conn:  # the refused query did not run at all
        assert conn.execute("SELECT to_regclass('ran')").fetchone() == (None,)


def test_a_reset_sent_on_release_undoes_session_state_before_reuse(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str,
) -> None:
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)

    async def scenario() -> tuple[bool, object]:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute("SET search_path = nowhere")
            await send_reset(conn)
            fit = await finish_reset(conn)
            cur = await conn.execute("SHOW search_path")
            return fit, (await cur.fetchone() or [None])[0]

    fit, path = run(scenario())
    assert fit and path == '"$user", public'


@pytest.mark.parametrize("query", [
    "COPY (SELECT 1) TO STDOUT", "COPY (SELECT g FROM generate_series(1, 100000) g) TO STDOUT",
    "COPY pg_catalog.pg_namespace (nspname) FROM STDIN",
])
def test_a_copy_that_reaches_postgresql_is_refused_and_the_session_closed_without_spinning(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str, query: str,
) -> None:
    """The backstop under the SQL API's own refusal: a session in copy mode answers every
    read with the same copy result, so a loop waiting for the end never yields."""
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)

    async def scenario(multi: bool, reset: bool = False) -> bool:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            cursor = StreamingCursor(conn)
            with pytest.raises(CopyRefused):
                if multi:  # several statements: psycopg's own execute() meets the copy
                    await cursor.execute("SELECT 1; " + query)
                else:
                    async for _ in cursor.batches(query, 2000, reset=reset):
                        pass
            return conn.closed

    assert run(scenario(multi=False))
    assert run(scenario(multi=False, reset=True))  # a pipelined reset behind it changes nothing
    assert run(scenario(multi=True))


async def _pipelined(conninfo: str, query: str) -> tuple[bool, str, object, object, object]:
    """`query` with its reset pipelined behind it, then what the same session shows."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cursor = StreamingCursor(conn)
        error = ""
        try:
            async for _ in cursor.batches(query, 2000, reset=True):
                pass
        except psycopg.Error as raised:
            error = type(raised).__name__
        status = conn.info.transaction_status
        if status != psycopg.pq.TransactionStatus.IDLE:
            await conn.rollback()
        path = await (await conn.execute("SHOW search_path")).fetchone()
        temp = await (await conn.execute(
            "SELECT count(*) FROM pg_catalog.pg_class WHERE relpersistence = 't'")).fetchone()
        return cursor.reset_done, error, status, (path or [None])[0], (temp or [None])[0]


@pytest.mark.parametrize("query", [
    "SET search_path = nowhere", "CREATE TEMP TABLE scratch (a int)",
    "SELECT pg_catalog.set_config('search_path', 'nowhere', false)",
])
def test_a_reset_pipelined_behind_the_query_undoes_its_session_state(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str, query: str,
) -> None:
    """DISCARD ALL goes out with the query, in one write: when the results are read the
    session is already reset, with nothing more to send."""
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)
    done, error, status, path, temp = run(_pipelined(conninfo, query))
    assert (done, error, status) == (True, "", psycopg.pq.TransactionStatus.IDLE)
    assert (path, temp) == ('"$user", public', 0)


def test_a_reset_pipelined_behind_a_failed_statement_still_runs(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str,
) -> None:
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)
    done, error, status, _, _ = run(_pipelined(conninfo, "SELECT 1/0"))
    assert (done, error, status) == (True, "DivisionByZero", psycopg.pq.TransactionStatus.IDLE)


def test_a_reset_pipelined_behind_begin_fails_and_says_so(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str,
) -> None:
    """DISCARD ALL cannot run in the transaction BEGIN opened: not done, and the session is
    left in a transaction (the release then rolls back and resets it the slow way)."""
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)
    done, error, status, path, _ = run(_pipelined(conninfo, "BEGIN"))
    assert (done, error) == (False, "")
    assert status == psycopg.pq.TransactionStatus.INERROR
    assert path == '"$user", public'


def test_the_libpq_psycopg_loaded_can_queue_a_sync_without_sending_it() -> None:
    """The fence for `queue_pipeline_sync`: psycopg's wheel ships libpq 17 or newer, where
    PQsendPipelineSync exists and is found, so a query and its pipelined reset leave in
    one send. If this fails, a psycopg upgrade changed the libpq it loads."""
    assert psycopg.pq.version() >= 170000
    assert pg_wire._libpq_send_pipeline_sync() is not None


@pytest.mark.parametrize("queued", [True, False], ids=["sync queued", "libpq without it"])
def test_a_pipelined_reset_works_with_and_without_a_queued_sync(
    account: Account, run: Callable[[Awaitable[Any]], Any], admin_url: str,
    monkeypatch: pytest.MonkeyPatch, queued: bool,
) -> None:
    if not queued:
        monkeypatch.setattr(pg_wire, "_libpq_send_pipeline_sync", lambda: None)
    conninfo = psycopg.conninfo.make_conninfo(admin_url, dbname=account.user.database)
    done, error, status, path, temp = run(_pipelined(conninfo, "CREATE TEMP TABLE t (a int)"))
    assert (done, error, status) == (True, "", psycopg.pq.TransactionStatus.IDLE)
    assert (path, temp) == ('"$user", public', 0)
    done, error, _, _, _ = run(_pipelined(conninfo, "SELECT 1/0"))
    assert (done, error) == (True, "DivisionByZero")


PSYCOPG_INTERNALS = ["_convert_query", "_execute_send", "_make_row_maker", "_start_query",
                     "_stream_fetchone_gen", "_stream_send_gen"]


@pytest.mark.parametrize("name", PSYCOPG_INTERNALS)
def test_the_psycopg_internals_pg_wire_leans_on_still_exist(name: str) -> None:
    """The fence: `db/pg_wire.py` overrides or calls these private members of psycopg's
    cursor. A psycopg upgrade that renames one fails here by name, not somewhere deep in
    a streamed answer."""
    member = getattr(psycopg.AsyncCursor, name, None)
    assert callable(member), f"psycopg.AsyncCursor.{name} is gone: review db/pg_wire.py"
