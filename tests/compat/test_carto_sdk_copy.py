"""The real `carto` SDK's CopySQLClient (1.11.3, unchanged) against a live grantkey server,
with a regular key (carto-compat.md §9, §7): copyfrom in all its forms (gzip, its default,
and plain), copyto in all its forms, long queries (POST with `q` still in the URL), the
statements cartoframes 1.2 sends (hex EWKB geometries, '|' and '__null'), and refusals."""

from __future__ import annotations

import csv
import io
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import apis_only, table_grants

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
carto_auth = pytest.importorskip("carto.auth")
carto_sql = pytest.importorskip("carto.sql")
carto_exceptions = pytest.importorskip("carto.exceptions")
rest_exceptions = pytest.importorskip("pyrestcli.exceptions")  # what get_response_data raises
requests_exceptions = pytest.importorskip("requests.exceptions")

CARTOFRAMES = "cartoframes_1.2.0"  # its APIKeyAuthClient's client_id and user_agent
PG_NULL = "__null"  # cartoframes' NULL marker in both directions
EWKB_SRID_FLAG = 0x20000000
SRID = 4326


def copy_client(account: Account, token: str, **auth: str) -> Any:
    """A CopySQLClient for `token`, as the SDK's documentation builds one."""
    client = carto_auth.APIKeyAuthClient(
        base_url=f"{account.base_url}/user/{account.username}/", api_key=token, **auth)
    return carto_sql.CopySQLClient(client)


def copy_url(account: Account, direction: str) -> str:
    return f"{account.sql_url}/copy{direction}"


def rows_of(account: Account, http: httpx.Client, q: str, token: str) -> list[dict[str, Any]]:
    answer = account.sql(http, q, token)
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["rows"]
    return rows


