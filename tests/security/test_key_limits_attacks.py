"""Attacks on the key limits of issue 15 (commits 5600528, 71244ca, ae2fc25, 60fc056): rate
limits (GCRA buckets in a shared table or Redis, per key, per user group, per client address
for token look-ups), restrictions to client addresses and web origins, key usage and the
hygiene filters, and the "why denied" hints.

Passing tests are attacks that failed (the behaviour holds). Eight were findings of the
review, fixed since: crafted look-up buckets evicting a drained key bucket, database work
(unknown users) before the look-up limit, the Datasets API outside a key's limit, a
restricted key's named map served anywhere and without limit, a 500 on the longest
`unused_for`, IPv4-mapped restrictions that never matched, a deleted user's usage counts
kept forever. Other client addresses are
loopback addresses the test binds its connections to (`httpx.HTTPTransport(local_address=…)`).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from grantkey.domain.rate_limits import Rate
from grantkey.domain.restrictions import read_restrictions
from grantkey.services.container import Services
from grantkey.services.rate_store import PROBES, SLOTS, SharedBuckets
from grantkey.services.usage import Usage
from tests.api.test_maps_api import SETUP
from tests.conftest import Account, Login
from tests.support import ServerProcess, table_grants

GRANTS = table_grants([("public", "things", ["select"])])
RATE_HEADERS = ("Carto-Rate-Limit-Limit", "Carto-Rate-Limit-Remaining", "Carto-Rate-Limit-Reset")
_names = itertools.count()
WRONG = "gkr" + "A" * 38  # a token no key has (malformed: a look-up all the same)


def create_key(http: httpx.Client, account: Account, name: str, grants: Any = None,
               **options: Any) -> httpx.Response:
    return http.post(account.keys_url, params=account.master(),
                     json={"name": name, "grants": GRANTS if grants is None else grants,
                           **options})


def token_of(http: httpx.Client, account: Account, name: str, grants: Any = None,
             **options: Any) -> str:
    answer = create_key(http, account, name, grants, **options)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def from_address(address: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.request(method, url, **kwargs)


def on(server: ServerProcess, account: Account) -> Account:
    return Account(account.user, account.master_token, server.url)


@pytest.fixture
def things(account: Account, http: httpx.Client) -> Account:
    answer = account.sql(http, "CREATE TABLE things (id int)", account.master_token)
    assert answer.status_code == 200, answer.text
    return account


# --- the bucket table: which bucket a full probe window forgets --------------------------


def _print(key: bytes) -> int:
    """rate_store.fingerprint, without filling its cache."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") | 1


def addresses_at(slot: int, count: int, first: int = 2 << 16) -> list[str]:
    """`count` loopback addresses (127.x.y.z, x >= 2) whose look-up bucket `a:<address>`
    starts at `slot`: what anyone who can send from many addresses (an IPv6 /64) computes.
    (Fingerprints are odd, so buckets start at odd slots only; the ones after fill in.)"""
    found: list[str] = []
    for number in itertools.count(first):
        if (number & 0xFF) in (0, 255):
            continue
        address = f"127.{(number >> 16) & 0xFF}.{(number >> 8) & 0xFF}.{number & 0xFF}"
        if _print(f"a:{address}".encode()) % SLOTS == slot:
            found.append(address)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


def test_a_full_probe_window_does_not_forget_the_drained_bucket(tmp_path: Path) -> None:
    store = SharedBuckets(tmp_path / "buckets.bin")
    strict, lookups = Rate(1, 3600.0, 0), Rate(100, 1.0, 200)  # a key's; the look-up default
    victim = b"k:0123456789abcdef:fedcba9876543210"
    start = _print(victim) % SLOTS
    now = 1000.0
    assert store.take_now(victim, strict, now).allowed
    assert not store.take_now(victim, strict, now + 1).allowed  # drained for an hour
    for address in addresses_at(start, PROBES):  # 7 fill the window, the 8th evicts
        assert store.take_now(f"a:{address}".encode(), lookups, now + 2).allowed
    assert not store.take_now(victim, strict, now + 3).allowed, "the key's bucket was forgotten"


# --- servers of their own: token look-ups limited per address ------------------------------


