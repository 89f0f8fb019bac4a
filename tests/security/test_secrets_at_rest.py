"""No token (nor a role password) in plaintext in any database column or in the logs."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from grantkey.domain.secrets_box import SecretBox
from tests.conftest import Account, KeyHandle
from tests.support import ServerProcess, apis_only

SCANNED_TYPES = ("text", "character varying", "bytea", "jsonb", "json", "ARRAY", "name")


def every_value(admin_url: str, database: str) -> list[bytes]:
    """Every text-like and bytea value in every user table of one database."""
    values: list[bytes] = []
    with psycopg.connect(admin_url, dbname=database) as conn:
        columns = conn.execute(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
            "AND data_type = ANY(%s)", [list(SCANNED_TYPES)]).fetchall()
        for schema, table, column in columns:
            query = sql.SQL("SELECT {}::text FROM {}").format(
                sql.Identifier(column), sql.Identifier(schema, table))
            values += [v.encode() for (v,) in conn.execute(query) if v is not None]
            if column in ("token_digest", "sealed_token"):
                raw = sql.SQL("SELECT {} FROM {}").format(
                    sql.Identifier(column), sql.Identifier(schema, table))
                values += [bytes(v) for (v,) in conn.execute(raw) if v is not None]
    return values


def test_no_token_in_plaintext_in_any_column(
    http: httpx.Client, account: Account, admin_url: str, make_key: Callable[..., KeyHandle],
    box: SecretBox,
) -> None:
    key = make_key(account, "scanned", apis_only("sql"))
    regenerated = http.post(f"{account.keys_url}/scanned/token/regenerate",
                            params=account.master()).json()["token"]
    secrets = [account.master_token, key.token, regenerated,
               box.role_password(key.role, regenerated)]
    values = every_value(admin_url, "grantkey") + every_value(admin_url, account.user.database)
    assert len(values) > 10
    for secret in secrets:
        for value in values:
            assert secret.encode() not in value
            assert base64.b64encode(secret.encode()) not in value
    with psycopg.connect(admin_url) as conn:
        stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                              [key.role]).fetchone()
    assert stored is not None and stored[0].startswith("SCRAM-SHA-256$")
    assert all(secret not in stored[0] for secret in secrets)


def test_no_token_in_the_server_or_postgresql_logs(
    http: httpx.Client, account: Account, server: ServerProcess, data_dir: Path, box: SecretBox,
    make_key: Callable[..., KeyHandle],
) -> None:
    key = make_key(account, "logged", apis_only("sql"))
    http.get(account.keys_url, params={"api_key": key.token})
    http.get(account.keys_url, headers={"Authorization": f"Bearer {key.token}"})
    http.get(account.keys_url, params={"api_key": key.token + "x"})
    http.post(account.keys_url, json={"api_key": account.master_token, "name": "p",
                                       "grants": apis_only("sql")})
    logs = [server.log_path, *data_dir.glob("**/server.log"),
            *data_dir.glob("**/log/postgresql-*.log")]
    assert server.log_path.stat().st_size > 0
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in (key.token, account.master_token, key.password):
            assert secret not in text, f"a secret appears in {path}"
