"""COPY endpoints (carto-compat.md §9): /api/v2/sql/copyfrom and /api/v2/sql/copyto."""

from __future__ import annotations

import gzip
import http.client
from collections.abc import Callable, Iterator
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import table_grants


def copy_url(account: Account, direction: str) -> str:
    return f"{account.sql_url}/copy{direction}"


def chunks(data: bytes, size: int = 7) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.fixture
def loader(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE cities (name text, population int)")
    return make_key(account, "loader", table_grants([("public", "cities", ["select", "insert"])]))


def test_copyfrom_streams_a_chunked_csv_in_as_the_key(account: Account, loader: KeyHandle,
                                                      http: httpx.Client) -> None:
    answer = http.post(copy_url(account, "from"), content=chunks(b"Lima,10\nQuito,3\n"),
                       params={"api_key": loader.token,
                               "q": "COPY cities (name, population) FROM STDIN WITH (FORMAT csv)"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["total_rows"] == 2
    assert isinstance(answer.json()["time"], float)
    rows = account.sql(http, "SELECT name, population FROM cities ORDER BY name", loader.token)
    assert rows.json()["rows"] == [{"name": "Lima", "population": 10},
                                   {"name": "Quito", "population": 3}]


def test_copyto_streams_the_table_out(account: Account, loader: KeyHandle,
                                      http: httpx.Client) -> None:
    http.post(copy_url(account, "from"), content=gzip.compress(b"Lima,10\n"),
              headers={"Content-Encoding": "gzip"},
              params={"api_key": loader.token, "q": "COPY cities FROM STDIN WITH (FORMAT csv)"})
    answer = http.get(copy_url(account, "to"), params={
        "api_key": loader.token, "q": "COPY cities TO STDOUT WITH (FORMAT csv, HEADER true)"})
    assert answer.status_code == 200, answer.text
    assert answer.content == b"name,population\nLima,10\n"
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"] == "attachment; filename=carto-sql-copyto.dmp"


def copy_from(http: httpx.Client, account: Account, q: str | None, body: object,
              token: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    params = {} if q is None else {"q": q}
    if token is not None:
        params["api_key"] = token
    return http.post(copy_url(account, "from"), params=params, content=body,  # type: ignore[arg-type]
                     headers=headers)


def count(http: httpx.Client, account: Account) -> int:
    answer = account.sql(http, "SELECT count(*) AS n FROM cities", account.master_token)
    return int(answer.json()["rows"][0]["n"])


CSV_IN = "COPY cities (name, population) FROM STDIN WITH (FORMAT csv)"


def test_copyfrom_without_q_is_400_sql_is_missing(account: Account, loader: KeyHandle,
                                                  http: httpx.Client) -> None:
    answer = copy_from(http, account, None, b"Lima,1\n", loader.token)
    assert (answer.status_code, answer.json()) == (400, {"error": ["SQL is missing"]})


@pytest.mark.parametrize("q", ["SELECT 1", " COPY cities FROM STDIN", "COPYcities FROM STDIN",
                               "INSERT INTO cities VALUES ('x', 1)"])
def test_copyfrom_of_something_else_than_copy_is_400_sql_must_start_with_copy(
        account: Account, loader: KeyHandle, http: httpx.Client, q: str) -> None:
    answer = copy_from(http, account, q, b"Lima,1\n", loader.token)
    assert (answer.status_code, answer.json()) == (400, {"error": ["SQL must start with COPY"]})


def test_copyfrom_statement_is_case_insensitive(account: Account, loader: KeyHandle,
                                                http: httpx.Client) -> None:
    answer = copy_from(http, account, "copy cities FROM stdin WITH (FORMAT csv)", b"Lima,1\n",
                       loader.token)
    assert answer.json() == {"time": answer.json()["time"], "total_rows": 1}


def test_copyfrom_of_an_empty_body_is_200_with_zero_rows(account: Account, loader: KeyHandle,
                                                         http: httpx.Client) -> None:
    answer = copy_from(http, account, CSV_IN, b"", loader.token)
    assert answer.status_code == 200, answer.text
    assert answer.json()["total_rows"] == 0


def test_copyfrom_of_a_gzip_body_with_two_members_is_gunzipped(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    body = gzip.compress(b"Lima,10\nQuito,") + gzip.compress(b"3\nCusco,4\n")
    answer = copy_from(http, account, CSV_IN, chunks(body, 5), loader.token,
                       {"Content-Encoding": "gzip"})
    assert answer.json()["total_rows"] == 3, answer.text
    assert count(http, account) == 3


@pytest.mark.parametrize(("body", "reason"), [
    (b"Lima,10\n", "incorrect header check"),
    (gzip.compress(b"Lima,10\nQuito,3\n", mtime=0)[:-9], "unexpected end of file"),
    (gzip.compress(b"Lima,10\n", mtime=0) + b"trailing", "data after the end of the gzip stream"),
], ids=["not-gzip", "truncated", "trailing-garbage"])
def test_copyfrom_of_bad_gzip_is_400_error_while_gunzipping_and_writes_nothing(
        account: Account, loader: KeyHandle, http: httpx.Client, body: bytes,
        reason: str) -> None:
    answer = copy_from(http, account, CSV_IN, body, loader.token, {"Content-Encoding": "gzip"})
    assert answer.status_code == 400
    assert answer.json() == {"error": [f"Error while gunzipping: {reason}"]}
    assert count(http, account) == 0


def test_copyfrom_with_an_unknown_content_encoding_is_400_naming_it(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    answer = copy_from(http, account, CSV_IN, b"Lima,10\n", loader.token,
                       {"Content-Encoding": "br"})
    assert answer.status_code == 400
    assert answer.json() == {"error": ["Unsupported Content-Encoding: br (send gzip or none)"]}


def test_copyfrom_a_bad_row_is_400_naming_it_and_writes_nothing(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    answer = copy_from(http, account, CSV_IN, b"Lima,10\nQuito,many\nCusco,4\n", loader.token)
    assert answer.status_code == 400
    assert 'invalid input syntax for type integer: "many"' in answer.json()["error"][0]
    assert "line 2" in answer.json()["context"]
    assert count(http, account) == 0


def test_copyfrom_into_a_table_without_insert_is_403_before_the_first_byte(
        account: Account, owner_sql: Callable[[Account, str], None],
        make_key: Callable[..., KeyHandle], http: httpx.Client) -> None:
    owner_sql(account, "CREATE TABLE cities (name text, population int)")
    reader = make_key(account, "reader", table_grants([("public", "cities", ["select"])]))
    answer = copy_from(http, account, CSV_IN, b"Lima,10\n", reader.token)
    assert answer.status_code == 403
    assert answer.json() == {"error": ["permission denied for table cities"]}


def test_copyfrom_a_permission_error_after_the_first_byte_is_403_and_writes_nothing(
        account: Account, owner_sql: Callable[[Account, str], None],
        make_key: Callable[..., KeyHandle], http: httpx.Client) -> None:
    """A trigger (SECURITY INVOKER) writes to a table the key may not write: refused at the
    first row, once data has arrived."""
    owner_sql(account, """
        CREATE TABLE cities (name text, population int);
        CREATE TABLE audit_trail (name text);
        CREATE FUNCTION trail() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO public.audit_trail VALUES (NEW.name); RETURN NEW; END$$;
        CREATE TRIGGER trail BEFORE INSERT ON cities FOR EACH ROW EXECUTE FUNCTION trail();""")
    loader = make_key(account, "loader", table_grants([("public", "cities", ["select", "insert"])]))
    answer = copy_from(http, account, CSV_IN, chunks(b"Lima,10\nQuito,3\n"), loader.token)
    assert answer.status_code == 403
    assert answer.json()["error"] == ["permission denied for table audit_trail"]
    assert count(http, account) == 0


NO_SQL = ('key "maps" has no grant for the sql API (its APIs: maps); create a key with "sql" in '
          "its apis")


def test_copyfrom_without_the_sql_grant_is_403_forbidden(
        account: Account, make_key: Callable[..., KeyHandle], http: httpx.Client) -> None:
    maps_only = make_key(account, "maps", [{"type": "apis", "apis": ["maps"]}])
    answer = copy_from(http, account, CSV_IN, b"Lima,10\n", maps_only.token)
    assert (answer.status_code, answer.json()) == (403, {"error": ["forbidden"], "hint": NO_SQL})
    answer = http.get(copy_url(account, "to"), params={
        "api_key": maps_only.token, "q": "COPY (SELECT 1) TO STDOUT"})
    assert (answer.status_code, answer.json()) == (403, {"error": ["forbidden"], "hint": NO_SQL})


def test_copy_with_an_unknown_key_is_401(account: Account, http: httpx.Client) -> None:
    answer = copy_from(http, account, CSV_IN, b"Lima,10\n", "not-a-key")
    assert (answer.status_code, answer.json()) == (401, {"error": ["Unauthorized"]})


def test_copyfrom_without_a_key_is_the_default_public_key(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    answer = copy_from(http, account, CSV_IN, b"Lima,10\n")
    assert answer.status_code == 403
    assert answer.json() == {"error": ["permission denied for table cities"]}


def test_copyfrom_of_a_copy_to_statement_is_400_and_the_session_serves_again(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    answer = copy_from(http, account, "COPY cities TO STDOUT", b"Lima,10\n", loader.token)
    assert answer.status_code == 400
    assert answer.json()["error"][0].startswith("copyfrom runs COPY … FROM STDIN")
    answer = http.get(copy_url(account, "to"), params={
        "api_key": loader.token, "q": "COPY cities FROM STDIN"})
    assert answer.status_code == 400
    assert answer.json()["error"][0].startswith("copyto runs COPY … TO STDOUT")
    for _ in range(3):  # whichever pooled session answers, it is usable
        assert account.sql(http, "SELECT 1 AS one", loader.token).json()["rows"] == [{"one": 1}]


def test_copyfrom_refuses_a_second_statement_before_anything_runs(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    answer = copy_from(http, account, CSV_IN + "; DELETE FROM cities", b"Lima,10\n",
                       loader.token)
    assert answer.status_code == 400
    assert "cannot insert multiple commands into a prepared statement" in answer.text
    assert count(http, account) == 0


def long_url_post(url: str, params: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """A POST whose URL may be longer than httpx takes (64 KiB): the SDK sends such URLs."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        connection.request("POST", f"{parts.path}?{urlencode(params)}", body=body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_copyfrom_and_copyto_take_a_q_longer_than_64_kib_in_the_url(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    comment = " /* " + "x" * 70_000 + " */"
    status, body = long_url_post(copy_url(account, "from"),
                                 {"api_key": loader.token, "q": CSV_IN + comment}, b"Lima,10\n")
    assert status == 200, (status, body[:300])
    assert orjson.loads(body)["total_rows"] == 1
    literal = "y" * 70_000
    status, body = long_url_post(copy_url(account, "to"), {
        "api_key": loader.token, "q": f"COPY (SELECT '{literal}' AS s) TO STDOUT"}, b"")
    assert (status, body) == (200, literal.encode() + b"\n")


def test_copyto_with_q_and_filename_in_a_form_body(account: Account, loader: KeyHandle,
                                                   http: httpx.Client) -> None:
    answer = http.post(copy_url(account, "to"), params={"api_key": loader.token}, data={
        "q": "COPY (SELECT 1 AS a, 'x' AS b) TO STDOUT WITH (FORMAT csv, HEADER true)",
        "filename": "my data é.csv"})
    assert answer.status_code == 200, answer.text
    assert answer.content == b"a,b\n1,x\n"
    assert answer.headers["content-disposition"] == \
        "attachment; filename=my%20data%20%C3%A9.csv"
    assert answer.headers["vary"] == "Authorization"


def test_copyto_an_error_before_the_first_byte_is_a_sql_api_error(
        account: Account, loader: KeyHandle, http: httpx.Client,
        owner_sql: Callable[[Account, str], None]) -> None:
    owner_sql(account, "CREATE TABLE secrets (s text)")
    answer = http.get(copy_url(account, "to"), params={
        "api_key": loader.token, "q": "COPY secrets TO STDOUT"})
    assert (answer.status_code, answer.json()) == (
        403, {"error": ["permission denied for table secrets"]})
    answer = http.get(copy_url(account, "to"), params={
        "api_key": loader.token, "q": "COPY (SELECT 1/0) TO STDOUT"})
    assert (answer.status_code, answer.json()) == (400, {"error": ["division by zero"]})


def test_copyto_an_error_after_the_first_byte_cuts_the_answer_short(
        account: Account, loader: KeyHandle) -> None:
    """Never a complete-looking 200 with an error appended: the transfer ends without its
    last chunk, which every HTTP client reports."""
    q = ("COPY (SELECT CASE WHEN g < 300000 THEN g ELSE 1 / (g - g) END FROM "
         "generate_series(1, 400000) g) TO STDOUT")
    received = b""
    with httpx.Client(timeout=30) as client, client.stream(
            "GET", copy_url(account, "to"), params={"api_key": loader.token, "q": q}) as answer:
        assert answer.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for block in answer.iter_bytes():
                received += block
    assert received.startswith(b"1\n2\n3\n")
    assert b"division by zero" not in received
