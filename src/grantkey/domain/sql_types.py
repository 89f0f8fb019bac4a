"""How PostgreSQL types appear in SQL API answers: `fields` and JSON values (CARTO's rules)."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

NUMBER_TYPES = frozenset({"int2", "int4", "int8", "float4", "float8", "numeric", "oid", "money"})
STRING_TYPES = frozenset({"text", "varchar", "bpchar", "char", "name", "citext"})
DATE_TYPES = frozenset({"date", "time", "timetz", "timestamp", "timestamptz"})
GEOMETRY_TYPES = frozenset({"geometry", "geography"})
POSTGIS_WKB_TYPES = ["Unknown", "Point", "LineString", "Polygon", "MultiPoint",
                     "MultiLineString", "MultiPolygon", "GeometryCollection"]


def generic_type(pgtype: str) -> str:
    """number | string | boolean | date | geometry, `[]` for arrays, else the type's name."""
    if pgtype.startswith("_"):
        return generic_type(pgtype[1:]) + "[]"
    if pgtype in NUMBER_TYPES:
        return "number"
    if pgtype in STRING_TYPES:
        return "string"
    if pgtype == "bool":
        return "boolean"
    if pgtype in DATE_TYPES:
        return "date"
    if pgtype in GEOMETRY_TYPES:
        return "geometry"
    return pgtype


def field_description(pgtype: str, type_modifier: int) -> dict[str, Any]:
    kind = generic_type(pgtype)
    if kind != "geometry":
        return {"type": kind, "pgtype": pgtype}
    description: dict[str, Any] = {"type": "geometry", "wkbtype": "Unknown", "dims": 2,
                                   "srid": 0, "pgtype": pgtype}
    if type_modifier > 0:  # PostGIS typmod: srid << 8 | type << 2 | hasz << 1 | hasm
        shape = (type_modifier & 0xFC) >> 2
        description["wkbtype"] = POSTGIS_WKB_TYPES[shape] if shape < 8 else "Unknown"
        description["dims"] = 2 + ((type_modifier & 0x02) >> 1) + (type_modifier & 0x01)
        description["srid"] = (type_modifier & 0x0FFFFF00) >> 8
    return description


def _float_value(value: Any) -> Any:
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _numeric_value(value: Any) -> Any:
    if value is None:
        return None
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "Infinity" if value > 0 else "-Infinity"
    return int(value) if value == value.to_integral_value() and abs(value) < 2**53 else float(value)


def json_converter(pgtype: str) -> Callable[[Any], Any] | None:
    """A per-value conversion for this type, or None when the value serialises as it is."""
    if pgtype in ("float4", "float8"):
        return _float_value
    if pgtype == "numeric":
        return _numeric_value
    if pgtype in ("_float4", "_float8", "_numeric"):
        inner = _float_value if pgtype != "_numeric" else _numeric_value
        return lambda values: None if values is None else [inner(v) for v in values]
    return None


def json_default(value: Any) -> Any:
    """orjson's fallback for types it does not know."""
    if isinstance(value, Decimal):
        return _numeric_value(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return str(value)


def csv_text(value: Any) -> str:
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return str(value)
