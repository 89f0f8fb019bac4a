"""The OpenAPI document is valid and lists exactly the operations the app serves."""

from __future__ import annotations

import pytest
from starlette.routing import Route

from grantkey.http.app import create_app
from grantkey.http.openapi import DOCUMENT
from grantkey.settings import Settings


def served_operations() -> set[tuple[str, str]]:
    app = create_app(Settings(database_url="dbname=unused", secret="s" * 40))
    operations = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                operations.add((route.path, method.lower()))
    return operations


def documented_operations() -> set[tuple[str, str]]:
    return {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}


def test_routes_and_document_list_the_same_operations() -> None:
    assert served_operations() == documented_operations()


def test_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(DOCUMENT)
    assert DOCUMENT["openapi"] == "3.1.0"


def test_every_operation_documents_its_error_statuses() -> None:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            if path.startswith(("/user", "/u/", "/api")):
                assert {"401", "404", "503"} <= statuses, (path, method)
