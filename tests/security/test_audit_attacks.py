"""Attacks on the events seam, the audit log and the routing that serves it (issue 12 item
2), kept as tests: each asserts the safe behaviour and is named after the attack."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from psycopg.rows import dict_row

from grantkey.domain.secrets_box import SecretBox
from grantkey.domain.tokens import digest
from grantkey.services.container import Services
from tests.conftest import Account, KeyHandle
from tests.support import apis_only

MakeKey = Callable[[Account, str, Any], KeyHandle]
OwnerSql = Callable[[Account, str], None]


def audit_path(username: str, prefix: str = "/user/{u}") -> str:
    return prefix.format(u=username) + "/api/v3/audit"


def raw_request(account: Account, method: str, target: str,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the request target sent byte for byte (httpx would
    normalise `//`, dot segments and percent-escapes); the status and the body."""
    host, port = account.base_url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1"]
    sent = {"Host": f"{host}:{port}", "Connection": "close", **(headers or {})}
    lines += [f"{name}: {value}" for name, value in sent.items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def audit_rows(admin_url: str, username: str) -> list[dict[str, Any]]:
    with psycopg.connect(admin_url, dbname="grantkey", row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM public.audit_log WHERE username = %s ORDER BY id",
                            [username]).fetchall()


@pytest.fixture
def victim_and_attacker(make_account: Callable[[], Account],
                        make_key: MakeKey) -> tuple[Account, Account]:
    victim, attacker = make_account(), make_account()
    make_key(victim, "victim-secret-key-name", apis_only("sql"))
    return victim, attacker


# -- reading another user's audit log ----------------------------------------------------

def _path_forms(victim: str, attacker: str) -> list[tuple[str, dict[str, str]]]:
    """Request targets and headers that name the victim in some way."""
    host = {"Host": f"{victim}.localhost"}
    return [
        (audit_path(victim), {}),
        (audit_path(victim) + "/", {}),
        (audit_path(victim, "/u/{u}"), {}),
        (audit_path(victim, "/u/{u}") + "/", {}),
        ("/api/v3/audit", host),
        ("/api/v3/audit/", host),
        # the path names the victim, the Host the attacker (and the other way round below)
        (audit_path(victim), {"Host": f"{attacker}.localhost"}),
        # the victim's name percent-encoded, one letter at a time
        (audit_path("".join(f"%{ord(c):02X}" for c in victim)), {}),
        (audit_path(victim[:-1] + f"%{ord(victim[-1]):02X}"), {}),
        (audit_path(victim) + "?api_key=x", {}),  # a second api_key, last wins
    ]


def test_another_users_master_reads_no_audit_entry_of_the_victim_in_any_path_form(
    victim_and_attacker: tuple[Account, Account],
) -> None:
    victim, attacker = victim_and_attacker
    for target, headers in _path_forms(victim.username, attacker.username):
        for credential in ({"Authorization": f"Bearer {attacker.master_token}"},
                           {"Authorization": "Basic " + base64.b64encode(
                               f"{victim.username}:{attacker.master_token}".encode()).decode()},
                           {"Authorization": "Basic " + base64.b64encode(
                               f"{attacker.username}:{attacker.master_token}".encode()).decode()}):
            for method in ("GET", "HEAD"):
                status, body = raw_request(victim, method, target, {**headers, **credential})
                assert status == 401, (method, target, headers, credential, status, body)
                assert body == b""
        sep = "&" if "?" in target else "?"
        status, body = raw_request(victim, "GET", f"{target}{sep}api_key={attacker.master_token}",
                                   headers)
        assert status == 401, (target, headers, status, body)
        assert b"victim-secret-key-name" not in body


def test_a_path_naming_the_attacker_and_a_host_naming_the_victim_serves_the_attacker_only(
    victim_and_attacker: tuple[Account, Account],
) -> None:
    """The path's user wins over the Host (as before the routing change, carto-compat §1):
    the attacker reads its own log, never the victim's."""
    victim, attacker = victim_and_attacker
    status, body = raw_request(
        victim, "GET", audit_path(attacker.username) + f"?api_key={attacker.master_token}",
        {"Host": f"{victim.username}.localhost"})
    assert status == 200, body
    entries = orjson.loads(body)["result"]
    assert entries and {e["user"]["username"] for e in entries} == {attacker.username}
    assert b"victim-secret-key-name" not in body


@pytest.mark.parametrize("tail", ["/api/v3/audit", "/api/v3/api_keys",
                                  "/api/v3/api_keys/victim-secret-key-name"])
def test_nested_doubled_dotted_or_encoded_prefixes_never_reach_the_victims_handler(
    victim_and_attacker: tuple[Account, Account], tail: str,
) -> None:
    """A path with two user prefixes, an empty segment, dot segments or encoded slashes is
    the router's 404 (or names the attacker, who is then served its own data): never the
    victim's data, never a 500."""
    victim, attacker = victim_and_attacker
    v, a = victim.username, attacker.username
    targets = [
        f"/user/{a}/u/{v}{tail}", f"/u/{a}/user/{v}{tail}", f"/user/{a}/user/{v}{tail}",
        f"//user/{v}{tail}", f"/user//{v}{tail}", f"/user/{v}/{tail}",
        f"/user/{a}/../{v}{tail}", f"/user/{v}/../{a}{tail}",
        f"/user/{a}%2F..%2F{v}{tail}", f"/user/{a}%2f..%2f{v}{tail}",
        f"/user/{v}{tail.replace('/', '%2F')}", f"/user/{a}/./{v}{tail}",
        f"/user/{a}/%2E%2E/{v}{tail}", f"/user/{v}%00{tail}", f"/user/{a};{v}{tail}",
        f"/user/{v}/api/v3/../v3/{tail.rsplit('/', 1)[-1]}",
        f"/user/{a}?/user/{v}{tail}",
    ]
    for target in targets:
        for credential in (attacker.master_token, "default_public"):
            status, body = raw_request(victim, "GET", target,
                                       {"Authorization": f"Bearer {credential}"})
            if status == 200 and body.startswith(b"{") and b'"result"' in body:
                result = orjson.loads(body)["result"]
                users = {e.get("user", {}).get("username") for e in result}
                # the victim's default public key is public: it sees itself, nothing more
                assert v not in users or (credential == "default_public" and all(
                    e.get("name") == "Default public" for e in result)), (target, body)
            assert status < 500, (target, status, body)
            if "victim-secret-key-name" not in tail:  # an error may echo the asked name
                assert b"victim-secret-key-name" not in body, (target, body)


def test_nested_or_encoded_prefixes_on_the_sql_fast_path_never_reach_the_victims_database(
    victim_and_attacker: tuple[Account, Account],
) -> None:
    """The SQL API is answered before the router (its own path pattern): the same odd
    paths either 404 or run in the database the path's first user names, with that user's
    key; never in the victim's database with the attacker's key."""
    victim, attacker = victim_and_attacker
    v, a = victim.username, attacker.username
    tail = "/api/v2/sql?q=SELECT%20current_database()%20AS%20d"
    targets = [f"/user/{a}/u/{v}{tail}", f"/u/{a}/user/{v}{tail}", f"//user/{v}{tail}",
               f"/user/{a}/../{v}{tail}", f"/user/{a}%2F..%2F{v}{tail}",
               f"/user/{v}%2Fapi%2Fv2%2Fsql?q=SELECT%201", f"/user/{a}/./{v}{tail}",
               f"/user/{a}{tail}", "/api/v2/sql?q=SELECT%20current_database()%20AS%20d"]
    for target in targets:
        for host in (f"{v}.localhost", f"{a}.localhost"):
            status, body = raw_request(victim, "GET", target, {
                "Authorization": f"Bearer {attacker.master_token}", "Host": host})
            assert status < 500, (target, host, status, body)
            if status == 200:
                assert orjson.loads(body)["rows"] == [{"d": attacker.user.database}], (
                    target, host, body)
            if target == f"/user/{a}{tail}":  # the control: the attacker's own path
                assert status == 200, body


def test_no_key_but_the_victims_master_reads_its_log(
    victim_and_attacker: tuple[Account, Account], make_key: MakeKey,
) -> None:
    victim, _ = victim_and_attacker
    schema_maker = make_key(victim, "maker", apis_only("sql"))
    path = audit_path(victim.username)
    for headers in ({"Authorization": f"Bearer {schema_maker.token}"},
                    {"Authorization": "Bearer default_public"},
                    {"Authorization": "Basic " + base64.b64encode(
                        f"{victim.username}:{schema_maker.token}".encode()).decode()},
                    {"Authorization": "Token " + victim.master_token},  # an unknown scheme
                    {"Authorization": "Bearer " + victim.master_token.lower()},
                    {"Authorization": "Bearer " + victim.master_token + " "},
                    {}):
        status, body = raw_request(victim, "GET", path, headers)
        if headers.get("Authorization", "").strip() == f"Bearer {victim.master_token}":
            continue  # trailing spaces are stripped: the master itself
        assert (status, body) == (401, b""), (headers, status, body)
    # a present Authorization header never falls through to a query api_key
    status, _ = raw_request(victim, "GET", path + f"?api_key={victim.master_token}",
                            {"Authorization": f"Bearer {schema_maker.token}"})
    assert status == 401


# -- the filters ---------------------------------------------------------------------------

ODD_QUERIES = [
    "name=" + "%E2%82%AC" * 255,  # 255 three-byte characters: a name a key may have
    "name=" + "%E2%82%AC" * 256, "name=" + "a" * 60_000, "name=%FF%FE", "name=%00",
    "name=%27%20OR%201%3D1%20--", "name=%25", "name=_", "name=Master%00", "name=%0A",
    "name=%F0%9F%97%BA", "name=\\", "name=Master&name=", "name=&name=Master",
    "type=key.created&type=key.exploded", "type=key.exploded&type=key.created",
    "type=key.created,,,key.deleted", "type=" + ",".join(["key.created"] * 4_000),
    "type=KEY.CREATED", "type=key.created%00", "type=%20", "type[]=key.created",
    "page=1000000000&per_page=1000", "page=1000000001", "page=-1", "page=1e3", "page=0x10",
    "page=%EF%BC%91",  # a full-width digit one
    "page=99999999999999999999999", "per_page=0", "per_page=1000", "per_page=%201",
    "page=1&page=2&per_page=1&per_page=2", "order=name", "api_key=&x=%00",
    "name=" + "%C3%A9" * 128,
]


def test_odd_filter_values_answer_200_or_a_400_never_a_500(
    victim_and_attacker: tuple[Account, Account],
) -> None:
    victim, _ = victim_and_attacker
    for query in ODD_QUERIES:
        _check_odd_query(victim, query)


def _check_odd_query(victim: Account, query: str) -> None:
    status, body = raw_request(victim, "GET", f"{audit_path(victim.username)}?{query}",
                               {"Authorization": f"Bearer {victim.master_token}"})
    assert status in (200, 400), (query[:80], status, body[:300])
    document = orjson.loads(body)
    if status == 400:
        assert document["errors"].startswith("Wrong '"), document
    else:
        wildcards = ("%25", "_", "%27")
        if query.startswith("name=") and any(query == f"name={w}" or w in query[5:8]
                                             for w in wildcards):
            assert document["total"] == 0  # compared with =, never LIKE or pasted
        assert victim.master_token.encode() not in body


def test_a_name_filter_over_100k_rows_of_one_user_stays_fast(
    victim_and_attacker: tuple[Account, Account], admin_url: str, http: httpx.Client,
) -> None:
    """The table is indexed by (user_id, id) only: a name filter and a deep page scan one
    user's rows. 100,000 rows for the victim (written as the superuser, as grantkey would):
    a filtered count, a deep page and another user's read each answer within a second."""
    victim, attacker = victim_and_attacker
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.audit_log (user_id, username, event, actor_key, actor_type,"
            " client, key_name, detail) SELECT %s, %s, 'key.created', 'Master', 'master',"
            " '127.0.0.1', 'k' || i, '{}' FROM generate_series(1, 100000) AS i",
            [victim.user.id, victim.username])
        conn.execute("ANALYZE public.audit_log")
    url = victim.base_url + audit_path(victim.username)
    for params in ({"name": "k99999"}, {"name": "nobody", "type": "key.deleted"},
                   {"page": "99", "per_page": "1000"}, {"page": "1000000000", "per_page": "1000"},
                   {}):
        started = time.monotonic()
        answer = http.get(url, params={**params, **victim.master()})
        took = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        assert took < 1.0, (params, took)
    started = time.monotonic()
    other = http.get(attacker.base_url + audit_path(attacker.username), params=attacker.master())
    assert other.status_code == 200 and other.json()["total"] == 1
    assert time.monotonic() - started < 1.0


# -- what the log records ------------------------------------------------------------------

def test_the_log_records_no_token_password_or_authorization_header(
    account: Account, http: httpx.Client, admin_url: str, box: SecretBox, services: Services,
) -> None:
    basic = "Basic " + base64.b64encode(
        f"{account.username}:{account.master_token}".encode()).decode()
    made = http.post(account.keys_url, headers={"Authorization": basic},
                     json={"name": "app", "grants": apis_only("sql")})
    assert made.status_code == 201, made.text
    first = made.json()["token"]
    again = http.post(f"{account.keys_url}/app/token/regenerate",
                      headers={"Authorization": f"Bearer {account.master_token}"})
    second = again.json()["token"]
    master = http.post(f"{account.keys_url}/Master/token/regenerate", params=account.master())
    new_master = master.json()["token"]
    assert http.delete(f"{account.keys_url}/app",
                       params={"api_key": new_master}).status_code == 204
    secrets = [account.master_token, new_master, first, second, basic.split()[1]]
    secrets += [box.role_password(account.user.owner_role, t)
                for t in (account.master_token, new_master)]
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        text = conn.execute("SELECT pg_catalog.string_agg(t::text, ' ') FROM public.audit_log t"
                            " WHERE user_id = %s", [account.user.id]).fetchone()
    assert text is not None and text[0]
    dumped = text[0]
    assert "app" in dumped and "key.deleted" in dumped and "key.regenerated" in dumped
    for secret in secrets:
        assert secret not in dumped
        assert secret.lower() not in dumped.lower()
    for token in (account.master_token, new_master, first, second):
        assert digest(token).hex() not in dumped  # not even the digest
    listed = http.get(account.base_url + audit_path(account.username),
                      params={"api_key": new_master, "per_page": "1000"})
    for secret in secrets:
        assert secret not in listed.text


# -- the events' NOTIFY ----------------------------------------------------------------------

def test_a_tenants_forged_notify_on_its_own_database_ends_no_session_of_another_tenant(
    victim_and_attacker: tuple[Account, Account], make_key: MakeKey, http: httpx.Client,
    admin_url: str,
) -> None:
    """The events' NOTIFY travels on the metadata database, where no key can connect: the
    same channel name in a tenant's own database reaches no grantkey listener, so a forged
    revocation or user deletion ends nothing and forgets nothing."""
    victim, attacker = victim_and_attacker
    kept = make_key(victim, "kept", apis_only("sql"))
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        row = conn.execute("SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %s",
                           [kept.role]).fetchone()
    assert row is not None
    oid = int(row[0])
    session = kept.connect()
    try:
        forged = [f"{victim.user.id}:{'00' * 32}:{victim.user.database}:{kept.role}:{oid}",
                  f"user-deleted:{victim.username}"]
        for message in forged:
            answer = attacker.sql(http, "SELECT pg_catalog.pg_notify('grantkey_keys', "
                                  f"'{message}')", attacker.master_token)
            assert answer.status_code == 200, answer.text
            answer = attacker.sql(http, f"NOTIFY grantkey_keys, '{message}'",
                                  attacker.master_token)
            assert answer.status_code == 200, answer.text
        time.sleep(1.0)
        assert session.execute("SELECT 1").fetchone() == (1,)  # not terminated
        assert victim.sql(http, "SELECT 1 AS one", kept.token).status_code == 200
    finally:
        session.close()
    # a key role cannot LISTEN where the events are announced: it cannot connect there
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(kept.conninfo.replace(f"dbname={victim.user.database}",
                                              "dbname=grantkey"))


def test_a_tenant_listening_on_the_channel_in_its_own_database_hears_no_revocation(
    victim_and_attacker: tuple[Account, Account], make_key: MakeKey, http: httpx.Client,
) -> None:
    """The payload names user ids, databases, roles and token digests: no tenant hears it."""
    victim, attacker = victim_and_attacker
    spy = make_key(attacker, "spy", apis_only("sql"))
    doomed = make_key(victim, "doomed", apis_only("sql"))
    with spy.connect() as conn:
        conn.execute("LISTEN grantkey_keys")
        assert http.delete(f"{victim.keys_url}/doomed",
                           params=victim.master()).status_code == 204
        heard = list(conn.notifies(timeout=1.0, stop_after=1))
    assert heard == []
    del doomed


# -- who the log says acted ------------------------------------------------------------------

@pytest.mark.parametrize("forged", ["cli", "cli, 10.0.0.1, cli", "operator@example.com"])
def test_a_client_cannot_pass_its_change_for_the_command_lines_in_the_log(
    account: Account, http: httpx.Client, admin_url: str, forged: str,
) -> None:
    """uvicorn believes X-Forwarded-For from 127.0.0.1 (its default trusted proxy; any local
    client, or a proxy that passes the client's header on) and takes its rightmost
    untrusted entry as the client's address, whatever it is: the log must record an HTTP
    change with an address, never as `cli` (what the command line records), nor as free
    text."""
    answer = http.post(account.keys_url, params=account.master(),
                       headers={"X-Forwarded-For": forged},
                       json={"name": "forged", "grants": apis_only("sql")})
    assert answer.status_code == 201, answer.text
    row = audit_rows(admin_url, account.username)[-1]
    assert row["event"] == "key.created" and row["key_name"] == "forged"
    assert row["client"] != "cli"
    assert row["client"] not in forged.split(", ")


# -- an audit row that could not be written ----------------------------------------------------

def test_names_at_their_longest_in_four_byte_characters_are_audited_and_revoked(
    account: Account, http: httpx.Client, admin_url: str, owner_sql: OwnerSql,
) -> None:
    """The longest key name (255 characters of 4 bytes) and a 63-byte table name: every
    change writes its row, and the deletion and regeneration still revoke."""
    name = "\U0001f5fa" * 255
    made = http.post(account.keys_url, params=account.master(),
                     json={"name": name, "grants": apis_only("sql")})
    assert made.status_code == 201, made.text
    old = made.json()["token"]
    path = f"{account.keys_url}/{name}"
    again = http.post(f"{path}/token/regenerate", params=account.master())
    assert again.status_code == 200, again.text
    assert account.sql(http, "SELECT 1", old).status_code == 401
    new = again.json()["token"]
    assert http.delete(path, params=account.master()).status_code == 204
    assert account.sql(http, "SELECT 1", new).status_code == 401
    table = "\U0001f5fa" * 15 + "abc"  # 63 bytes
    owner_sql(account, f'CREATE TABLE "{table}" (x int)')
    changed = http.patch(f"{account.base_url}/user/{account.username}/api/v4/datasets/{table}",
                         params=account.master(), json={"privacy": "public"})
    assert changed.status_code == 200, changed.text
    rows = audit_rows(admin_url, account.username)
    assert [(r["event"], r["key_name"]) for r in rows[-4:]] == [
        ("key.created", name), ("key.regenerated", name), ("key.deleted", name),
        ("dataset.privacy_changed", None)]
    assert rows[-1]["detail"]["table"] == table


def test_every_name_a_key_may_have_can_be_filtered_on(
    account: Account, http: httpx.Client,
) -> None:
    """Names may hold space separators inside (U+00A0, U+3000, U+2003): the filter must
    find their events, not refuse the name as a bad parameter."""
    for name in ("map\u00a0app", "地图\u3000app", "wide\u2003space"):
        made = http.post(account.keys_url, params=account.master(),
                         json={"name": name, "grants": apis_only("sql")})
        assert made.status_code == 201, made.text
        found = http.get(account.base_url + audit_path(account.username),
                         params={**account.master(), "name": name})
        assert found.status_code == 200, (name, found.text)
        assert [(e["type"], e["key"]) for e in found.json()["result"]] == [
            ("key.created", {"name": name})]


def test_a_new_user_with_a_deleted_users_name_reads_none_of_its_history(
    services: Services, run: Callable[[Any], Any], http: httpx.Client, account: Account,
) -> None:
    """A user's rows outlive it (no foreign key) and keep its username: the log is read by
    user id, so whoever takes the name next sees only its own events."""
    username = f"{account.username}-reused"
    first = run(services.users.create(username))
    try:
        master = run(services.keys.master_principal(first.user))
        run(services.keys.create(master, "old-secret-app", apis_only("sql")))
    finally:
        run(services.users.delete(username))
    second = run(services.users.create(username))
    try:
        answer = http.get(f"{account.base_url}{audit_path(username)}",
                          params={"api_key": second.master_token})
        assert answer.status_code == 200, answer.text
        assert [e["type"] for e in answer.json()["result"]] == ["user.created"]
        assert "old-secret-app" not in answer.text
        old = http.get(f"{account.base_url}{audit_path(username)}",
                       params={"api_key": first.master_token})
        assert old.status_code == 401
    finally:
        run(services.users.delete(username))