@pytest.fixture(scope="module")
def lookups_server(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """Two workers, one token look-up per client address a minute."""
    server = ServerProcess([*login.args(data_dir), "--workers", "2"],
                           data_dir / "key-limits-attacks.log",
                           {**login.env, "GRANTKEY_RATE_LIMIT_LOOKUPS": "1/60/0"})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.mark.slow  # a server of its own
def test_a_key_holder_cannot_reset_its_own_limit_with_crafted_look_up_buckets(
        lookups_server: ServerProcess, make_account: Callable[[], Account],
        services: Services, run: Callable[[Awaitable[Any]], Any],
        owner_sql: Callable[[Account, str], None]) -> None:
    account = on(lookups_server, make_account())
    owner_sql(account, "CREATE TABLE things (id int)")
    master = run(services.keys.master_principal(account.user))
    view = run(services.keys.create(master, "victim", GRANTS, options={
        "rate_limit": {"requests": 1, "per": 3600}}))
    token = view.token
    assert isinstance(token, str)
    query = {"q": "SELECT current_user AS me", "api_key": token}
    first = from_address("127.0.1.1", "GET", account.sql_url, params=query)
    assert first.status_code == 200, first.text
    role = first.json()["rows"][0]["me"]  # gk_<user id>_k<key id>
    user_id, _, key_id = role.removeprefix("gk_").partition("_k")
    assert (user_id, key_id) == (account.user.id, view.record.id)
    refused = from_address("127.0.1.2", "GET", account.sql_url, params=query)
    assert refused.status_code == 429 and 'key "victim"' in refused.json()["hint"]
    start = _print(f"k:{user_id}:{key_id}".encode()) % SLOTS
    for address in addresses_at(start, PROBES):  # 7 fill the window, the 8th evicts
        wrong = from_address(address, "GET", account.sql_url,
                             params={"q": "SELECT 1", "api_key": WRONG})
        assert wrong.status_code == 401, wrong.text
    again = from_address("127.0.1.3", "GET", account.sql_url, params=query)
    assert again.status_code == 429, "the key's hourly limit was reset by strangers' buckets"


@pytest.mark.slow  # a server of its own
def test_an_address_over_its_look_up_limit_gets_no_database_work_through_unknown_users(
        lookups_server: ServerProcess, make_account: Callable[[], Account]) -> None:
    account = on(lookups_server, make_account())
    address = "127.1.0.9"
    params = {"q": "SELECT 1", "api_key": WRONG}
    assert from_address(address, "GET", account.sql_url, params=params).status_code == 401
    assert from_address(address, "GET", account.sql_url, params=params).status_code == 429
    codes = [from_address(address, "GET",
                          f"{lookups_server.url}/user/nobody-{index}/api/v2/sql",
                          params=params).status_code for index in range(3)]
    codes.append(from_address(address, "GET", f"{lookups_server.url}/user/nobody/api/v3/api_keys",
                              params={"api_key": WRONG}).status_code)
    assert codes == [429] * 4, f"answered {codes}: one metadata query each, unlimited"


# --- a key's own limit "on every API" ------------------------------------------------------


def test_a_keys_limit_covers_the_datasets_api(http: httpx.Client, things: Account) -> None:
    grants = table_grants([("public", "things", ["select"])])
    grants[1]["table_metadata"] = []
    token = token_of(http, things, "meta", grants, rate_limit={"requests": 1, "per": 3600})
    url = f"{things.base_url}/user/{things.username}/api/v4/datasets"
    codes = [http.get(url, params={"api_key": token}).status_code for _ in range(3)]
    assert codes == [200, 429, 429]


def test_huge_limits_give_integer_headers_and_jsonp_keeps_them(
        http: httpx.Client, things: Account) -> None:
    token = token_of(http, things, "huge", rate_limit={"requests": 1, "per": 86400,
                                                       "burst": 1_000_000_000})
    answer = things.sql(http, "SELECT 1", token)
    assert answer.status_code == 200
    assert [answer.headers[name] for name in RATE_HEADERS] == ["1000000001", "1000000000",
                                                                "86400"]
    tight = token_of(http, things, "tight", rate_limit={"requests": 1, "per": 0.5})
    assert things.sql(http, "SELECT 1", tight).status_code == 200
    wrapped = things.sql(http, "SELECT 1", tight, callback="cb")
    assert all(wrapped.headers[name].isdigit() for name in (*RATE_HEADERS, "Retry-After"))
    assert wrapped.headers["Retry-After"] == "1"  # at least 1 s, never 0 or a fraction


@pytest.mark.parametrize("limit", [
    {"requests": 1, "per": 1e308}, {"requests": 1, "per": 5e-324},
    {"requests": 1, "per": 1e-7}, {"requests": 18446744073709551615, "per": 1},
    {"requests": 1, "per": 1, "burst": 18446744073709551615}, {"requests": True, "per": 1},
    {"requests": 1, "per": None}, {"requests": 1, "per": 1, "burst": 1.0},
    {"requests": 1, "per": -0.0}, {"requests": 1, "per": "1"}, "1/60", 0, {}])
def test_odd_rate_limits_are_refused_with_a_422(
        http: httpx.Client, things: Account, limit: object) -> None:
    answer = create_key(http, things, "odd", rate_limit=limit)
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"].startswith("Validation failed: Rate limit")


@pytest.mark.parametrize("raw", [b'{"name": "n", "grants": [], "rate_limit": {"requests": 1, '
                                 b'"per": NaN}}',
                                 b'{"name": "n", "grants": [], "rate_limit": {"requests": 1, '
                                 b'"per": 1e999}}',
                                 b'{"name": "n", "grants": [], "rate_limit": {"requests": '
                                 b'1' + b'0' * 400 + b', "per": 1}}'])
def test_unrepresentable_numbers_are_a_client_error(http: httpx.Client, things: Account,
                                                    raw: bytes) -> None:
    answer = http.post(things.keys_url, params=things.master(), content=raw,
                       headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text


# --- restrictions: addresses ---------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Forwarded": "for=127.0.0.5"}, {"X-Real-IP": "127.0.0.5"}, {"True-Client-IP": "127.0.0.5"},
    {"X-Forwarded-For": "127.0.0.5, 127.0.0.5", "X-Forwarded-Proto": "https"},
    {"X-Client-IP": "127.0.0.5", "CF-Connecting-IP": "127.0.0.5"}])
