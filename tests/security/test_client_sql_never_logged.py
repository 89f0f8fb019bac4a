"""Client SQL never reaches PostgreSQL's log, and the log is rotated and bounded: no
STATEMENT lines (failing statements, the multi-statement queries whose extended-protocol
try PostgreSQL refuses), no client errors or warnings; one file per weekday, truncated
when its day comes round again."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import httpx
import psycopg
import pytest

from grantkey.cli.embedded import LOG_OPTIONS, EmbeddedPostgres
from tests.conftest import Account


@pytest.fixture
def embedded(data_dir: Path) -> EmbeddedPostgres:
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        pytest.skip("the log settings are the embedded cluster's")
    return EmbeddedPostgres(data_dir / "cluster")


def test_no_client_sql_or_value_reaches_the_postgresql_log(
    http: httpx.Client, account: Account, embedded: EmbeddedPostgres, admin_url: str,
) -> None:
    marker = f"marker{secrets.token_hex(8)}"
    statements = [
        f"SELECT '{marker}' AS a; SELECT 2 AS b",  # multi-statement: the extended try fails
        f"SELECT '{marker}'::int",  # a failing statement, the value in the error message
        f"SELEC '{marker}'",  # a syntax error
        f"SELECT 1 AS a; SELECT '{marker}'::int",
        f"DO $$BEGIN RAISE WARNING '{marker}'; END$$",
        f"SELECT * FROM {marker}",
    ]
    for statement in statements:
        account.sql(http, statement)
        account.sql(http, statement, account.master_token)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_rotate_logfile()")  # flushes the collector's file
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                 for name in LOG_OPTIONS}
    written = [path for path in embedded.log_files() if path.exists()]
    assert any(path.parent.name == "log" for path in written), written
    for path in written:
        assert marker not in path.read_text(errors="replace"), f"client SQL in {path}"
    assert shown["log_min_error_statement"] == "panic" and shown["log_min_messages"] == "log"
    assert shown["logging_collector"] == "on" and shown["log_truncate_on_rotation"] == "on"
    assert shown["log_filename"] == "postgresql-%a.log" and shown["log_rotation_age"] == "1d"


def test_clients_cannot_turn_statement_logging_back_on(
    http: httpx.Client, account: Account,
) -> None:
    for setting in ["log_min_error_statement = error", "log_statement = 'all'",
                    "log_min_messages = debug1"]:
        response = account.sql(http, f"SET {setting}", account.master_token)
        assert response.status_code == 403, response.text
        assert "permission denied to set parameter" in response.text
