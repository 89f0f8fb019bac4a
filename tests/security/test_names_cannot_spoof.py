"""Key names cannot pass for other keys: no invisible, control or direction characters, no
edge spaces, and the CLI prints every name exactly as typed (never as rich markup)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Account, Login
from tests.support import apis_only

HIDDEN = "Name can't contain control, format or invisible characters"
EDGES = "Name can't begin or end with spaces"


@pytest.mark.parametrize(("name", "message"), [
    ("Master ", EDGES), (" Master", EDGES), ("Default public\u00a0", EDGES), ("app\t", EDGES),
    ("\u202eretsaM", HIDDEN),  # right-to-left override: shows as "Master"
    ("Mas\u200bter", HIDDEN), ("Mas\u200dter", HIDDEN), ("\ufeffMaster", HIDDEN),
    ("Master\u0085", HIDDEN),  # C1 control (NEL)
    ("Mas\u009bter", HIDDEN),  # C1 CSI: starts terminal escape sequences
    ("a\x1b[2Jb", HIDDEN), ("line\u2028break", HIDDEN), ("private\ue000use", HIDDEN),
    ("bidi\u2066isolate", HIDDEN), ("soft\u00adhyphen", HIDDEN),
])
def test_names_that_could_spoof_another_key_are_refused(
    http: httpx.Client, account: Account, name: str, message: str,
) -> None:
    response = http.post(account.keys_url, params=account.master(),
                         json={"name": name, "grants": apis_only("sql")})
    assert response.status_code == 422
    assert response.json()["errors"].startswith("Validation failed: ")
    assert message in response.json()["errors"]


@pytest.mark.parametrize("name", ["Straße", "地图 app", "map-1 (prod)", "[b]Default public",
                                  "émoji 🗺️"])
def test_ordinary_unicode_names_are_still_accepted(
    http: httpx.Client, account: Account, name: str,
) -> None:
    response = http.post(account.keys_url, params=account.master(),
                         json={"name": name, "grants": apis_only("sql")})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == name


def _cli(login: Login, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", *args, "--database-url", login.database_url],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, **login.env, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_cli_prints_names_as_typed_never_as_markup(
    http: httpx.Client, account: Account, login: Login,
    owner_sql: Callable[[Account, str], None],
) -> None:
    for name in ("[b]Default public", "[red]Master", ":warning: app"):
        assert http.post(account.keys_url, params=account.master(),
                         json={"name": name, "grants": apis_only("sql")}).status_code == 201
    listed = _cli(login, "keys", "list", account.username)
    for name in ("[b]Default public", "[red]Master", ":warning: app"):
        assert name in listed
    # table names come from tenants: an escape sequence prints as an escape, not raw
    owner_sql(account, 'CREATE TABLE "clear\x1b[2Jscreen" (a int); CREATE TABLE "[i]x" (a int)')
    datasets = _cli(login, "datasets", "list", account.username)
    assert "\x1b" not in datasets and "clear\\u001b[2Jscreen" in datasets
    assert "[i]x" in datasets