def test_no_header_names_the_client_address(things: Account, http: httpx.Client,
                                            headers: dict[str, str]) -> None:
    token = token_of(http, things, "office", restrictions={"ips": ["127.0.0.5/32"]})
    for method in ("GET", "HEAD"):
        answer = from_address("127.0.0.1", method, things.sql_url, headers=headers,
                              params={"q": "SELECT count(*) FROM things", "api_key": token})
        assert answer.status_code == 403, (method, answer.text)
    allowed = from_address("127.0.0.5", "GET", things.sql_url,
                           params={"q": "SELECT count(*) FROM things", "api_key": token})
    assert allowed.status_code == 200


def test_an_ipv4_mapped_restriction_allows_that_address() -> None:
    restrictions, problems = read_restrictions({"ips": ["::ffff:127.0.0.5"]})
    assert problems == [] and restrictions is not None
    assert restrictions.allows_address("127.0.0.5")
    assert restrictions.allows_address("::ffff:127.0.0.5")


def test_mapped_client_addresses_and_odd_networks_do_not_widen_a_restriction() -> None:
    restrictions, _ = read_restrictions({"ips": ["127.0.0.5/32", "2001:db8::/32"]})
    assert restrictions is not None
    assert restrictions.allows_address("::ffff:127.0.0.5")
    for outside in ("::127.0.0.5", "2002:7f00:5::1", "::ffff:127.0.0.6", "127.0.0.05",
                    "unknown", "", "2001:db9::1", "fe80::1%lo"):
        assert not restrictions.allows_address(outside), outside


@pytest.mark.parametrize("restrictions", [
    {"ips": ["fe80::1%eth0"]}, {"ips": [""]}, {"ips": ["1.2.3.4\u0000"]}, {"ips": [None]},
    {"ips": "10.0.0.0/8"}, {"ips": ["10.0.0.0/8"] * 101}, {"origins": ["https://*"]},
    {"origins": ["https://maps.example.com:99999"]}, {"origins": ["https://a" * 4000]},
    {"origins": ["https://" + "a-" * 20000 + "!"]}, {"origins": ["null"]},
    {"origins": ["https://maps.example.com/path"]}, {"origins": ["javascript://x"]},
    {"origins": ["https://ma\u0130ps.example.com"]}, {"ips": [], "origins": [], "x": 1}])
def test_odd_restrictions_are_refused_or_kept_never_a_500(
        http: httpx.Client, things: Account, restrictions: object) -> None:
    answer = create_key(http, things, "odd", restrictions=restrictions)
    assert answer.status_code in (201, 422), answer.text
    if answer.status_code == 201:  # then the key works from where it says, and is shown
        shown = http.get(f"{things.keys_url}/odd", params=things.master())
        assert shown.status_code == 200, shown.text


# --- restrictions: web origins -------------------------------------------------------------

ORIGINS = ["https://maps.example.com", "https://*.tiles.example.com", "http://localhost:8080"]


@pytest.fixture
def web_key(http: httpx.Client, things: Account) -> str:
    return token_of(http, things, "web", restrictions={"origins": ORIGINS})


