"""What `grantkey data load` makes of a file before COPY takes it: the columns of a CSV
header or of GeoJSON features, their types when a table is to be created, and GeoJSON
features as CSV rows (geometry as EWKT in SRID 4326). No I/O here.

Types are PostgreSQL's, from a closed list (`TYPES`): a column is `bigint` if every sampled
value is a whole number, `double precision` if every one is a number, `boolean` for
true/false, `jsonb` for GeoJSON objects and arrays, else `text`. Empty CSV fields and
missing or null properties are NULL and say nothing about the type.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from grantkey.errors import BadInput

TYPES = ("bigint", "double precision", "boolean", "jsonb", "text")
GEOMETRY_COLUMN = "the_geom"
GEOMETRY_TYPE = "geometry(Geometry, 4326)"
SAMPLE_ROWS = 1000
_WHOLE = re.compile(r"[+-]?[0-9]{1,18}")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOLEAN = {"true", "false", "t", "f"}


def csv_header(first_line: str, delimiter: str = ",") -> list[str]:
    """The column names of a CSV file's first line: each one present, and no two alike."""
    names = next(csv.reader([first_line], delimiter=delimiter), [])
    return checked_columns([name.strip() for name in names], "the CSV header")


def checked_columns(names: Sequence[str], where: str) -> list[str]:
    if not names:
        raise BadInput(f"{where} names no column")
    for name in names:
        if not name or "\x00" in name or len(name.encode()) > 63:
            raise BadInput(f"{where} has a column name that is empty, holds a NUL or is longer "
                           f"than 63 bytes: {name[:80]!r}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BadInput(f"{where} names a column twice: {', '.join(twice)[:200]}")
    return list(names)


def _text_kind(value: str) -> str:
    if _WHOLE.fullmatch(value):
        return "bigint"
    if _NUMBER.fullmatch(value):
        return "double precision"
    if value.lower() in _BOOLEAN:
        return "boolean"
    return "text"


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint" if abs(value) < 2**63 else "double precision"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, dict | list):
        return "jsonb"
    return "text"


def _merge(kinds: Iterable[str]) -> str:
    found = set(kinds)
    if not found:
        return "text"
    if len(found) == 1:
        return found.pop()
    if found <= {"bigint", "double precision"}:
        return "double precision"
    return "text"


def csv_types(names: Sequence[str], rows: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """(column, type) for each column, from sampled CSV rows (strings; empty: NULL)."""
    kinds: list[list[str]] = [[] for _ in names]
    for row in rows:
        for index, value in enumerate(row[:len(names)]):
            if value != "":
                kinds[index].append(_text_kind(value.strip()))
    return [(name, _merge(found)) for name, found in zip(names, kinds, strict=True)]


def features_of(document: object) -> list[dict[str, Any]]:
    """The features of a GeoJSON FeatureCollection (or one Feature)."""
    if isinstance(document, dict) and document.get("type") == "Feature":
        return [document]
    if (not isinstance(document, dict) or document.get("type") != "FeatureCollection"
            or not isinstance(document.get("features"), list)):
        raise BadInput("a GeoJSON file must hold a FeatureCollection or a Feature")
    features: list[dict[str, Any]] = document["features"]
    for number, feature in enumerate(features, 1):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise BadInput(f"GeoJSON feature {number} is not a Feature")
        if not isinstance(feature.get("properties") or {}, dict):
            raise BadInput(f"GeoJSON feature {number}'s properties are not an object")
    return features


def feature_columns(features: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(column, type) of every property, in order of first appearance; the geometry comes
    first, as `the_geom`."""
    seen: dict[str, list[str]] = {}
    for feature in features:
        for name, value in (feature.get("properties") or {}).items():
            kinds = seen.setdefault(name, [])
            if value is not None and len(kinds) < SAMPLE_ROWS:
                kinds.append(_json_kind(value))
    names = checked_columns([GEOMETRY_COLUMN, *seen], "the GeoJSON properties")
    return [(GEOMETRY_COLUMN, GEOMETRY_TYPE),
            *((name, _merge(seen[name])) for name in names[1:])]


def _position(position: object) -> str:
    if (not isinstance(position, list) or not 2 <= len(position) <= 4
            or not all(isinstance(n, int | float) and not isinstance(n, bool)
                       and math.isfinite(n) for n in position)):
        raise BadInput(f"a GeoJSON position must hold 2 to 4 numbers, not {str(position)[:60]}")
    return " ".join(repr(float(n)) for n in position)


def _list(items: object, depth: int) -> str:
    if not isinstance(items, list):
        raise BadInput("GeoJSON coordinates must be arrays")
    if depth == 0:
        return _position(items)
    return "(" + ",".join(_list(item, depth - 1) for item in items) + ")"


_DEPTHS = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2,
           "MultiPolygon": 3}


def wkt(geometry: object) -> str:
    """A GeoJSON geometry as WKT (EMPTY for an empty one)."""
    if not isinstance(geometry, dict) or not isinstance(geometry.get("type"), str):
        raise BadInput("a GeoJSON geometry must be an object with a type")
    kind = geometry["type"]
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise BadInput("a GeometryCollection needs its geometries")
        body = ",".join(wkt(part) for part in parts)
        return f"GEOMETRYCOLLECTION({body})" if parts else "GEOMETRYCOLLECTION EMPTY"
    if kind not in _DEPTHS:
        raise BadInput(f"unknown GeoJSON geometry type: {kind[:40]}")
    coordinates = geometry.get("coordinates")
    if coordinates == []:
        return f"{kind.upper()} EMPTY"
    text = _list(coordinates, _DEPTHS[kind])
    return f"{kind.upper()}({text})" if kind == "Point" else f"{kind.upper()}{text}"


def _csv_value(value: object) -> str:
    if value is None:
        return ""  # unquoted: NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else f'"{value!r}"'
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return '"' + text.replace('"', '""') + '"'


def feature_rows(features: Iterable[dict[str, Any]], names: Sequence[str]) -> Iterator[bytes]:
    """Each feature as one CSV line (RFC 4180, empty unquoted fields NULL) of `names`: the
    geometry (EWKT, SRID 4326; none: NULL), then the properties."""
    for feature in features:
        geometry = feature.get("geometry")
        values: list[object] = [None if geometry is None else f"SRID=4326;{wkt(geometry)}"]
        properties = feature.get("properties") or {}
        values.extend(properties.get(name) for name in names[1:])
        yield (",".join(_csv_value(v) for v in values) + "\n").encode()
