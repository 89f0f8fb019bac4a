"""Rate limits (carto-compat §11, issue 15 feature 3): a key's own on every API, a user's
per API group, both applying; CARTO's 429 (body, four headers) that the real `carto` SDK
turns into CartoRateLimitException with correct integers, while a time limit's 429 carries
none of them; shared by the workers of one server (`--workers 2`, each request a new
connection) and, through a real redis-server, by two servers; token look-ups limited per
client address."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from grantkey.domain.rate_limits import Rate
from grantkey.services.rate_store import RedisBuckets, redis_key
from tests.conftest import Account, Login
from tests.support import ServerProcess, free_port, table_grants

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
carto_auth = pytest.importorskip("carto.auth")
carto_sql = pytest.importorskip("carto.sql")
carto_exceptions = pytest.importorskip("carto.exceptions")

GRANTS = table_grants([("public", "things", ["select"])])
RATE_HEADERS = ("Carto-Rate-Limit-Limit", "Carto-Rate-Limit-Remaining", "Carto-Rate-Limit-Reset")
OVER = "You are over platform's limits. Please contact us to know more details"


def key_with(http: httpx.Client, account: Account, name: str, **options: Any) -> str:
    answer = http.post(account.keys_url, params=account.master(),
                       json={"name": name, "grants": GRANTS, **options})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def each_new(account: Account, token: str, count: int, query: str = "SELECT 1") -> list[httpx.Response]:
    """`count` SQL API requests, each on a connection of its own (both workers answer)."""
    answers = []
    for _ in range(count):
        with httpx.Client(timeout=30) as client:
            answers.append(account.sql(client, query, token))
    return answers


@pytest.fixture
def things(account: Account, http: httpx.Client) -> Account:
    answer = account.sql(http, "CREATE TABLE things (id int)", account.master_token)
    assert answer.status_code == 200, answer.text
    return account


def test_a_keys_limit_holds_across_both_workers_with_carto_headers_and_body(
        http: httpx.Client, things: Account) -> None:
    token = key_with(http, things, "limited", rate_limit={"requests": 3, "per": 60, "burst": 2})
    answers = each_new(things, token, 8)
    assert [a.status_code for a in answers] == [200, 200, 200] + [429] * 5
    assert [a.headers["Carto-Rate-Limit-Remaining"] for a in answers[:3]] == ["2", "1", "0"]
    for answer in answers:
        assert answer.headers["Carto-Rate-Limit-Limit"] == "3"  # burst + 1
        assert int(answer.headers["Carto-Rate-Limit-Reset"]) in range(1, 61)
        assert "Carto-Rate-Limit-Remaining" in answer.headers["Access-Control-Expose-Headers"]
    refused = answers[-1]
    assert 1 <= int(refused.headers["Retry-After"]) <= 20  # one request every 20 s
    body = refused.json()
    assert {k: body[k] for k in ("error", "context", "detail")} == {
        "error": [OVER], "context": "limit", "detail": "rate-limit"}
    assert body["hint"].startswith('key "limited" may make 3 requests per 60 s (burst 2)')
    assert "Retry-After" not in answers[0].headers


def test_a_key_without_a_limit_and_a_time_limit_429_carry_no_rate_headers(
        http: httpx.Client, things: Account) -> None:
    token = key_with(http, things, "free")
    answer = things.sql(http, "SELECT 1", token)
    assert not any(name in answer.headers for name in (*RATE_HEADERS, "Retry-After"))
    slow = things.sql(http, "SELECT pg_sleep(10)", token)
    assert slow.status_code == 429 and "timeout" in slow.json()["error"][0]
    assert not any(name in slow.headers for name in (*RATE_HEADERS, "Retry-After"))


def test_a_keys_limit_covers_every_api_and_the_maps_shape(
        http: httpx.Client, things: Account) -> None:
    token = key_with(http, things, "maps", rate_limit={"requests": 1, "per": 60})
    assert things.sql(http, "SELECT 1", token).status_code == 200
    answer = http.get(f"{things.base_url}/user/{things.username}/api/v1/map/named",
                      params={"api_key": token})
    assert answer.status_code == 429
    assert answer.json()["errors_with_context"][0]["type"] == "limit"
    assert answer.json()["errors_with_context"][0]["subtype"] == "rate-limit"
    assert answer.headers["Retry-After"].isdigit()


def test_the_key_object_shows_its_limit_and_others_are_not_limited(
        http: httpx.Client, things: Account) -> None:
    token = key_with(http, things, "one", rate_limit={"requests": 1, "per": 3600, "burst": 0})
    shown = http.get(f"{things.keys_url}/one", params=things.master()).json()
    assert shown["rate_limit"] == {"requests": 1, "per": 3600, "burst": 0}
    other = key_with(http, things, "two")
    assert [a.status_code for a in each_new(things, token, 2)] == [200, 429]
    assert {a.status_code for a in each_new(things, other, 4)} == {200}
    assert things.sql(http, "SELECT 1", things.master_token).status_code == 200


@pytest.mark.parametrize(("limit", "message"), [
    ([1], 'Rate limit must be an object, e.g. {"requests": 100, "per": 60, "burst": 10}'),
    ({"requests": 1, "per": 1, "x": 1}, "Rate limit has no option x (known: requests, per, burst)"),
    ({"requests": "5", "per": 1}, "Rate limit needs whole requests and burst and a number of "
                                  'seconds per, e.g. {"requests": 100, "per": 60, "burst": 10}'),
    ({"requests": 1.5, "per": 1}, "Rate limit needs whole requests and burst and a number of "
                                  'seconds per, e.g. {"requests": 100, "per": 60, "burst": 10}'),
    ({"requests": 0, "per": 1}, "Rate limit requests must be from 1 to 1000000000"),
    ({"requests": 1, "per": 0}, "Rate limit per must be a number of seconds above 0 and at "
                                "most 86400"),
    ({"requests": 1, "per": 1, "burst": -1}, "Rate limit burst must be from 0 to 1000000000"),
    ({"requests": 2_000_000, "per": 1}, "Rate limit may allow at most 1000000 requests per "
                                        "second")])
def test_a_wrong_rate_limit_is_a_validation_failure(
        http: httpx.Client, things: Account, limit: object, message: str) -> None:
    answer = http.post(things.keys_url, params=things.master(),
                       json={"name": "k", "grants": GRANTS, "rate_limit": limit})
    assert answer.status_code == 422
    assert answer.json()["errors"] == f"Validation failed: {message}"


# --- the real carto SDK ----------------------------------------------------------------


def sdk_sql(account: Account, token: str) -> Any:
    return carto_sql.SQLClient(carto_auth.APIKeyAuthClient(
        base_url=f"{account.base_url}/user/{account.username}/", api_key=token))


def test_the_carto_sdk_raises_its_rate_limit_exception_with_correct_integers(
        http: httpx.Client, things: Account) -> None:
    token = key_with(http, things, "sdk", rate_limit={"requests": 2, "per": 120, "burst": 1})
    sql = sdk_sql(things, token)
    sql.send("SELECT 1")
    sql.send("SELECT 1")
    with pytest.raises(carto_exceptions.CartoRateLimitException) as raised:
        sql.send("SELECT 1")
    error = raised.value
    assert (error.limit, error.remaining) == (2, 0)
    assert 1 <= error.retry_after <= 60 and isinstance(error.retry_after, int)
    assert 60 <= error.reset <= 120 and isinstance(error.reset, int)


def test_the_carto_sdk_sees_a_time_limit_as_a_plain_error(
        http: httpx.Client, things: Account) -> None:
    token = key_with(http, things, "slow", rate_limit={"requests": 100, "per": 1, "burst": 10})
    with pytest.raises(carto_exceptions.CartoException) as raised:
        sdk_sql(things, token).send("SELECT pg_sleep(10)")
    assert not isinstance(raised.value, carto_exceptions.CartoRateLimitException)
    assert "timeout" in str(raised.value)


# --- a user's limits per API group, and look-ups per address: servers of their own -------


def own_server(data_dir: Path, login: Login, name: str, **env: str) -> ServerProcess:
    return ServerProcess([*login.args(data_dir), "--workers", "2"],
                         data_dir / f"{name}.log", {**login.env, **env}).started()


@pytest.fixture(scope="module")
def user_limited(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    server = own_server(data_dir, login, "rate-user", GRANTKEY_RATE_LIMIT_SQL="3/60/2",
                        GRANTKEY_RATE_LIMIT_JOBS="1/60")
    yield server
    server.stop()


def on(server: ServerProcess, account: Account) -> Account:
    return Account(account.user, account.master_token, server.url)


@pytest.mark.slow  # a server of its own
def test_a_users_limit_is_shared_by_its_keys_per_api_group_and_the_stricter_reports(
        http: httpx.Client, make_account: Callable[[], Account],
        user_limited: ServerProcess) -> None:
    account = on(user_limited, make_account())
    account.sql(http, "CREATE TABLE things (id int)", account.master_token)  # 1 of 3
    first = key_with(http, account, "first")
    second = key_with(http, account, "second", rate_limit={"requests": 10, "per": 60,
                                                           "burst": 9})
    answers = [*each_new(account, first, 2), *each_new(account, second, 3)]
    assert [a.status_code for a in answers] == [200, 200, 429, 429, 429]
    assert [a.headers["Carto-Rate-Limit-Remaining"] for a in answers[:2]] == ["1", "0"]
    assert answers[0].headers["Carto-Rate-Limit-Limit"] == "3"  # the user's: fewer left
    assert "user " + account.username in answers[-1].json()["hint"]
    jobs = f"{account.base_url}/user/{account.username}/api/v2/sql/job"
    assert http.get(jobs, params={"api_key": first}).status_code == 200  # another group
    assert http.get(jobs, params={"api_key": first}).status_code == 429
    stranger = on(user_limited, make_account())
    assert stranger.sql(http, "SELECT 1", stranger.master_token).status_code == 200


@pytest.mark.slow  # a server of its own
def test_token_look_ups_are_limited_per_client_address_before_any_database_work(
        data_dir: Path, login: Login, make_account: Callable[[], Account]) -> None:
    server = own_server(data_dir, login, "rate-lookups", GRANTKEY_RATE_LIMIT_LOOKUPS="4/60/3")
    try:
        account = on(server, make_account())
        wrong = "gkr" + "A" * 38

        def from_address(address: str, token: str) -> int:
            transport = httpx.HTTPTransport(local_address=address)
            with httpx.Client(transport=transport, timeout=30) as client:
                return account.sql(client, "SELECT 1", token).status_code

        assert from_address("127.0.0.7", account.master_token) == 200  # a look-up, then cached
        codes = [from_address("127.0.0.7", wrong) for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        assert from_address("127.0.0.7", account.master_token) in (200, 429)  # one worker's cache
        assert from_address("127.0.0.8", wrong) == 401  # another address: its own bucket
    finally:
        server.stop()


# --- Redis: two servers, one bucket ----------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (the README's test command installs it)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.slow  # two servers of their own and a redis-server
def test_two_servers_on_redis_share_a_keys_bucket(
        tmp_path: Path, login: Login, redis_url: str,
        make_account: Callable[[], Account], http: httpx.Client) -> None:
    # each server its own data directory: no bucket file shared, only Redis
    servers = []
    try:
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            servers.append(own_server(folder, login, f"redis-{name}", GRANTKEY_REDIS_URL=redis_url))
        account = make_account()
        account.sql(http, "CREATE TABLE things (id int)", account.master_token)
        token = key_with(http, account, "shared",
                         rate_limit={"requests": 5, "per": 60, "burst": 4})
        accepted = 0
        for index in range(16):
            with httpx.Client(timeout=30) as client:
                answer = on(servers[index % 2], account).sql(client, "SELECT 1", token)
            assert answer.status_code in (200, 429), answer.text
            accepted += answer.status_code == 200
        assert accepted == 5  # burst 4: five at once in all (each server alone: five each)
    finally:
        for server in servers:
            server.stop()


def test_on_redis_a_request_one_bucket_refuses_costs_the_other_nothing(redis_url: str) -> None:
    async def scenario() -> list[list[tuple[bool, int]]]:
        store = RedisBuckets(redis_url)
        roomy, strict = Rate(10, 60, 9), Rate(1, 3600)
        tag = secrets.token_hex(4).encode()  # buckets of this run only
        both = [(b"roomy" + tag, roomy, 1), (b"strict" + tag, strict, 1)]
        try:
            return [[(d.allowed, d.remaining) for d in await store.take(takes)]
                    for takes in (both, both, both[::-1], both[:1])]
        finally:
            await store.close()

    first, refused, strict_first, roomy = asyncio.run(scenario())
    assert first == [(True, 9), (True, 0)]
    assert refused == [(True, 8), (False, 0)]  # what it would have left: nothing taken
    assert strict_first == [(False, 0), (True, 8)]
    assert roomy == [(True, 8)]


def test_on_redis_a_lease_takes_many_from_a_roomy_bucket_and_one_from_a_tight_one(
        redis_url: str) -> None:
    async def scenario() -> list[tuple[bool, int, int]]:
        store = RedisBuckets(redis_url)
        tag = secrets.token_hex(4).encode()
        roomy, tight = Rate(1, 3600, 9999), Rate(1, 3600, 9)
        try:
            return [(d.allowed, d.remaining, d.taken) for d in await store.take(
                [(b"k:roomy" + tag, roomy, 32), (b"k:tight" + tag, tight, 32)])]
        finally:
            await store.close()

    # 32 taken from the roomy bucket; the tight one has room for 10, so one is taken
    assert asyncio.run(scenario()) == [(True, 10_000 - 32, 32), (True, 9, 1)]


def test_a_requests_redis_keys_share_one_hash_slot() -> None:
    keys = [redis_key(b"k:0a1b:0c2d"), redis_key(b"u:0a1b:sql")]
    assert keys == [b"grantkey:rl:k:{0a1b}:0c2d", b"grantkey:rl:u:{0a1b}:sql"]
    assert redis_key(b"a:2001:db8::1") != redis_key(b"a:2001:db8::2")
