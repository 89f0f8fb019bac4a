"""Attacks on key expiry, per-key SQL time limits, token regeneration with a grace and
`grantkey keys find` (commit 07f444a): expired keys and old tokens after their grace on
every API (SQL, COPY, batch jobs, Maps, Auth), a tenant extending its own expiry, the
sealed grace password, regenerations racing each other or the tenant's own lock on its
role, odd inputs, and what the operator's `keys find --revoke` does with a dead old token.

Eight of these were findings of the review, fixed since: an old token's COPY and batch job
outliving its grace, a statement started after its key expired, an old token reading the
new one, `keys find --revoke` acting on a dead old token, a form-encoded grace dropped, a
far expiry answered 500, and `old_token_stops_at` shown after the key's expiry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.exceptions import InvalidTag

from grantkey.domain.key_options import OptionRules
from grantkey.domain.secrets_box import SecretBox
from grantkey.errors import Unauthorized, ValidationFailed
from grantkey.services.container import Services
from tests.conftest import Account, KeyHandle, Login
from tests.support import table_grants

GRANTS = table_grants([("public", "things", ["select", "insert"])])
SPREAD = 6  # requests, each on a connection of its own: both workers answer some
Runner = Callable[[Awaitable[Any]], Any]


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def wait_until(moment: datetime) -> None:
    time.sleep(max((moment - datetime.now(UTC)).total_seconds(), 0))


def create(http: httpx.Client, account: Account, name: str, **options: Any) -> httpx.Response:
    return http.post(account.keys_url, params=account.master(),
                     json={"name": name, "grants": GRANTS, **options})


def regenerate(http: httpx.Client, account: Account, name: str,
               body: object = None) -> httpx.Response:
    return http.post(f"{account.keys_url}/{name}/token/regenerate", params=account.master(),
                     json=body)


def statuses(account: Account, token: str, spread: int = SPREAD) -> set[int]:
    answers = set()
    for _ in range(spread):
        with httpx.Client(timeout=30) as client:
            answers.add(account.sql(client, "SELECT count(*) FROM things", token).status_code)
    return answers


def key_role(admin_url: str, account: Account, name: str) -> tuple[str, datetime | None]:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        row = conn.execute("SELECT role, rolvaliduntil FROM grantkey_meta.api_keys "
                           "JOIN pg_roles ON rolname = role WHERE name = %s", [name]).fetchone()
    assert row is not None
    return str(row[0]), row[1]


def cli(login: Login, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grantkey.cli", *args, *login.args(data_dir)],
                          capture_output=True, text=True, env={**os.environ, **login.env},
                          timeout=120)


@pytest.fixture
def things(account: Account, http: httpx.Client) -> Account:
    answer = account.sql(http, "CREATE TABLE things (id int); INSERT INTO things VALUES (1)",
                         account.master_token)
    assert answer.status_code == 200, answer.text
    return account


def copy_to_rows(account: Account, token: str, rows: int, pause: float) -> tuple[int, int]:
    """(status, rows received) of a copyto that sends a row every `pause` seconds."""
    statement = f"COPY (SELECT g, pg_sleep({pause}) FROM generate_series(1, {rows}) g) TO STDOUT"
    received = b""
    status = 0
    with httpx.Client(timeout=30) as client:
        try:
            with client.stream("GET", f"{account.sql_url}/copyto",
                               params={"api_key": token, "q": statement}) as answer:
                status = answer.status_code
                for chunk in answer.iter_bytes():
                    received += chunk
        except httpx.HTTPError:
            pass  # cut short mid-stream
    return status, received.count(b"\n")


# --- every API refuses an expired key and an old token after its grace -------------------


def test_an_expired_key_and_a_dead_old_token_are_refused_on_every_api(
        http: httpx.Client, things: Account) -> None:
    expires = soon(2.5)
    brief = create(http, things, "brief", expires_at=iso(expires)).json()["token"]
    old = create(http, things, "rot").json()["token"]
    rotated = regenerate(http, things, "rot", {"grace_seconds": 2}).json()
    stops = datetime.strptime(rotated["old_token_stops_at"], "%Y-%m-%d %H:%M:%S %z")
    for token in (brief, old):
        assert statuses(things, token) == {200}  # cached by both workers
    wait_until(max(expires, stops + timedelta(seconds=1)))
    base = f"{things.base_url}/user/{things.username}"
    for token, name in ((brief, "brief"), (old, "rot")):
        assert statuses(things, token) == {401}
        assert http.post(things.sql_url, data={"q": "SELECT 1", "api_key": token}
                         ).status_code == 401
        assert http.get(f"{things.sql_url}/copyto", params={
            "api_key": token, "q": "COPY things TO STDOUT"}).status_code == 401
        assert http.post(f"{things.sql_url}/copyfrom", content=b"7\n", params={
            "api_key": token, "q": "COPY things FROM STDIN"}).status_code == 401
        assert http.post(f"{things.sql_url}/job", json={
            "query": "INSERT INTO things VALUES (9)", "api_key": token}).status_code == 401
        assert http.post(f"{base}/api/v1/map", params={"api_key": token}, json={
            "version": "1.3.1", "layers": []}).status_code == 401
        own = http.get(f"{things.keys_url}/{name}", params={"api_key": token})
        assert own.status_code == 401 and own.content == b""  # the Auth API's empty 401
    assert things.sql(http, "SELECT count(*) AS n FROM things WHERE id IN (7, 9)",
                      things.master_token).json()["rows"] == [{"n": 0}]
    listed = http.get(f"{things.keys_url}/brief", params=things.master()).json()
    assert listed["expired"] is True


def test_an_expiring_keys_copyto_is_cut_at_its_expiry(things: Account,
                                                      http: httpx.Client) -> None:
    token = create(http, things, "streamer", expires_at=iso(soon(2))).json()["token"]
    status, received = copy_to_rows(things, token, 8, 0.5)
    assert status in (200, 401)
    assert received < 8


def test_an_old_tokens_copyto_is_cut_when_its_grace_ends(things: Account,
                                                         http: httpx.Client) -> None:
    old = create(http, things, "streamer").json()["token"]
    assert regenerate(http, things, "streamer", {"grace_seconds": 2}).status_code == 200
    status, received = copy_to_rows(things, old, 8, 0.5)
    assert status in (200, 401)  # 401: cut before its first block was full
    assert received < 8, "all rows of the old token's COPY arrived after its grace ended"


def test_a_statement_that_starts_after_its_key_expired_is_refused(
        services: Services, run: Runner, things: Account, http: httpx.Client,
        make_key: Callable[..., KeyHandle]) -> None:
    handle = make_key(things, "late", GRANTS)
    principal = run(services.resolver.resolve(things.user, handle.token, fresh=True))
    warm = run(services.sql.start(principal, "SELECT 1"))  # its connection string, cached
    run(warm.aclose())
    # the same request, resolved an instant before the key expired, starts its statement
    # an instant after (a wait for a pooled session)
    late = replace(principal, key=replace(principal.key,
                                          expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    for _ in range(30):  # the 1 ms limit loses the race to a fast INSERT most of the time
        try:
            running = run(services.sql.start(late, "INSERT INTO things VALUES (44)"))
        except Unauthorized:
            continue
        run(running.aclose())
    assert inserted(http, things, 44) == 0, "an expired key's INSERT committed"


def test_a_keys_own_time_limit_holds_whatever_the_key_sends(things: Account,
                                                            http: httpx.Client) -> None:
    token = create(http, things, "quick", limits={"sql_timeout_seconds": 0.5}).json()["token"]
    for query in ("SELECT pg_sleep(1.2)", "SET statement_timeout = 0; SELECT pg_sleep(1.2)",
                  "SELECT 1; SELECT pg_sleep(1.2)",
                  "WITH s AS (SELECT pg_sleep(1.2)) SELECT * FROM s"):
        posted = http.post(things.sql_url, data={"q": query, "api_key": token})
        assert posted.status_code == 429, (query, posted.text)


# --- batch jobs ---------------------------------------------------------------------------


def job_outcome(http: httpx.Client, account: Account, token: str,
                query: list[str]) -> dict[str, Any]:
    made = http.post(f"{account.sql_url}/job", json={"query": query, "api_key": token})
    assert made.status_code == 201, made.text
    job_id = made.json()["job_id"]
    deadline = time.monotonic() + 30
    while True:
        job: dict[str, Any] = http.get(f"{account.sql_url}/job/{job_id}",
                                       params=account.master()).json()
        if job["status"] in ("done", "failed", "cancelled", "unknown"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def inserted(http: httpx.Client, account: Account, value: int) -> int:
    answer = account.sql(http, f"SELECT count(*) AS n FROM things WHERE id = {value}",
                         account.master_token)
    return int(answer.json()["rows"][0]["n"])


@pytest.mark.slow
@pytest.mark.usefixtures("job_runners")
def test_a_job_of_an_expiring_key_does_not_write_after_its_expiry(
        things: Account, http: httpx.Client) -> None:
    token = create(http, things, "batch", expires_at=iso(soon(2))).json()["token"]
    job = job_outcome(http, things, token, ["SELECT pg_sleep(3.5)",
                                            "INSERT INTO things VALUES (42)"])
    assert job["status"] == "failed", job
    assert inserted(http, things, 42) == 0


@pytest.mark.slow
@pytest.mark.usefixtures("job_runners")
def test_a_job_of_an_old_token_does_not_write_after_its_grace(
        things: Account, http: httpx.Client) -> None:
    old = create(http, things, "batch").json()["token"]
    assert regenerate(http, things, "batch", {"grace_seconds": 2}).status_code == 200
    job = job_outcome(http, things, old, ["SELECT pg_sleep(3.5)",
                                          "INSERT INTO things VALUES (43)"])
    assert inserted(http, things, 43) == 0, f"written after the grace ended: {job}"


# --- a tenant extending its own expiry ----------------------------------------------------


def test_a_tenant_cannot_extend_its_keys_expiry(things: Account, http: httpx.Client,
                                                admin_url: str) -> None:
    token = create(http, things, "bounded", expires_at=iso(soon(86_400))).json()["token"]
    role, valid_until = key_role(admin_url, things, "bounded")
    assert valid_until is not None
    for statement, who in (
            ("ALTER ROLE CURRENT_USER VALID UNTIL 'infinity'", token),
            ("ALTER ROLE CURRENT_USER PASSWORD 'mine' VALID UNTIL 'infinity'", token),
            ("ALTER ROLE CURRENT_USER VALID UNTIL 'infinity'", things.master_token),
            (f'ALTER ROLE "{role}" VALID UNTIL \'infinity\'', token),
            (f'ALTER ROLE "{role}" VALID UNTIL \'infinity\'', things.master_token),
            (f'ALTER ROLE "{role}" WITH LOGIN VALID UNTIL \'infinity\'', things.master_token),
            (f'CREATE ROLE x LOGIN PASSWORD \'x\' IN ROLE "{role}"', things.master_token)):
        answer = things.sql(http, statement, who)
        assert answer.status_code in (400, 403), (statement, answer.text)
    # the key's own password change, then grantkey's repair and both regenerations
    assert things.sql(http, "ALTER ROLE CURRENT_USER PASSWORD 'mine'", token).status_code == 200
    assert statuses(things, token, 4) == {200}
    assert regenerate(http, things, "bounded", {"grace_seconds": 60}).status_code == 200
    assert regenerate(http, things, "bounded").status_code == 200
    assert key_role(admin_url, things, "bounded") == (role, valid_until)


def test_the_grace_password_opens_with_its_old_token_and_key_only(box: SecretBox) -> None:
    sealed = box.seal_for_old_token("the new password", "gkr-old-token", b"key-1")
    assert box.open_with_old_token(sealed, "gkr-old-token", b"key-1") == "the new password"
    for token, key in (("gkr-other-token", b"key-1"), ("gkr-old-token", b"key-2"),
                       ("gkr-old-tokeN", b"key-1"), ("", b"key-1")):
        with pytest.raises(InvalidTag):
            box.open_with_old_token(sealed, token, key)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(InvalidTag):
        box.open_with_old_token(flipped, "gkr-old-token", b"key-1")
    other = SecretBox(b"another server secret, as long as the tests' own one is")
    with pytest.raises(InvalidTag):
        other.open_with_old_token(sealed, "gkr-old-token", b"key-1")


# --- regenerations racing ------------------------------------------------------------------


def test_a_second_grace_ends_the_first_old_token_on_every_worker(
        things: Account, http: httpx.Client) -> None:
    first = create(http, things, "chain").json()["token"]
    second = regenerate(http, things, "chain", {"grace_seconds": 600}).json()["token"]
    assert statuses(things, first) == {200}
    third = regenerate(http, things, "chain", {"grace_seconds": 600}).json()["token"]
    assert statuses(things, first) == {401}
    assert statuses(things, second) == {200}
    assert statuses(things, third) == {200}
    document = http.get(f"{things.keys_url}/chain", params={"api_key": first})
    assert document.status_code == 401
    assert http.delete(f"{things.keys_url}/chain", params=things.master()).status_code == 204
    for token in (first, second, third):
        assert statuses(things, token, 4) == {401}


def test_concurrent_regenerations_leave_the_newest_and_at_most_one_old_token(
        things: Account, http: httpx.Client) -> None:
    original = create(http, things, "raced").json()["token"]

    def rotate(body: object) -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            return regenerate(client, things, "raced", body)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(rotate, [{"grace_seconds": 600}, {"grace_seconds": 600},
                                         {"grace_seconds": 600}, {"grace_seconds": 300}]))
    assert all(a.status_code in (200, 503) for a in answers), [a.text for a in answers]
    issued = [a.json()["token"] for a in answers if a.status_code == 200]
    with httpx.Client(timeout=30) as client:
        current = client.get(f"{things.keys_url}/raced", params=things.master()).json()
    assert current["token"] in issued
    working = [t for t in [original, *issued] if statuses(things, t, 4) == {200}]
    assert current["token"] in working and len(working) <= 2, (len(issued), len(working))
    with httpx.Client(timeout=30) as client:
        last = regenerate(client, things, "raced").json()["token"]
    for token in [original, *issued]:
        assert statuses(things, token, 4) == {401}
    assert statuses(things, last, 4) == {200}


def test_a_grace_regeneration_meeting_the_tenants_lock_writes_nothing(
        things: Account, http: httpx.Client, make_key: Callable[..., KeyHandle]) -> None:
    """The key holds its own role's catalog row (an open ALTER ROLE CURRENT_USER …): the
    regeneration gives up (no 500) and leaves the key exactly as it was."""
    handle = make_key(things, "held", GRANTS)
    with handle.connect() as tenant:
        tenant.execute("BEGIN")
        tenant.execute("ALTER ROLE CURRENT_USER PASSWORD 'held-by-the-tenant'")
        answer = regenerate(http, things, "held", {"grace_seconds": 60})
        tenant.execute("ROLLBACK")
    assert answer.status_code == 503, answer.text
    document = http.get(f"{things.keys_url}/held", params=things.master()).json()
    assert document["token"] == handle.token
    assert document["token_rotated_at"] is None and document["old_token_stops_at"] is None
    with handle.connect() as conn:  # the role's password is still the token's
        assert conn.execute("SELECT 1").fetchone() == (1,)
    audit = http.get(f"{things.base_url}/user/{things.username}/api/v3/audit",
                     params={**things.master(), "type": "key.regenerated"}).json()["result"]
    assert audit == []
    retried = regenerate(http, things, "held", {"grace_seconds": 60})
    assert retried.status_code == 200
    assert statuses(things, handle.token, 4) == {200}
    assert statuses(things, retried.json()["token"], 4) == {200}


# --- odd inputs ----------------------------------------------------------------------------


EXPIRIES: list[object] = [
    "99999-01-01T00:00:00Z", "+275760-09-13T00:00:00Z", "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+01:00", "2027-01-31T12:00:00+24:00", "2027-01-31T12:00:00+99:00",
    "2027-01-31T24:00:00Z", "2027-02-30T12:00:00Z", "2027-01-31T12:00:00Z" + "0" * 10_000,
    "2027-01-31T12:00:00\x00Z", "NaN", "Infinity", "-infinity", "epoch", "now", "",
    "２０２７-01-31T12:00:00Z", [], {}, True, False, 1e308, -1, 10**18, {"$date": 1},
]


def test_odd_expiries_limits_and_grace_bodies_are_never_a_500(
        things: Account, http: httpx.Client) -> None:
    for value in EXPIRIES:
        answer = create(http, things, "odd", expires_at=value)
        assert answer.status_code in (201, 400, 422), (value, answer.status_code)
        if answer.status_code == 201:
            assert http.delete(f"{things.keys_url}/odd", params=things.master()
                               ).status_code == 204
    limits: list[object] = [1e-300, 5e-324, 10**400, -0.0, None, [], "1e400", {"x": 1}]
    for limit in limits:
        answer = create(http, things, "odd", limits={"sql_timeout_seconds": limit})
        assert answer.status_code in (201, 400, 422), (limit, answer.status_code)
        if answer.status_code == 201:
            assert http.delete(f"{things.keys_url}/odd", params=things.master()
                               ).status_code == 204
    create(http, things, "regen")
    url = f"{things.keys_url}/regen/token/regenerate"
    bodies: list[object] = [[], "x", 0, 1.5, True, False, None, {}, {"grace_seconds": None},
                            {"grace_seconds": 10**30}, {"grace_seconds": -0},
                            {"grace_seconds": 0.0}, {"grace_seconds": []},
                            {"grace_seconds": 1, "token": 5}, {"grace_seconds": 1, "token": ""},
                            {"grace_seconds": 1, "token": "x" * 10_000},
                            {"grace_seconds": 1, "token": None}]
    for body in bodies:
        answer = http.post(url, params=things.master(), json=body)
        assert answer.status_code in (200, 400, 422), (body, answer.status_code, answer.text)
    for raw in (b"{", b"\xff\xfe", b"[1,", b"NaN", b'{"grace_seconds": 1e999}'):
        answer = http.post(url, params=things.master(), content=raw,
                           headers={"Content-Type": "application/json"})
        assert answer.status_code in (400, 422), (raw, answer.status_code)
    default = http.post(f"{things.keys_url}/Default%20public/token/regenerate",
                        params=things.master(), json={"grace_seconds": 60})
    assert default.status_code == 403


def test_an_odd_but_valid_offset_is_the_same_moment_everywhere(
        things: Account, http: httpx.Client, admin_url: str) -> None:
    document = create(http, things, "offset",
                      expires_at="2027-06-01T12:00:00+23:59:59.999999").json()
    moment = datetime(2027, 6, 1, 12, tzinfo=UTC) - timedelta(hours=23, minutes=59,
                                                              seconds=59, microseconds=999_999)
    _, valid_until = key_role(admin_url, things, "offset")
    assert valid_until == moment
    assert document["expires_at"] == moment.strftime("%Y-%m-%d %H:%M:%S +0000")


def test_without_a_lifetime_maximum_a_far_expiry_is_a_validation_failure(
        services: Services, run: Runner, account: Account,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services.keys, "rules", OptionRules(max_lifetime_days=0, sql_timeout=3))
    master = run(services.keys.master_principal(account.user))
    with pytest.raises(ValidationFailed):
        run(services.keys.create(master, "far", GRANTS,
                                 options={"expires_at": "9999-12-31T23:59:59-12:00"}))


def test_a_form_encoded_grace_is_not_silently_dropped(things: Account,
                                                      http: httpx.Client) -> None:
    old = create(http, things, "formed").json()["token"]
    answer = http.post(f"{things.keys_url}/formed/token/regenerate",
                       data={"grace_seconds": "60", "api_key": things.master_token})
    assert answer.status_code != 200 or things.sql(http, "SELECT 1", old).status_code == 200


def test_old_token_stops_at_is_never_after_the_keys_expiry(things: Account,
                                                           http: httpx.Client) -> None:
    expires = soon(120).replace(microsecond=0)
    create(http, things, "short", expires_at=iso(expires))
    document = regenerate(http, things, "short", {"grace_seconds": 3600}).json()
    stops = datetime.strptime(document["old_token_stops_at"], "%Y-%m-%d %H:%M:%S %z")
    assert stops <= expires, (document["old_token_stops_at"], document["expires_at"])


# --- what the old token can do in its grace -----------------------------------------------


def test_the_old_token_cannot_read_the_new_token_in_its_grace(things: Account,
                                                              http: httpx.Client) -> None:
    old = create(http, things, "peek").json()["token"]
    new = regenerate(http, things, "peek", {"grace_seconds": 60}).json()["token"]
    seen = http.get(f"{things.keys_url}/peek", params={"api_key": old})
    assert seen.status_code in (200, 401)
    assert new not in seen.text


# --- grantkey keys find --------------------------------------------------------------------


def test_find_does_not_revoke_a_key_for_an_old_token_that_no_longer_works(
        login: Login, data_dir: Path, things: Account, http: httpx.Client) -> None:
    old = create(http, things, "moved").json()["token"]
    new = regenerate(http, things, "moved", {"grace_seconds": 1}).json()["token"]
    time.sleep(1.5)
    assert things.sql(http, "SELECT 1", old).status_code == 401
    found = cli(login, data_dir, "keys", "find", old, "--revoke", "--yes")
    assert "moved" not in found.stdout or "OLD" not in found.stdout or found.returncode == 1
    assert things.sql(http, "SELECT 1", new).status_code == 200, found.stdout


def test_find_prints_no_token_password_or_role(login: Login, data_dir: Path,
                                               things: Account, http: httpx.Client,
                                               admin_url: str) -> None:
    token = create(http, things, "quiet").json()["token"]
    new = regenerate(http, things, "quiet", {"grace_seconds": 600}).json()["token"]
    role, _ = key_role(admin_url, things, "quiet")
    found = cli(login, data_dir, "keys", "find", token)
    assert found.returncode == 0, (found.stdout, found.stderr)
    assert "its OLD token" in found.stdout, (found.stdout, found.stderr)
    for secret in (token, new, things.master_token):
        assert secret not in found.stdout + found.stderr, (found.stdout, found.stderr)
    assert role not in found.stdout  # the operator's logs (stderr) may name roles