@pytest.mark.parametrize("headers", [
    {}, {"Origin": "https://maps.example.com.evil.com"},
    {"Origin": "https://maps.example.com@evil.com"},
    {"Origin": "https://evil.com", "Referer": "https://maps.example.com/"},
    {"Origin": "null", "Referer": "https://maps.example.com/"},
    {"Origin": "http://maps.example.com"}, {"Origin": "https://maps.example.com:8443"},
    {"Origin": "https://tiles.example.com"}, {"Origin": "https://a.tiles.example.com.evil.com"},
    {"Origin": "https://eviltiles.example.com"}, {"Origin": "https://a.tiles.example.com:444"},
    {"Referer": "https://evil.com/https://maps.example.com"},
    {"Referer": "https://evil.com/?u=https://maps.example.com"},
    {"Referer": "https://evil.com#@maps.example.com"},
    {"Origin": "http://localhost"}, {"Origin": "http://localhost:8081"},
    {"Origin": "https://maps.example.com."}, {"Origin": "file://maps.example.com"},
    {"Origin": "https://maps%2eexample.com"}, {"Origin": "https://xn--maps-example-com"}])
def test_web_pages_elsewhere_cannot_use_an_origin_restricted_key(
        things: Account, web_key: str, headers: dict[str, str]) -> None:
    with httpx.Client(timeout=30) as client:
        for method in ("GET", "HEAD"):
            answer = client.request(method, things.sql_url, headers=headers,
                                    params={"q": "SELECT count(*) FROM things",
                                            "api_key": web_key})
            assert answer.status_code == 403, (method, answer.text)
            assert answer.headers.get("access-control-allow-origin") != headers.get("Origin")
        refused = client.get(f"{things.keys_url}/web", headers=headers,
                             params={"api_key": web_key})
        assert refused.status_code == 403


@pytest.mark.parametrize(("headers", "origin"), [
    ({"Origin": "HTTPS://MAPS.EXAMPLE.COM"}, "https://maps.example.com"),
    ({"Origin": "https://maps.example.com:443"}, "https://maps.example.com"),
    ({"Referer": "https://maps.example.com/page?x=https://evil.com"}, "https://maps.example.com"),
    ({"Origin": "https://a.b.tiles.example.com"}, "https://a.b.tiles.example.com"),
    ({"Origin": "http://localhost:8080"}, "http://localhost:8080")])
def test_the_pages_of_an_origin_restricted_key_get_only_their_own_origin_in_cors(
        things: Account, web_key: str, headers: dict[str, str], origin: str) -> None:
    with httpx.Client(timeout=30) as client:
        answer = client.get(things.sql_url, headers=headers,
                            params={"q": "SELECT count(*) FROM things", "api_key": web_key})
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == origin
    assert "Origin" in answer.headers["vary"]


# --- restrictions and limits through the Maps API --------------------------------------------


@pytest.fixture
def geo(postgis: None, account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, SETUP)
    return account


def maps_url(account: Account) -> str:
    return f"{account.base_url}/user/{account.username}/api/v1/map"


def geo_key(http: httpx.Client, account: Account, **options: Any) -> str:
    grants = table_grants([("public", "places", ["select"])], ("maps",))
    return token_of(http, account, "pub", grants, **options)


def test_a_restricted_keys_tile_token_is_refused_elsewhere(http: httpx.Client,
                                                           geo: Account) -> None:
    token = geo_key(http, geo, restrictions={"ips": ["127.0.0.9/32"]})
    made = from_address("127.0.0.9", "POST", maps_url(geo), params={"api_key": token},
                        json={"version": "1.3.0", "layers": [
                            {"type": "mapnik", "options": {"sql": "SELECT * FROM places"}}]})
    assert made.status_code == 200, made.text
    url = str(made.json()["metadata"]["tilejson"]["vector"]["tiles"][0])
    url = url.replace("{z}", "0").replace("{x}", "0").replace("{y}", "0")
    assert from_address("127.0.0.9", "GET", url).status_code == 200
    assert from_address("127.0.0.1", "GET", url).status_code == 403
    bare = url.split("?")[0]  # the layergroup without its tile token: the default key's
    assert from_address("127.0.0.1", "GET", bare).status_code in (401, 403, 404)


def test_a_restricted_and_limited_keys_named_map_does_not_serve_outside_its_limits(
        http: httpx.Client, geo: Account) -> None:
    token = geo_key(http, geo, restrictions={"ips": ["127.0.0.9/32"]},
                    rate_limit={"requests": 2, "per": 3600})
    template = {"version": "0.0.1", "name": "shop", "auth": {"method": "open"},
                "layergroup": {"layers": [{"type": "mapnik", "id": "pts",
                                           "options": {"sql": "SELECT * FROM places"}}]}}
    saved = from_address("127.0.0.9", "POST", f"{maps_url(geo)}/named", json=template,
                         params={"api_key": token})
    assert saved.status_code == 200, saved.text
    codes = [from_address("127.0.0.1", "GET", f"{maps_url(geo)}/named/shop/0/0/0.mvt").status_code
             for _ in range(4)]
    assert codes == [403] * 4, f"tiles drawn as the restricted, limited key: {codes}"


