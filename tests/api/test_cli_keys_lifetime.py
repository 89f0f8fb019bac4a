"""`grantkey keys create --expires-at/--sql-timeout`, `keys regenerate --grace` and
`keys find TOKEN` (a leaked token: whose key, and revoke it), run as the operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from tests.conftest import Account, Login


def cli(login: Login, data_dir: Path, *args: str,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grantkey.cli", *args, *login.args(data_dir)],
                          capture_output=True, text=True, env={**os.environ, **login.env},
                          timeout=120, input=stdin)


def test_create_with_an_expiry_and_a_time_limit_shows_them(
        login: Login, data_dir: Path, account: Account) -> None:
    moment = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    made = cli(login, data_dir, "keys", "create", account.username, "short", "--api", "sql",
               "--expires-at", moment.isoformat(), "--sql-timeout", "2", "--json")
    assert made.returncode == 0, made.stderr
    document = json.loads(made.stdout)
    assert document["expires_at"] == moment.strftime("%Y-%m-%d %H:%M:%S +0000")
    assert document["limits"] == {"sql_timeout_seconds": 2}


def test_create_with_a_past_expiry_exits_2_with_the_apis_message(
        login: Login, data_dir: Path, account: Account) -> None:
    made = cli(login, data_dir, "keys", "create", account.username, "late", "--api", "sql",
               "--expires-at", "2001-01-01T00:00:00Z")
    assert made.returncode == 2
    assert "Expires at must be in the future" in made.stderr


def test_regenerate_with_a_grace_keeps_the_old_token_and_says_until_when(
        login: Login, data_dir: Path, account: Account, http: httpx.Client) -> None:
    made = cli(login, data_dir, "keys", "create", account.username, "app", "--api", "sql",
               "--json")
    old = json.loads(made.stdout)["token"]
    done = cli(login, data_dir, "keys", "regenerate", account.username, "app", "--grace", "600")
    assert done.returncode == 0, done.stderr
    assert "the old token works until " in done.stdout
    new = done.stdout.split("token: ")[1].split()[0]
    assert account.sql(http, "SELECT 1", old).status_code == 200
    assert account.sql(http, "SELECT 1", new).status_code == 200


def test_find_names_the_user_and_key_of_a_token_and_revokes_it_when_asked(
        login: Login, data_dir: Path, make_account: object, http: httpx.Client) -> None:
    owner = make_account()  # type: ignore[operator]
    cli(login, data_dir, "keys", "create", owner.username, "leaked", "--api", "sql")
    token = http.get(f"{owner.keys_url}/leaked", params=owner.master()).json()["token"]
    found = cli(login, data_dir, "keys", "find", token)
    assert found.returncode == 0, found.stderr
    assert f"user {owner.username}, key 'leaked' (regular): its current token" in found.stdout
    assert "not revoked" in found.stdout  # no terminal, no --revoke: only said
    assert owner.sql(http, "SELECT 1", token).status_code == 200
    refused = cli(login, data_dir, "keys", "find", token, "--revoke", stdin="n\n")
    assert refused.returncode == 0 and owner.sql(http, "SELECT 1", token).status_code == 200
    revoked = cli(login, data_dir, "keys", "find", token, "--revoke", "--yes")
    assert revoked.returncode == 0, revoked.stderr
    assert "deleted key 'leaked'" in revoked.stdout
    assert owner.sql(http, "SELECT 1", token).status_code == 401
    gone = cli(login, data_dir, "keys", "find", token)
    assert gone.returncode == 1 and "no key has this token" in gone.stderr


def test_find_knows_an_old_token_in_its_grace_and_a_master_token(
        login: Login, data_dir: Path, account: Account, http: httpx.Client) -> None:
    made = cli(login, data_dir, "keys", "create", account.username, "app", "--api", "sql",
               "--json")
    old = json.loads(made.stdout)["token"]
    cli(login, data_dir, "keys", "regenerate", account.username, "app", "--grace", "600")
    found = cli(login, data_dir, "keys", "find", old)
    assert "key 'app' (regular): its OLD token (regenerated with a grace)" in found.stdout
    master = cli(login, data_dir, "keys", "find", account.master_token)
    assert "key 'Master' (master): its current token" in master.stdout


def test_find_refuses_what_is_not_a_token(login: Login, data_dir: Path) -> None:
    for text in ("hello", "default_public", "gkr" + "A" * 38):
        done = cli(login, data_dir, "keys", "find", text)
        assert done.returncode == 2 and "not a grantkey token" in done.stderr, text
