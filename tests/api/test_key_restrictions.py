"""Where a key may be used from (issue 15, feature 2): client addresses and web page
origins, checked right after the key is known (no session of its role is ever opened for a
refused request), on every API; X-Forwarded-For believed only from GRANTKEY_TRUSTED_PROXIES;
CORS that answers only the key's own origins. Client addresses other than 127.0.0.1 are
loopback addresses the test binds its connections to."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Account, Login
from tests.support import ServerProcess, table_grants

GRANTS = table_grants([("public", "things", ["select"])])


def create(http: httpx.Client, account: Account, name: str, restrictions: Any) -> httpx.Response:
    return http.post(account.keys_url, params=account.master(),
                     json={"name": name, "grants": GRANTS, "restrictions": restrictions})


def from_address(account: Account, address: str, token: str,
                 headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.get(account.sql_url, params={"q": "SELECT count(*) FROM things",
                                                   "api_key": token}, headers=headers)


def role_sessions(admin_url: str, account: Account, name: str) -> int:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity a JOIN grantkey_meta.api_keys k"
                           " ON a.usename = k.role WHERE k.name = %s", [name]).fetchone()
    return int(row[0]) if row else -1


@pytest.fixture
def things(account: Account, http: httpx.Client) -> Account:
    assert account.sql(http, "CREATE TABLE things (id int)", account.master_token).status_code == 200
    return account


def test_a_key_for_some_addresses_refuses_the_others_before_any_session_of_its_role(
        http: httpx.Client, things: Account, admin_url: str) -> None:
    document = create(http, things, "office", {"ips": ["127.0.0.5/32", "10.0.0.0/8"]}).json()
    assert document["restrictions"] == {"ips": ["127.0.0.5/32", "10.0.0.0/8"], "origins": []}
    token = document["token"]
    for _ in range(3):
        refused = from_address(things, "127.0.0.1", token)
        assert refused.status_code == 403
        assert refused.json()["error"] == [
            'key "office" may not be used from 127.0.0.1: its restrictions allow '
            "127.0.0.5/32, 10.0.0.0/8"]
    assert role_sessions(admin_url, things, "office") == 0  # no work as the key at all
    assert from_address(things, "127.0.0.5", token).status_code == 200


def test_x_forwarded_for_is_not_believed_by_default(http: httpx.Client, things: Account) -> None:
    token = create(http, things, "office", {"ips": ["127.0.0.5/32"]}).json()["token"]
    spoofed = from_address(things, "127.0.0.1", token, {"X-Forwarded-For": "127.0.0.5"})
    assert spoofed.status_code == 403


def test_the_auth_api_refuses_a_restricted_key_from_elsewhere_too(
        http: httpx.Client, things: Account) -> None:
    token = create(http, things, "office", {"ips": ["127.0.0.5/32"]}).json()["token"]
    answer = http.get(f"{things.keys_url}/office", params={"api_key": token})
    assert answer.status_code == 403
    assert answer.json()["errors"].startswith('key "office" may not be used from 127.0.0.1')


def test_a_key_for_some_web_pages_answers_only_them_in_cors(
        http: httpx.Client, things: Account, admin_url: str) -> None:
    token = create(http, things, "map", {"origins": ["https://maps.example.com",
                                                     "https://*.example.org"]}).json()["token"]
    sql = {"q": "SELECT count(*) FROM things", "api_key": token}
    for _ in range(3):  # refused before any session of the key's role
        assert http.get(things.sql_url, params=sql,
                        headers={"Origin": "https://evil.example.com"}).status_code == 403
    assert role_sessions(admin_url, things, "map") == 0
    allowed = http.get(things.sql_url, params=sql, headers={"Origin": "https://maps.example.com"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://maps.example.com"
    assert allowed.headers["vary"] == "Origin"
    by_referer = http.get(things.sql_url, params=sql,
                          headers={"Referer": "https://a.b.example.org/page?x=1"})
    assert by_referer.status_code == 200
    for headers, comes in [({"Origin": "https://evil.example.com"}, "from https://evil.example.com"),
                           ({"Origin": "https://example.org"}, "from https://example.org"),
                           ({"Origin": "http://maps.example.com"}, "from http://maps.example.com"),
                           ({}, "with no Origin or Referer header (not from a web page)"),
                           ({"Origin": "null"}, "with no Origin or Referer header (not from a "
                                                "web page)")]:
        refused = http.get(things.sql_url, params=sql, headers=headers)
        assert refused.status_code == 403, headers
        assert refused.json()["error"] == [
            'key "map" may be used only from web pages of https://maps.example.com, '
            f"https://*.example.org; this request comes {comes}"]
    plain = create(http, things, "plain", None).json()["token"]
    answer = http.get(things.sql_url, params={**sql, "api_key": plain},
                      headers={"Origin": "https://anywhere.example.net"})
    assert answer.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(("restrictions", "message"), [
    (["1.2.3.4"], 'Restrictions must be an object, e.g. {"ips": ["203.0.113.0/24"], "origins": '
                  '["https://maps.example.com"]}'),
    ({"hosts": []}, "Restrictions has no option hosts (known: ips, origins)"),
    ({"ips": "1.2.3.4"}, "Restrictions ips must be a list of strings"),
    ({"ips": ["1.2.3.4"] * 101}, "Restrictions ips can have at most 100 entries"),
    ({"ips": ["300.1.1.1"]}, "Restrictions ips '300.1.1.1' is not an IP address or CIDR network"),
    ({"origins": ["maps.example.com"]}, "Restrictions origins 'maps.example.com' is not an "
                                        "origin such as https://maps.example.com or "
                                        "https://*.example.com"),
    ({"origins": ["https://a.com/path"]}, "Restrictions origins 'https://a.com/path' is not an "
                                          "origin such as https://maps.example.com or "
                                          "https://*.example.com")])
def test_wrong_restrictions_are_a_validation_failure(
        http: httpx.Client, things: Account, restrictions: Any, message: str) -> None:
    answer = create(http, things, "k", restrictions)
    assert answer.status_code == 422
    assert answer.json()["errors"] == f"Validation failed: {message}"


@pytest.mark.slow  # a server of its own
def test_x_forwarded_for_is_believed_from_a_trusted_proxy(
        data_dir: Path, login: Login, make_account: Callable[[], Account],
        http: httpx.Client) -> None:
    server = ServerProcess([*login.args(data_dir)], data_dir / "proxied.log",
                           {**login.env, "GRANTKEY_TRUSTED_PROXIES": "127.0.0.1"})
    try:
        server.wait_healthy()
        account = make_account()
        behind = Account(account.user, account.master_token, server.url)
        behind.sql(http, "CREATE TABLE things (id int)", account.master_token)
        token = create(http, behind, "office", {"ips": ["198.51.100.7/32"]}).json()["token"]
        forwarded = from_address(behind, "127.0.0.1", token, {"X-Forwarded-For": "198.51.100.7"})
        assert forwarded.status_code == 200, forwarded.text
        assert from_address(behind, "127.0.0.1", token).status_code == 403
        # only the trusted proxy is believed: another local client's header is not
        assert from_address(behind, "127.0.0.9", token,
                            {"X-Forwarded-For": "198.51.100.7"}).status_code == 403
    finally:
        server.stop()
