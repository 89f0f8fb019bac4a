"""Writers for SQL API answers: JSON, CSV, GeoJSON, each streamed in chunks of bytes."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from grantkey.domain.sql_types import csv_text, field_description, json_converter, json_default
from grantkey.services.sql import GEOJSON_COLUMN, RunningQuery

CHUNK_ROWS = 500
GEOMETRY_COLUMNS = frozenset({"the_geom", "the_geom_webmercator", GEOJSON_COLUMN})
MEDIA_TYPES = {
    "json": "application/json; charset=utf-8",
    "geojson": "application/json; charset=utf-8",
    "csv": "text/csv; charset=utf-8; header=present",
}
EXTENSIONS = {"json": "json", "geojson": "geojson", "csv": "csv"}


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=json_default,
                        option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


class Projection:
    """Which columns are answered (skipfields removed) and how each value is converted."""

    def __init__(self, running: RunningQuery, skip: set[str]) -> None:
        self.running = running
        self.indexes = [i for i, c in enumerate(running.columns) if c.name not in skip]
        self.names = [running.columns[i].name for i in self.indexes]
        converters = [json_converter(running.type_name(running.columns[i])) for i in self.indexes]
        self.converters: list[Callable[[Any], Any] | None] = converters
        # every column, each value as it is: a row is just its names zipped with its values
        self.plain = (len(self.indexes) == len(running.columns)
                      and all(convert is None for convert in converters))

    def fields(self) -> dict[str, Any]:
        running = self.running
        return {running.columns[i].name: field_description(
            running.type_name(running.columns[i]), running.columns[i].type_modifier)
            for i in self.indexes}

    def records(self, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        if self.plain:
            names = self.names
            return [dict(zip(names, row, strict=True)) for row in rows]
        return [self.record(row) for row in rows]

    def record(self, row: tuple[Any, ...]) -> dict[str, Any]:
        record = {}
        for name, index, convert in zip(self.names, self.indexes, self.converters, strict=True):
            value = row[index]
            record[name] = convert(value) if convert is not None else value
        return record


async def json_chunks(running: RunningQuery, skip: set[str]) -> AsyncIterator[bytes]:
    """`{"rows":[...],"time":...,"fields":...,"total_rows":...}`, CHUNK_ROWS rows a chunk,
    each chunk's rows serialised by one orjson call."""
    projection = Projection(running, skip)
    head = b'{"rows":['
    separator = b""
    batch: list[tuple[Any, ...]] = []
    async for row in running.rows():
        batch.append(row)
        if len(batch) >= CHUNK_ROWS:
            yield head + separator + _dumps(projection.records(batch))[1:-1]
            head, separator, batch = b"", b",", []
    rows = separator + _dumps(projection.records(batch))[1:-1] if batch else b""
    tail = {"time": running.elapsed, "fields": projection.fields(),
            "total_rows": running.total_rows}
    yield head + rows + b"]," + _dumps(tail)[1:]


async def csv_chunks(running: RunningQuery, skip: set[str]) -> AsyncIterator[bytes]:
    projection = Projection(running, skip)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(projection.names)
    count = 0
    async for row in running.rows():
        writer.writerow([csv_text(row[i]) for i in projection.indexes])
        count += 1
        if count % CHUNK_ROWS == 0:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode("utf-8")


async def geojson_chunks(running: RunningQuery, skip: set[str]) -> AsyncIterator[bytes]:
    projection = Projection(running, skip | GEOMETRY_COLUMNS)
    names = [c.name for c in running.columns]
    geometry_index = names.index(GEOJSON_COLUMN) if GEOJSON_COLUMN in names else None
    parts: list[bytes] = [b'{"type":"FeatureCollection","features":[']
    first = True
    async for row in running.rows():
        geometry = row[geometry_index] if geometry_index is not None else None
        feature = (b'{"type":"Feature","geometry":' + (geometry.encode() if geometry else b"null")
                   + b',"properties":' + _dumps(projection.record(row)) + b"}")
        parts.append(feature if first else b"," + feature)
        first = False
        if len(parts) >= CHUNK_ROWS:
            yield b"".join(parts)
            parts = []
    parts.append(b"]}")
    yield b"".join(parts)


WRITERS = {"json": json_chunks, "csv": csv_chunks, "geojson": geojson_chunks}
