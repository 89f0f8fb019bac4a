"""The client's SQL wrapped, never edited: as a subquery with its geometry as GeoJSON
text, or with a page's LIMIT and OFFSET (composed with psycopg.sql; numbers and names
quoted, the client's text kept as it is). It runs as the key's own role, so wrapping gives
it no power it did not have."""

from __future__ import annotations

from psycopg import sql


def wrap(query: str, *, geojson: tuple[int, str] | None = None,
         page: tuple[int, int] | None = None) -> str:
    """`geojson`: (decimal places, name of the added column); `page`: (limit, offset).
    The client's text ends on a line of its own: a `--` comment at its end must not swallow
    the closing parenthesis."""
    composed: sql.Composable = sql.SQL(query)
    if geojson is not None:
        digits, column = geojson
        composed = sql.SQL("SELECT *, ST_AsGeoJSON(the_geom, {}) AS {} FROM ({}\n) AS cdbq").format(
            sql.Literal(digits), sql.Identifier(column), composed)
    if page is not None:
        limit, offset = page
        composed = sql.SQL("SELECT * FROM ({}\n) AS cdbq LIMIT {} OFFSET {}").format(
            composed, sql.Literal(limit), sql.Literal(offset))
    return composed.as_string(None)
