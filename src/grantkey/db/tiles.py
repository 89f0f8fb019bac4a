"""The SQL of the Maps API, composed with psycopg.sql: the layers' SQL is the client's,
wrapped (each on lines of its own), never edited; it runs as the requesting key's role.

A tile is one statement: each drawn layer's `ST_AsMVT` over `ST_TileEnvelope($1, $2, $3)`,
concatenated. With bind parameters a statement is one statement: a layer's SQL cannot
smuggle a second one (PostgreSQL's extended protocol refuses it before anything runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from grantkey.domain.mapconfig import DEFAULT_GEOM_COLUMN, MapLayer

WEB_MERCATOR = 3857
WGS84 = 4326
GEOM = "__grantkey_geom"
EARTH_CIRCUMFERENCE = 40075016.68
GEOMETRY_TYPES = ("geometry", "geography")
HIDDEN = ("the_geom", "the_geom_webmercator")  # never properties, whatever their type
# how a column becomes a tile property: as it is (ST_AsMVT's own types), a double, ISO 8601
# text (to_jsonb's), JSON text (arrays) or its text (json, jsonb and the rest)
NATIVE = {"int2", "int4", "int8", "float4", "float8", "bool", "text", "varchar", "bpchar",
          "name"}
KINDS = {"numeric": "float", "date": "iso", "timestamp": "iso", "timestamptz": "iso",
         "time": "iso", "timetz": "iso"}


def property_kind(type_name: str) -> str:
    if type_name in NATIVE:
        return "plain"
    if type_name.startswith("_"):
        return "json"
    return KINDS.get(type_name, "text")


@dataclass(frozen=True)
class LayerShape:
    """What the creation probe learnt of a layer's result: the SRID of its geometry
    column, every geometry column, and the other columns with how each becomes a
    property."""

    srid: int
    geometry_columns: tuple[str, ...]
    properties: tuple[tuple[str, str], ...] = ()  # (column, kind)


def typmod_srid(type_modifier: int) -> int | None:
    """The SRID a `geometry(Point, 4326)` column declares (PostGIS's type modifier layout);
    None when the column declares none."""
    if type_modifier < 0:
        return None
    srid = ((type_modifier & 0x1FFFFF00) - (type_modifier & 0x10000000)) >> 8
    return srid if srid > 0 else None


def default_srid(geom_column: str) -> int:
    return WEB_MERCATOR if geom_column == DEFAULT_GEOM_COLUMN else WGS84


def _client(query: str) -> sql.Composable:
    return sql.SQL("(\n{}\n) AS cdbq").format(sql.SQL(query))


def columns_probe(layer: MapLayer) -> str:
    """The layer's columns and their types, no row read (`$1` = 0: one statement)."""
    return sql.SQL("SELECT * FROM {} LIMIT $1").format(_client(layer.sql)).as_string(None)


def relations_probe(layer: MapLayer) -> str:
    """The plan of the layer's SQL (as JSON): the relations it reads. Nothing runs."""
    return sql.SQL("EXPLAIN (VERBOSE, FORMAT JSON) SELECT * FROM {} LIMIT $1").format(
        _client(layer.sql)).as_string(None)


def _geometry(layer: MapLayer, shape: LayerShape) -> sql.Composable:
    column = sql.SQL("cdbq.{}").format(sql.Identifier(layer.geom_column))
    geometry: sql.Composable = column if shape.srid == WEB_MERCATOR else sql.SQL(
        "ST_Transform({}, {})").format(column, sql.Literal(WEB_MERCATOR))
    if layer.simplify_extent is not None and layer.simplify_extent < layer.extent:
        tolerance = sql.SQL("{} / pg_catalog.power(2, $1::integer) / {}").format(
            sql.Literal(EARTH_CIRCUMFERENCE), sql.Literal(layer.simplify_extent))
        geometry = sql.SQL("ST_Simplify(ST_RemoveRepeatedPoints({g}, {t}), {t}, true)").format(
            g=geometry, t=tolerance)
    return geometry


def _bbox(layer: MapLayer, shape: LayerShape) -> sql.Composable:
    envelope = sql.SQL("ST_TileEnvelope($1::integer, $2::integer, $3::integer, margin => {})"
                       ).format(sql.Literal(layer.buffer / layer.extent))
    if shape.srid == WEB_MERCATOR:
        return envelope
    return sql.SQL("ST_Transform({}, {})").format(envelope, sql.Literal(shape.srid))


def _property(column: str, kind: str) -> sql.Composable:
    value = sql.SQL("cdbq.{}").format(sql.Identifier(column))
    if kind == "float":
        value = sql.SQL("{}::pg_catalog.float8").format(value)
    elif kind == "iso":
        value = sql.SQL("pg_catalog.to_jsonb({}) OPERATOR(pg_catalog.#>>) '{{}}'::text[]").format(
            value)
    elif kind == "json":
        value = sql.SQL("pg_catalog.to_jsonb({})::text").format(value)
    elif kind == "text":
        value = sql.SQL("{}::text").format(value)
    return sql.SQL("{} AS {}").format(value, sql.Identifier(column))


def _properties(shape: LayerShape) -> sql.Composable:
    """Every other column, typed for ST_AsMVT (which leaves NULLs out): numbers and
    booleans as such, dates as ISO 8601 text, arrays as JSON text, json and the rest as
    their text."""
    return sql.SQL("").join(sql.SQL(",\n{}").format(_property(column, kind))
                            for column, kind in shape.properties)


def _layer_tile(layer: MapLayer, shape: LayerShape) -> sql.Composable:
    return sql.SQL(
        "COALESCE((SELECT ST_AsMVT(t.*, {name}, {extent}, {geom_name}) FROM (\n"
        "SELECT ST_AsMVTGeom({geom}, {envelope}, {extent}, {buffer}, true) AS {geom_id}"
        "{props}\nFROM {client}\nWHERE cdbq.{column} && {bbox}\n"
        ") AS t WHERE t.{geom_id} IS NOT NULL), ''::bytea)"
    ).format(
        name=sql.Literal(layer.name), extent=sql.Literal(layer.extent),
        geom_name=sql.Literal(GEOM), geom=_geometry(layer, shape),
        envelope=sql.SQL("ST_TileEnvelope($1::integer, $2::integer, $3::integer)"),
        buffer=sql.Literal(layer.buffer), geom_id=sql.Identifier(GEOM),
        props=_properties(shape),
        client=_client(layer.sql), column=sql.Identifier(layer.geom_column),
        bbox=_bbox(layer, shape),
    )


def layer_tile(layer: MapLayer, shape: LayerShape) -> str:
    """One layer's part of a tile statement (`join_tile` puts the parts together)."""
    return _layer_tile(layer, shape).as_string(None)


def join_tile(parts: Sequence[str]) -> str:
    """One statement, one `bytea`: the layers' MVT layers in order (`$1, $2, $3` = z, x, y)."""
    return "SELECT " + "\nOPERATOR(pg_catalog.||)\n".join(parts) + " AS mvt"


def tile_query(layers: Sequence[tuple[MapLayer, LayerShape]]) -> str:
    return join_tile([layer_tile(layer, shape) for layer, shape in layers])


PROBE_VIEW = "__grantkey_reads"


def reads_probe(layer_sql: str) -> str:
    """As the master: a temporary view of the layer's SQL, and the relations PostgreSQL
    recorded it depends on (views stay views). The view goes with the session's reset."""
    return sql.SQL(
        "CREATE TEMPORARY VIEW {view} AS SELECT * FROM (\n{client}\n) AS cdbq; "
        "SELECT DISTINCT n.nspname::text AS schema_name, c.relname::text AS relation_name "
        "FROM pg_catalog.pg_depend d "
        "JOIN pg_catalog.pg_rewrite r ON r.oid OPERATOR(pg_catalog.=) d.objid "
        "JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.refobjid "
        "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
        "WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
        "AND r.ev_class OPERATOR(pg_catalog.=) {qualified}::pg_catalog.regclass "
        "AND c.oid OPERATOR(pg_catalog.<>) r.ev_class "
        "AND c.relkind OPERATOR(pg_catalog.=) ANY ('{{r,v,m,p,f}}'::\"char\"[]) "
        # what every role may read already (information_schema) needs no grant
        "AND NOT pg_catalog.has_table_privilege('public', c.oid, 'SELECT')"
    ).format(view=sql.Identifier(PROBE_VIEW), client=sql.SQL(layer_sql),
             qualified=sql.Literal(f"pg_temp.{PROBE_VIEW}")).as_string(None)
