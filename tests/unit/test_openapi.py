"""The OpenAPI document is valid, lists each operation the app serves once under its
canonical path, and describes the other forms (aliases) it is served in once."""

from __future__ import annotations

from collections import Counter

import pytest

from grantkey.http.app import create_app
from grantkey.http.openapi import DOCUMENT
from grantkey.http.routing import CANONICAL_PREFIX, HOST_FORM, USER_PREFIXES, served_routes
from grantkey.settings import Settings

GLOBAL = ("/health", "/openapi.json")


def served_operations() -> set[tuple[str, str]]:
    app = create_app(Settings(database_url="dbname=unused", secret="s" * 40))
    operations = set()
    for path, route in served_routes(app.routes):
        for method in route.methods or ():
            if method != "HEAD":
                operations.add((path, method.lower()))
    return operations


def documented_operations() -> set[tuple[str, str]]:
    return {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}


def aliases(path: str) -> set[str]:
    """Every form a documented path is served in, from the document's own description."""
    if path.startswith(GLOBAL):
        return {path}
    described = DOCUMENT["x-grantkey-aliases"]
    assert path.startswith(described["canonical"] + "/")
    tail = path[len(described["canonical"]):]
    forms = {prefix + tail for prefix in described["prefixes"]}
    if not tail.endswith("}"):
        forms |= {form + "/" for form in forms}
    return forms


def test_each_operation_is_documented_once_under_its_canonical_path() -> None:
    documented = documented_operations()
    assert all(path.startswith((CANONICAL_PREFIX + "/", *GLOBAL)) for path, _ in documented)
    ids = Counter(operation["operationId"] for item in DOCUMENT["paths"].values()
                  for operation in item.values())
    assert [name for name, count in ids.items() if count > 1] == []
    assert len(ids) == len(documented) == 46


def test_the_app_serves_exactly_the_documented_operations_in_every_described_form() -> None:
    expanded = {(alias, method) for path, method in documented_operations()
                for alias in aliases(path)}
    assert served_operations() == expanded
    assert DOCUMENT["x-grantkey-aliases"]["prefixes"] == [*USER_PREFIXES, HOST_FORM]


def test_the_aliases_are_described_in_the_info() -> None:
    description = DOCUMENT["info"]["description"]
    assert all(f"`{prefix}/…`" in description for prefix in USER_PREFIXES)
    assert "Host header" in description and "trailing slash" in description


def test_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(DOCUMENT)
    assert DOCUMENT["openapi"] == "3.1.0"


def test_every_operation_documents_its_error_statuses() -> None:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            if path.startswith(CANONICAL_PREFIX):
                assert {"401", "404", "503"} <= statuses, (path, method)
