"""GET /api/v3/audit (issue 12 item 2): the master key reads its user's audit log, newest
first, paginated like the key list and filtered by key name and event type; no other key
reads it and no method changes it. And `grantkey audit USER`, the same from the CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Account, KeyHandle, Login
from tests.support import apis_only


def audit_url(account: Account, prefix: str = "/user/{u}") -> str:
    return account.base_url + prefix.format(u=account.username) + "/api/v3/audit"


@pytest.fixture
def busy(account: Account, http: httpx.Client) -> Account:
    """An account with a known history: created, keys k1 k2 k3 made, k1 regenerated, k2
    deleted (8 events in all, the user's creation first)."""
    for name in ("k1", "k2", "k3"):
        http.post(account.keys_url, params=account.master(),
                  json={"name": name, "grants": apis_only("sql")}).raise_for_status()
    http.post(f"{account.keys_url}/k1/token/regenerate",
              params=account.master()).raise_for_status()
    http.delete(f"{account.keys_url}/k2", params=account.master()).raise_for_status()
    return account


def read(http: httpx.Client, account: Account, **params: Any) -> httpx.Response:
    return http.get(audit_url(account), params={**account.master(), **params})


def events(answer: httpx.Response) -> list[tuple[str, str | None]]:
    return [(e["type"], e["key"] and e["key"]["name"]) for e in answer.json()["result"]]


def test_the_master_reads_the_whole_history_newest_first(
    http: httpx.Client, busy: Account
) -> None:
    answer = read(http, busy)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert (document["total"], document["count"]) == (6, 6)
    assert events(answer) == [("key.deleted", "k2"), ("key.regenerated", "k1"),
                              ("key.created", "k3"), ("key.created", "k2"),
                              ("key.created", "k1"), ("user.created", None)]
    ids = [entry["id"] for entry in document["result"]]
    assert ids == sorted(ids, reverse=True)
    newest = document["result"][0]
    assert newest["user"] == {"username": busy.username}
    assert newest["actor"] == {"key": {"name": "Master", "type": "master"},
                               "client": "127.0.0.1"}
    assert newest["detail"] == {"type": "regular"}
    assert newest["created_at"].endswith(" +0000")
    assert busy.master_token not in answer.text


def test_pages_have_the_key_lists_shape(http: httpx.Client, busy: Account) -> None:
    first = read(http, busy, per_page=2)
    assert first.status_code == 200
    body = first.json()
    assert (body["total"], body["count"]) == (6, 2)
    assert set(body["_links"]) == {"first", "last", "next"}
    assert "api_key" not in body["_links"]["next"]["href"]
    last = read(http, busy, per_page=2, page=3).json()
    assert set(last["_links"]) == {"first", "last", "prev"}
    everything = [*body["result"], *read(http, busy, per_page=2, page=2).json()["result"],
                  *last["result"]]
    assert [e["id"] for e in everything] == [e["id"] for e in read(http, busy).json()["result"]]
    assert events(read(http, busy, per_page=2, page=9)) == []


def test_filters_by_key_name_and_event_type(http: httpx.Client, busy: Account) -> None:
    assert events(read(http, busy, name="k1")) == [("key.regenerated", "k1"),
                                                   ("key.created", "k1")]
    assert events(read(http, busy, type="key.deleted")) == [("key.deleted", "k2")]
    assert events(read(http, busy, type="key.deleted, user.created")) == [
        ("key.deleted", "k2"), ("user.created", None)]
    assert events(read(http, busy, name="k2", type="key.created")) == [("key.created", "k2")]
    # the acting key's name matches too: every change here was the master's
    assert read(http, busy, name="Master").json()["total"] == 5
    nobody = read(http, busy, name="nobody").json()
    assert (nobody["total"], nobody["result"]) == (0, [])


@pytest.mark.parametrize(("params", "named"), [
    ({"type": "key.exploded"}, "type"), ({"type": ","}, "type"), ({"name": ""}, "name"),
    ({"name": "a\x00b"}, "name"), ({"name": "x" * 256}, "name"), ({"page": "0"}, "page"),
    ({"per_page": "1001"}, "per_page"), ({"per_page": "ten"}, "per_page"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else v)
def test_a_bad_parameter_is_a_400_naming_it(
    http: httpx.Client, account: Account, params: dict[str, str], named: str
) -> None:
    answer = read(http, account, **params)
    assert answer.status_code == 400, answer.text
    assert f"Wrong '{named}' parameter value." in answer.json()["errors"]
    if named == "type":
        assert "key.created" in answer.json()["errors"]


def test_only_the_master_key_reads_it(
    http: httpx.Client, account: Account, make_account: Callable[[], Account],
    make_key: Callable[[Account, str, Any], KeyHandle],
) -> None:
    regular = make_key(account, "nosy", apis_only("sql"))
    other = make_account()
    url = audit_url(account)
    assert http.get(url).status_code == 401  # no key
    for token in (regular.token, "default_public", other.master_token, "gkm" + "x" * 38):
        answer = http.get(url, params={"api_key": token})
        assert answer.status_code == 401, (token, answer.text)
        assert answer.content == b""  # as every failed authentication on the Auth API
    # Basic naming another user: what the key list answers (carto-compat: 401, empty)
    basic = {"Authorization": "Basic " + base64.b64encode(
        f"{other.username}:{other.master_token}".encode()).decode()}
    refused, listed = http.get(url, headers=basic), http.get(account.keys_url, headers=basic)
    assert (refused.status_code, refused.content) == (listed.status_code, listed.content)
    assert refused.status_code == 401
    mine = base64.b64encode(f"{account.username}:{account.master_token}".encode()).decode()
    assert http.get(url, headers={"Authorization": f"Basic {mine}"}).status_code == 200
    # and another user's master never sees this user's events in its own log
    assert {e["user"]["username"] for e in read(http, other).json()["result"]} == {
        other.username}


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_no_method_changes_the_log(http: httpx.Client, account: Account, method: str) -> None:
    before = read(http, account).json()
    answer = http.request(method, audit_url(account), params=account.master(),
                          json={"type": "forged"})
    assert answer.status_code == 405
    assert read(http, account).json() == before


@pytest.mark.parametrize("prefix", ["/user/{u}", "/u/{u}", ""])
def test_served_under_every_user_prefix_like_the_key_list(
    http: httpx.Client, account: Account, prefix: str
) -> None:
    headers = {} if prefix else {"Host": f"{account.username}.localhost"}
    for suffix in ("", "/"):
        answer = http.get(audit_url(account, prefix) + suffix, params=account.master(),
                          headers=headers)
        assert answer.status_code == 200, (prefix, suffix, answer.text)
        assert events(answer) == [("user.created", None)]


def test_the_cli_prints_the_log_and_its_own_changes_are_recorded_as_cli(
    http: httpx.Client, busy: Account, login: Login,
) -> None:
    env = {**os.environ, **login.env}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "grantkey.cli", *args,
                               "--database-url", login.database_url],
                              capture_output=True, text=True, env=env, timeout=120)

    made = cli("keys", "create", busy.username, "from-cli", "--api", "sql")
    assert made.returncode == 0, made.stderr
    listed = cli("audit", busy.username, "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert entries == read(http, busy).json()["result"]
    assert entries[0]["type"] == "key.created" and entries[0]["key"] == {"name": "from-cli"}
    assert entries[0]["actor"] == {"key": {"name": "Master", "type": "master"}, "client": "cli"}
    filtered = cli("audit", busy.username, "--json", "--name", "k1", "--type", "key.created")
    assert [(e["type"], e["key"]) for e in json.loads(filtered.stdout)] == [
        ("key.created", {"name": "k1"})]
    table = cli("audit", busy.username, "--type", "key.deleted")
    assert table.returncode == 0 and "key.deleted" in table.stdout and "k2" in table.stdout
    assert "key.created" not in table.stdout
    bad = cli("audit", busy.username, "--type", "key.exploded")
    assert bad.returncode == 2 and "key.exploded" in bad.stderr
    missing = cli("audit", "no-such-user")
    assert missing.returncode == 1 and "no-such-user" in missing.stderr
