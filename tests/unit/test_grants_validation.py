"""The grants validator: CARTO's exact messages, and no crash on any input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grantkey.domain.grants import grants_messages, plan_grants
from grantkey.domain.keys import key_name_messages

APIS = {"type": "apis", "apis": ["sql"]}


@pytest.mark.parametrize("grants", [None, "x", {"type": "apis"}, 5])
def test_grants_has_to_be_an_array(grants: Any) -> None:
    assert grants_messages(grants) == ["Grants grants has to be an array"]


@pytest.mark.parametrize("grants", [[], [{"type": "database"}], [APIS, APIS]])
def test_only_one_apis_section_is_allowed(grants: list[Any]) -> None:
    assert "Grants only one apis section is allowed" in grants_messages(grants)


@pytest.mark.parametrize("kind", ["database", "dataservices"])
def test_only_one_database_or_dataservices_section(kind: str) -> None:
    grants = [APIS, {"type": kind}, {"type": kind}]
    assert grants_messages(grants) == [f"Grants only one {kind} section is allowed"]


def test_apis_array_is_needed_for_type_apis() -> None:
    assert grants_messages([{"type": "apis"}]) == ['Grants apis array is needed for type "apis"']


def test_enum_message_names_the_path_value_and_allowed_values() -> None:
    grants = [APIS, {"type": "database", "tables": [
        {"schema": "public", "name": "t", "permissions": ["read"]}]}]
    assert grants_messages(grants) == [
        "Grants The property '#/1/tables/0/permissions/0' value \"read\" did not match one of "
        "the following values: insert, select, update, delete"
    ]


def test_additional_properties_message() -> None:
    assert grants_messages([{"type": "apis", "apis": [], "foo": 1}]) == [
        "Grants The property '#/0' contains additional properties [\"foo\"] outside of the "
        "schema when none are allowed"
    ]


def test_valid_grants_have_no_messages_and_merge_duplicate_tables() -> None:
    grants: list[dict[str, Any]] = [
        {"type": "apis", "apis": ["sql", "maps"]},
        {"type": "database", "tables": [
            {"schema": "public", "name": "t", "permissions": ["select"]},
            {"schema": "public", "name": "t", "permissions": ["insert"], "owner": False},
            {"schema": "public", "name": "empty", "permissions": []},
        ], "schemas": [{"name": "public", "permissions": ["create"]}], "table_metadata": []},
        {"type": "dataservices", "services": ["geocoding"]},
    ]
    assert grants_messages(grants) == []
    plan = plan_grants(grants)
    assert [(t.name, sorted(t.permissions)) for t in plan.tables] == [("t", ["insert", "select"])]
    assert plan.create_schemas == ("public",)
    assert plan.table_metadata and plan.services == ("geocoding",)


@pytest.mark.parametrize(("name", "message"), [
    (None, "Name can't be blank"),
    ("   ", "Name can't be blank"),
    ("Master", "Name api_key name cannot be Master nor Default public"),
    ("Default public", "Name api_key name cannot be Master nor Default public"),
    ("x" * 256, "Name is too long (maximum is 255 characters)"),
    ("a/b", "Name can't contain '/'"),
])
def test_key_name_messages(name: Any, message: str) -> None:
    assert key_name_messages(name) == [message]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "apis", "tables", "schema", "name", "permissions", "x"]),
        inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_validator_never_crashes_and_valid_documents_plan(document: Any) -> None:
    messages = grants_messages(document)
    assert all(message.startswith("Grants ") for message in messages)
    if not messages:
        plan_grants(document)