def in_pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.fixture
def loader(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    """A regular key with SELECT and INSERT on `cities`."""
    owner_sql(account, "CREATE TABLE cities (name text, population int)")
    return make_key(account, "sdk-copy", table_grants([("public", "cities", ["select", "insert"])]))


CITIES_CSV = b"Lima,10\nQuito,3\n"
CITIES_ROWS = [{"name": "Lima", "population": 10}, {"name": "Quito", "population": 3}]
COPY_CITIES_IN = "COPY cities (name, population) FROM STDIN WITH (FORMAT csv)"
CITIES_BY_NAME = "SELECT name, population FROM cities ORDER BY name"


# ---- copyfrom ---------------------------------------------------------------------------

def test_copyfrom_gzips_an_iterable_of_chunks_by_default(account: Account, loader: KeyHandle,
                                                         http: httpx.Client) -> None:
    # compress=True sends `Content-Encoding: gzip` (level 1): only a server that gunzips
    # the body can feed these rows to PostgreSQL
    result = copy_client(account, loader.token).copyfrom(COPY_CITIES_IN, in_pieces(CITIES_CSV, 5))
    assert result["total_rows"] == 2
    assert isinstance(result["time"], float)
    assert rows_of(account, http, CITIES_BY_NAME, loader.token) == CITIES_ROWS


def test_copyfrom_a_large_gzipped_iterable_of_many_chunks(account: Account, loader: KeyHandle,
                                                          http: httpx.Client) -> None:
    lines = (f"city {index},{index}\n".encode() for index in range(20_000))
    result = copy_client(account, loader.token).copyfrom(COPY_CITIES_IN, lines)
    assert result["total_rows"] == 20_000
    totals = rows_of(account, http, "SELECT count(*) AS n, sum(population) AS s,"
                                    " count(DISTINCT name) AS d FROM cities", loader.token)
    assert totals == [{"n": 20_000, "s": sum(range(20_000)), "d": 20_000}]


def test_copyfrom_with_compress_false_sends_the_chunks_as_they_are(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    result = copy_client(account, loader.token).copyfrom(
        COPY_CITIES_IN, in_pieces(CITIES_CSV, 3), compress=False)
    assert result["total_rows"] == 2
    assert isinstance(result["time"], float)
    assert rows_of(account, http, CITIES_BY_NAME, loader.token) == CITIES_ROWS


def test_copyfrom_file_object_reads_the_file_in_chunks(account: Account, loader: KeyHandle,
                                                       http: httpx.Client) -> None:
    # 30,000 rows: the SDK reads the file 8 KiB at a time, so many chunks
    data = b"".join(f"town {index},{index % 97}\n".encode() for index in range(30_000))
    copy = copy_client(account, loader.token)
    assert copy.copyfrom_file_object(COPY_CITIES_IN, io.BytesIO(data))["total_rows"] == 30_000
    assert copy.copyfrom_file_object(COPY_CITIES_IN, io.BytesIO(CITIES_CSV),
                                     compress=False)["total_rows"] == 2
    totals = rows_of(account, http, "SELECT count(*) AS n, sum(population) AS s FROM cities",
                     loader.token)
    assert totals == [{"n": 30_002, "s": sum(index % 97 for index in range(30_000)) + 13}]


def test_copyfrom_file_path_loads_a_csv_with_a_header(account: Account, loader: KeyHandle,
                                                      http: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "cities.csv"
    path.write_bytes(b'name,population\n"Lima, Peru",10\n"Quito ""QT""",3\nCusco,\n')
    copy = copy_client(account, loader.token)
    result = copy.copyfrom_file_path(
        "COPY cities (name, population) FROM STDIN WITH (FORMAT csv, HEADER true)", str(path))
    assert result["total_rows"] == 3
    assert rows_of(account, http, CITIES_BY_NAME, loader.token) == [
        {"name": "Cusco", "population": None}, {"name": "Lima, Peru", "population": 10},
        {"name": 'Quito "QT"', "population": 3}]
    headless = tmp_path / "more.csv"
    headless.write_bytes(b"Arequipa,1\r\nTrujillo,2")  # CRLF, no final newline
    plain = copy.copyfrom_file_path(COPY_CITIES_IN, str(headless), compress=False)
    assert plain["total_rows"] == 2
    assert rows_of(account, http, "SELECT name FROM cities WHERE population < 3 ORDER BY name",
                   loader.token) == [{"name": "Arequipa"}, {"name": "Trujillo"}]


def test_copyfrom_with_a_query_over_64_kib_in_the_url(account: Account, loader: KeyHandle,
                                                      http: httpx.Client) -> None:
    query = f"{COPY_CITIES_IN} -- {'long comment ' * 6_000}"  # 78,000 characters
    assert len(query.encode()) >= 64 * 1024
    result = copy_client(account, loader.token).copyfrom(query, iter([CITIES_CSV]))
    assert result["total_rows"] == 2
    assert rows_of(account, http, CITIES_BY_NAME, loader.token) == CITIES_ROWS


def test_copyfrom_of_nothing_copies_zero_rows(account: Account, loader: KeyHandle,
                                             http: httpx.Client) -> None:
    # carto-compat §9: 200 with total_rows 0 (CARTO's 400 "No rows copied" breaks empty uploads)
    copy = copy_client(account, loader.token)
    assert copy.copyfrom(COPY_CITIES_IN, iter([]))["total_rows"] == 0  # an empty gzip stream
    assert copy.copyfrom(COPY_CITIES_IN, iter([]), compress=False)["total_rows"] == 0
    assert copy.copyfrom_file_object(COPY_CITIES_IN, io.BytesIO(b""))["total_rows"] == 0
    assert rows_of(account, http, "SELECT count(*) AS n FROM cities", loader.token) == [{"n": 0}]


def test_copy_errors_reach_the_sdk_with_their_message(account: Account, loader: KeyHandle) -> None:
    copy = copy_client(account, loader.token)
    with pytest.raises(carto_exceptions.CartoException) as refused:
        copy.copyfrom("SELECT 1", iter([CITIES_CSV]))
    assert isinstance(refused.value.args[0], rest_exceptions.BadRequestException)
    assert refused.value.args[0].args == (["SQL must start with COPY"],)
    with pytest.raises(carto_exceptions.CartoException) as refused:
        copy.copyfrom("COPY cities (nope) FROM STDIN", iter([CITIES_CSV]))
    assert refused.value.args[0].args == (['column "nope" of relation "cities" does not exist'],)
    with pytest.raises(carto_exceptions.CartoException,
                       match=r'^400 Client Error: column "nope" does not exist$'):
        copy.copyto("COPY (SELECT nope FROM cities) TO STDOUT")
    with pytest.raises(carto_exceptions.CartoException,
                       match=r"^400 Client Error: SQL must start with COPY$"):
        copy.copyto("SELECT 1")


# ---- copyto -----------------------------------------------------------------------------

@pytest.fixture
def cities(account: Account, loader: KeyHandle,
           owner_sql: Callable[[Account, str], None]) -> KeyHandle:
    owner_sql(account, "INSERT INTO cities VALUES ('Lima', 10), ('Quito', 3), (NULL, 7)")
    return loader


COPY_CITIES_OUT = ("COPY (SELECT name, population FROM cities ORDER BY population) "
                   "TO STDOUT WITH (FORMAT csv, HEADER true)")
CITIES_OUT = b"name,population\nQuito,3\n,7\nLima,10\n"


def test_copyto_returns_the_streamed_response(account: Account, cities: KeyHandle) -> None:
    response = copy_client(account, cities.token).copyto(COPY_CITIES_OUT)
    assert response.request.method == "GET"
    assert response.status_code == 200
    assert response.content == CITIES_OUT
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Disposition"] == "attachment; filename=carto-sql-copyto.dmp"


def test_copyto_file_path_writes_and_appends(account: Account, cities: KeyHandle,
                                             tmp_path: Path) -> None:
    copy = copy_client(account, cities.token)
    path = tmp_path / "out.csv"
    path.write_bytes(b"old contents\n")
    copy.copyto_file_path(COPY_CITIES_OUT, str(path))
    assert path.read_bytes() == CITIES_OUT
    copy.copyto_file_path(COPY_CITIES_OUT.replace(", HEADER true", ""), str(path), append=True)
    assert path.read_bytes() == CITIES_OUT + b"Quito,3\n,7\nLima,10\n"


def test_copyto_file_object_writes_to_the_file_object(account: Account, cities: KeyHandle) -> None:
    sink = io.BytesIO()
    copy_client(account, cities.token).copyto_file_object(COPY_CITIES_OUT, sink)
    assert sink.getvalue() == CITIES_OUT


def test_copyto_stream_reads_to_the_end(account: Account, cities: KeyHandle) -> None:
    # several of the server's 256 KiB blocks, read through the SDK's 8 KiB ResponseStream
    query = ("COPY (SELECT n, repeat('x', 100) FROM generate_series(1, 20000) AS n) "
             "TO STDOUT WITH (FORMAT csv)")
    stream = copy_client(account, cities.token).copyto_stream(query)
    data = stream.read()
    assert data == b"".join(f"{n},{'x' * 100}\n".encode() for n in range(1, 20_001))
    assert stream.read() == b""


def test_copyto_of_a_query_of_1024_characters_or_more_is_a_post_with_q_in_the_url(
        account: Account, cities: KeyHandle) -> None:
    padding = "é" * 1500  # percent-encoded: 9,000 bytes of URL
    query = (f"COPY (SELECT name, '{padding}' AS padding FROM cities WHERE population = 10) "
             "TO STDOUT WITH (FORMAT csv)")
    assert len(query) >= 1024
    response = copy_client(account, cities.token).copyto(query)
    assert response.request.method == "POST"
    assert "q=COPY" in response.request.url and not response.request.body
    assert response.status_code == 200
    assert response.content == f"Lima,{padding}\n".encode()


def test_copyto_of_a_query_over_64_kib_works_in_the_url(account: Account, cities: KeyHandle,
                                                        tmp_path: Path) -> None:
    literal = "grantkey " * 8_000  # 72,000 characters, every space percent-encoded
    query = (f"COPY (SELECT name, '{literal}' AS padding FROM cities WHERE population = 3) "
             f"TO STDOUT WITH (FORMAT csv) -- {'c' * 1000}")
    assert len(query.encode()) >= 64 * 1024
    copy = copy_client(account, cities.token)
    response = copy.copyto(query)
    assert response.request.method == "POST"
    assert len(response.request.url) > 64 * 1024
    assert response.status_code == 200, response.text[:300]
    assert response.content == f"Quito,{literal}\n".encode()
    path = tmp_path / "long.csv"
    copy.copyto_file_path(query, str(path))
    assert path.read_bytes() == f"Quito,{literal}\n".encode()


def test_copyto_failing_after_its_first_bytes_is_never_a_silent_success(
        account: Account, cities: KeyHandle) -> None:
    # ~1 MB of rows (several of the server's 256 KiB blocks, so the 200 has left) and then
    # a division by zero: the transfer is cut short, and the SDK's readers raise
    query = ("COPY (SELECT n, repeat('x', 1000), 1 / (n - 1000) FROM generate_series(1, 2000) AS n)"
             " TO STDOUT")
    copy = copy_client(account, cities.token)
    response = copy.copyto(query)
    assert response.status_code == 200
    with pytest.raises(requests_exceptions.ChunkedEncodingError):
        _ = response.content
    sink = io.BytesIO()
    with pytest.raises(requests_exceptions.ChunkedEncodingError):
        copy.copyto_file_object(query, sink)
    # what came is rows PostgreSQL made before the error (no error text appended), at least
    # one whole block of them
    before_the_error = b"".join(f"{n}\t{'x' * 1000}\t{-1 if n == 999 else 0}\n".encode()
                                for n in range(1, 1000))
    assert before_the_error.startswith(sink.getvalue())
    assert len(sink.getvalue()) >= 256 * 1024
    with pytest.raises(requests_exceptions.ChunkedEncodingError):
        copy.copyto_stream(query).read()


# ---- cartoframes 1.2's round trip -------------------------------------------------------

def ewkb_point(x: float, y: float) -> bytes:
    return struct.pack("<BII", 1, EWKB_SRID_FLAG | 1, SRID) + struct.pack("<dd", x, y)


def ewkb_polygon(*rings: list[tuple[float, float]]) -> bytes:
    body = struct.pack("<I", len(rings))
    for ring in rings:
        body += struct.pack("<I", len(ring)) + b"".join(struct.pack("<dd", *p) for p in ring)
    return struct.pack("<BII", 1, EWKB_SRID_FLAG | 3, SRID) + body


def cartoframes_field(value: object) -> bytes:
    """cartoframes' encode_row: None as __null, text with '"', '|' or a newline quoted."""
    text = PG_NULL if value is None else str(value)
    if any(special in text for special in ('"', "|", "\n")):
        text = '"{}"'.format(text.replace('"', '""'))
    return text.encode()


PLACES_COLUMNS = ["cartodb_id", "the_geom", "name", "visits", "score", "open"]
PLACES_TABLE = ("(cartodb_id int, the_geom geometry(Geometry,4326), name text, visits int,"
                " score float8, open bool)")
SQUARE = [(0.0, 0.0), (4.0, 0.0), (4.0, 4.0), (0.0, 4.0), (0.0, 0.0)]
HOLE = [(1.0, 1.0), (1.0, 2.0), (2.0, 2.0), (1.0, 1.0)]
# what a GeoDataFrame holds: the geometry is hex EWKB (shapely's, upper case) or None
PLACES: list[list[object]] = [
    [1, ewkb_point(-77.5, -12.25).hex().upper(), "Lima", 10, 3.25, True],
    [2, ewkb_polygon(SQUARE, HOLE).hex().upper(), 'Bar "Sur" | centro', None, -0.5, False],
    [3, None, None, 7, None, None],
    [4, ewkb_point(2.5, 48.75).hex().upper(), "two\nlines, one comma", 0, 0.001, True],
]
PLACES_EWKT = [
    "SRID=4326;POINT(-77.5 -12.25)",
    "SRID=4326;POLYGON((0 0,4 0,4 4,0 4,0 0),(1 1,1 2,2 2,1 1))",
    None,
    "SRID=4326;POINT(2.5 48.75)",
]


def pg_text(value: object) -> str:
    """A value as COPY … TO prints it in csv with NULL '__null'."""
    if value is None:
        return PG_NULL
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


@pytest.fixture
def mapper(account: Account, postgis: None, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    """A regular key with INSERT and SELECT on `places`, nothing on `hidden_places`."""
    owner_sql(account, f"CREATE TABLE places {PLACES_TABLE}; CREATE TABLE hidden_places {PLACES_TABLE}")
    return make_key(account, "cartoframes", table_grants([("public", "places", ["insert", "select"])]))


def cartoframes_copy_from(table: str) -> str:
    """cartoframes 1.2's ContextManager._copy_from statement (its trailing ';' included)."""
    return (f"COPY {table}({','.join(PLACES_COLUMNS)}) FROM stdin WITH (FORMAT csv, DELIMITER '|',"
            f" NULL '{PG_NULL}');")


def cartoframes_rows() -> Iterator[bytes]:
    """cartoframes 1.2's _compute_copy_data: one '|'-joined line per row."""
    for row in PLACES:
        yield b"|".join(cartoframes_field(value) for value in row) + b"\n"


def test_cartoframes_round_trip_keeps_rows_and_geometries_identical(
        account: Account, mapper: KeyHandle, http: httpx.Client) -> None:
    copy = copy_client(account, mapper.token, client_id=CARTOFRAMES, user_agent=CARTOFRAMES)
    result = copy.copyfrom(cartoframes_copy_from("places"), cartoframes_rows())
    assert result["total_rows"] == len(PLACES)

    # read back as cartoframes' copy_to does: the columns from a LIMIT 0 query, then COPY
    # TO stdout streamed (pandas reads the stream; the csv module here)
    source = 'SELECT * FROM "public"."places"'
    sql = carto_sql.SQLClient(copy.client)
    fields = sql.send(f"SELECT * FROM ({source}) _q LIMIT 0")["fields"]
    assert list(fields) == PLACES_COLUMNS
    assert fields["the_geom"]["type"] == "geometry"
    query = f"SELECT {','.join(fields)} FROM ({source}) _q"
    stream = copy.copyto_stream(
        f"COPY ({query}) TO stdout WITH (FORMAT csv, HEADER true, NULL '{PG_NULL}')")
    text = io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8", newline="")
    header, *rows = list(csv.reader(text))
    assert header == PLACES_COLUMNS
    assert sorted(rows, key=lambda row: int(row[0])) == [
        [pg_text(value) for value in row] for row in PLACES]

    ewkt = rows_of(account, http, "SELECT ST_AsEWKT(the_geom) AS g FROM places ORDER BY cartodb_id",
                   mapper.token)
    assert [row["g"] for row in ewkt] == PLACES_EWKT


def test_cartoframes_upload_into_a_table_without_grants_is_refused(
        account: Account, mapper: KeyHandle, http: httpx.Client) -> None:
    copy = copy_client(account, mapper.token, client_id=CARTOFRAMES, user_agent=CARTOFRAMES)
    with pytest.raises(carto_exceptions.CartoException, match=r"^Access denied$") as refused:
        copy.copyfrom(cartoframes_copy_from("hidden_places"), cartoframes_rows())
    # what the SDK surfaces of the 403: pyrestcli's ForbiddenErrorException, whose text is
    # always "Access denied" (it drops the server's message, as against CARTO)
    assert isinstance(refused.value.args[0], rest_exceptions.ForbiddenErrorException)
    # copyto surfaces the server's message
    with pytest.raises(carto_exceptions.CartoException,
                       match=r"^403 Client Error: permission denied for table hidden_places$"):
        copy.copyto("COPY (SELECT * FROM hidden_places) TO stdout WITH (FORMAT csv)")

    answer = http.post(copy_url(account, "from"), content=b"".join(cartoframes_rows()),
                       params={"api_key": mapper.token, "q": cartoframes_copy_from("hidden_places")})
    assert answer.status_code == 403
    assert answer.json() == {"error": ["permission denied for table hidden_places"]}
    assert rows_of(account, http, "SELECT count(*) AS n FROM hidden_places",
                   account.master_token) == [{"n": 0}]


# ---- a key without the sql grant --------------------------------------------------------

def test_copy_with_a_key_without_the_sql_grant_is_forbidden(
        account: Account, loader: KeyHandle, make_key: Callable[..., KeyHandle],
        http: httpx.Client) -> None:
    maps_only = make_key(account, "maps-only", apis_only("maps"))
    copy = copy_client(account, maps_only.token)
    with pytest.raises(carto_exceptions.CartoException, match=r"^Access denied$") as refused:
        copy.copyfrom(COPY_CITIES_IN, iter([CITIES_CSV]))
    assert isinstance(refused.value.args[0], rest_exceptions.ForbiddenErrorException)
    with pytest.raises(carto_exceptions.CartoException, match=r"^Access denied$") as refused:
        copy.copyfrom(COPY_CITIES_IN, iter([CITIES_CSV]), compress=False)
    assert isinstance(refused.value.args[0], rest_exceptions.ForbiddenErrorException)
    with pytest.raises(carto_exceptions.CartoException, match=r"^403 Client Error: forbidden$"):
        copy.copyto("COPY cities TO STDOUT")
    with pytest.raises(carto_exceptions.CartoException, match=r"^403 Client Error: forbidden$"):
        copy.copyto(f"COPY (SELECT '{'x' * 2000}') TO STDOUT")  # the POST form

    upload = http.post(copy_url(account, "from"), content=CITIES_CSV,
                       params={"api_key": maps_only.token, "q": COPY_CITIES_IN})
    download = http.get(copy_url(account, "to"),
                        params={"api_key": maps_only.token, "q": "COPY cities TO STDOUT"})
    posted = http.post(copy_url(account, "to"),
                       params={"api_key": maps_only.token, "q": "COPY cities TO STDOUT"})
    for answer in (upload, download, posted):
        assert answer.status_code == 403
        assert answer.json() == {"error": ["forbidden"], "hint": (
            'key "maps-only" has no grant for the sql API (its APIs: maps); create a key with '
            '"sql" in its apis')}
    assert rows_of(account, http, "SELECT count(*) AS n FROM cities",
                   account.master_token) == [{"n": 0}]
