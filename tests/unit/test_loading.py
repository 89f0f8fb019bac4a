"""What `grantkey data load` makes of a file: columns, guessed types, GeoJSON as CSV rows."""

from __future__ import annotations

import pytest

from grantkey.domain import loading
from grantkey.errors import BadInput


@pytest.mark.parametrize(("geometry", "text"), [
    ({"type": "Point", "coordinates": [1, 2.5]}, "POINT(1.0 2.5)"),
    ({"type": "Point", "coordinates": [1, 2, 3]}, "POINT(1.0 2.0 3.0)"),
    ({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}, "MULTIPOINT(1.0 2.0,3.0 4.0)"),
    ({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "LINESTRING(0.0 0.0,1.0 1.0)"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]},
     "POLYGON((0.0 0.0,1.0 0.0,0.0 0.0))"),
    ({"type": "MultiPolygon", "coordinates": [[[[0, 0], [1, 0], [0, 0]]]]},
     "MULTIPOLYGON(((0.0 0.0,1.0 0.0,0.0 0.0)))"),
    ({"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[2, 2], [3, 3]]]},
     "MULTILINESTRING((0.0 0.0,1.0 1.0),(2.0 2.0,3.0 3.0))"),
    ({"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [0, 1]}]},
     "GEOMETRYCOLLECTION(POINT(0.0 1.0))"),
    ({"type": "LineString", "coordinates": []}, "LINESTRING EMPTY"),
    ({"type": "GeometryCollection", "geometries": []}, "GEOMETRYCOLLECTION EMPTY"),
])
def test_geojson_geometries_become_wkt(geometry: object, text: str) -> None:
    assert loading.wkt(geometry) == text


@pytest.mark.parametrize("geometry", [
    {"type": "Point", "coordinates": [1]}, {"type": "Point", "coordinates": [1, "2"]},
    {"type": "Point", "coordinates": [1, True]}, {"type": "Point", "coordinates": [1, float("nan")]},
    {"type": "Circle", "coordinates": [1, 2]}, {"type": "Polygon", "coordinates": [1, 2]},
    {"coordinates": [1, 2]}, [1, 2], {"type": "GeometryCollection"},
])
def test_bad_geojson_geometries_are_refused_naming_the_problem(geometry: object) -> None:
    with pytest.raises(BadInput):
        loading.wkt(geometry)


def test_csv_types_are_guessed_from_the_values_and_nulls_say_nothing() -> None:
    names = ["a", "b", "c", "d", "e", "f"]
    rows = [["1", "1.5", "true", "x", "", "1"], ["-2", "3", "F", "2", "", "1e5"],
            ["99999999999999999999", "", "t", "", "", ".5"]]
    assert loading.csv_types(names, rows) == [
        ("a", "double precision"), ("b", "double precision"), ("c", "boolean"), ("d", "text"),
        ("e", "text"), ("f", "double precision")]


def test_feature_columns_put_the_geometry_first_and_merge_kinds() -> None:
    features = [{"type": "Feature", "properties": {"n": 1, "x": 1, "o": {"a": 1}, "s": "t"}},
                {"type": "Feature", "properties": {"n": 2.5, "x": "one", "o": None}}]
    assert loading.feature_columns(features) == [
        ("the_geom", "geometry(Geometry, 4326)"), ("n", "double precision"), ("x", "text"),
        ("o", "jsonb"), ("s", "text")]


def test_feature_rows_quote_text_and_leave_nulls_unquoted() -> None:
    feature = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
               "properties": {"s": 'say "hi",\nthere', "n": None, "b": False, "j": [1, "a"]}}
    [row] = loading.feature_rows([feature], ["the_geom", "s", "n", "b", "j", "missing"])
    assert row == (b'"SRID=4326;POINT(1.0 2.0)","say ""hi"",\nthere",,false,'
                   b'"[1,""a""]",\n')


@pytest.mark.parametrize(("header", "message"), [
    ("a,,b", "empty"), ("a,b,a", "names a column twice: a"), ("x" * 64, "longer than 63")])
def test_a_bad_csv_header_is_refused_naming_the_problem(header: str, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        loading.csv_header(header)


def test_only_feature_collections_and_features_are_loaded() -> None:
    with pytest.raises(BadInput, match="FeatureCollection or a Feature"):
        loading.features_of({"type": "Point", "coordinates": [0, 0]})
    with pytest.raises(BadInput, match="feature 2 is not a Feature"):
        loading.features_of({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}}, {"type": "Point"}]})
    assert loading.features_of({"type": "Feature", "properties": None}) == [
        {"type": "Feature", "properties": None}]