# --- usage and hygiene filters ------------------------------------------------------------


def test_a_regular_key_reads_no_other_keys_usage(http: httpx.Client, things: Account) -> None:
    token = token_of(http, things, "mine")
    token_of(http, things, "theirs")
    for name in ("Master", "master", "theirs", "THEIRS", "theirs%20", "..%2fmaster",
                 "Default%20public", "mine%00"):
        answer = http.get(f"{things.keys_url}/{name}/usage", params={"api_key": token})
        assert answer.status_code in (400, 403, 404), (name, answer.text)
    assert http.get(f"{things.keys_url}/mine/usage",
                    params={"api_key": token}).status_code == 200
    anonymous = http.get(f"{things.keys_url}/mine/usage",
                         params={"api_key": "default_public"})
    assert anonymous.status_code in (401, 403, 404)  # the default key is not "mine"
    listed = http.get(things.keys_url, params={"api_key": token, "unused_for": "0s"})
    assert {key["name"] for key in listed.json().get("result", [])} <= {"mine"}


@pytest.mark.parametrize("days", ["0", "367", "-1", "1e3", "1.0", "٣", "99999999999999999999",
                                  ""])
def test_odd_usage_days_are_a_400(http: httpx.Client, things: Account, days: str) -> None:
    answer = http.get(f"{things.keys_url}/master/usage", params={**things.master(), "days": days})
    assert answer.status_code == 400, answer.text


@pytest.mark.parametrize("value", ["1.5d", "-1d", "d", "", "10000000d", "1w", "٣d", "1d1h"])
def test_odd_hygiene_filters_are_a_400(http: httpx.Client, things: Account, value: str) -> None:
    for name in ("unused_for", "expiring_within"):
        answer = http.get(things.keys_url, params={**things.master(), name: value})
        assert answer.status_code == 400, (name, answer.text)


def test_the_longest_expiring_within_lists_keys(http: httpx.Client, things: Account) -> None:
    answer = http.get(things.keys_url, params={**things.master(), "expiring_within": "36600d"})
    assert answer.status_code == 200, answer.text
    longer = http.get(things.keys_url, params={**things.master(), "expiring_within": "9999999d"})
    assert longer.status_code == 400, longer.text


def test_the_longest_unused_for_is_not_a_500(http: httpx.Client, things: Account) -> None:
    answer = http.get(things.keys_url, params={**things.master(), "unused_for": "36600d"})
    assert answer.status_code == 200, answer.text
    longer = http.get(things.keys_url, params={**things.master(), "unused_for": "9999999d"})
    assert longer.status_code == 400, longer.text


def test_a_deleted_users_usage_counts_are_not_kept_forever(
        services: Services, run: Callable[[Awaitable[Any]], Any]) -> None:
    created = run(services.users.create(f"g{os.getpid()}-{next(_names)}"))
    usage = Usage(services.cluster)
    usage.count(run(services.keys.master_principal(created.user)), "sql")
    run(services.users.delete(created.user.username))
    run(usage.flush())
    run(usage.flush())
    assert created.user.database not in usage._counts


# --- why denied ----------------------------------------------------------------------------


def test_hints_about_sequences_and_forged_messages_stay_about_what_was_named(
        http: httpx.Client, things: Account, owner_sql: Callable[[Account, str], None]) -> None:
    owner_sql(things, "CREATE SEQUENCE counter; CREATE SCHEMA vault; "
                      "CREATE TABLE vault.things (secret text)")
    token = token_of(http, things, "reader")
    sequence = things.sql(http, "SELECT nextval('counter')", token)
    assert sequence.status_code == 403, sequence.text
    assert "counter" in sequence.json().get("hint", "counter")
    forged = things.sql(http, "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', "
                              "MESSAGE = 'permission denied for table pg_authid'; END$$", token)
    assert forged.status_code in (400, 403), forged.text
    assert "pg_authid" not in forged.json().get("hint", "")
    forged = things.sql(http, "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', "
                              "MESSAGE = 'permission denied for table api_keys'; END$$", token)
    assert "grantkey_meta" not in forged.json().get("hint", "")
    denied = things.sql(http, "INSERT INTO things VALUES (1)", token)
    assert denied.status_code == 403
    hint = denied.json()["hint"]
    assert "public.things" in hint and "insert" in hint
