"""The grants document of a new key: validation with CARTO's exact messages, then a plan.

Validation is pure: whether granted tables and schemas exist is checked later, inside the
key's creation transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft7Validator

API_NAMES = ("sql", "maps", "do")
TABLE_PERMISSIONS = ("insert", "select", "update", "delete")
SCHEMA_PERMISSIONS = ("create",)
SERVICES = ("geocoding", "routing", "isolines", "observatory")
SECTION_TYPES = ("apis", "database", "dataservices")


def _string_list(allowed: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string", "enum": list(allowed)}}


GRANTS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["type"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": list(SECTION_TYPES)},
            "apis": _string_list(API_NAMES),
            "services": _string_list(SERVICES),
            "tables": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["schema", "name", "permissions"],
                    "additionalProperties": False,
                    "properties": {
                        "schema": {"type": "string"},
                        "name": {"type": "string"},
                        "permissions": _string_list(TABLE_PERMISSIONS),
                        "owner": {"type": "boolean"},
                    },
                },
            },
            "schemas": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "permissions"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "permissions": _string_list(SCHEMA_PERMISSIONS),
                    },
                },
            },
            "table_metadata": {"type": "array"},
        },
    },
}
_VALIDATOR = Draft7Validator(GRANTS_SCHEMA)
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


@dataclass(frozen=True)
class TableGrant:
    schema: str
    name: str
    permissions: frozenset[str]


@dataclass(frozen=True)
class GrantsPlan:
    """What a valid grants document asks for, duplicates merged."""

    apis: tuple[str, ...]
    tables: tuple[TableGrant, ...] = ()
    create_schemas: tuple[str, ...] = ()
    table_metadata: bool = False
    services: tuple[str, ...] = ()


def _pointer(path: Any) -> str:
    return "#/" + "/".join(str(part) for part in path)


def _schema_message(error: Any) -> str:
    where = _pointer(error.absolute_path)
    if error.validator == "enum":
        allowed = ", ".join(error.validator_value)
        value = json.dumps(error.instance, ensure_ascii=False)
        return f"The property '{where}' value {value} did not match one of the following values: {allowed}"
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = [key for key in error.instance if key not in known]
        listed = ", ".join(json.dumps(key, ensure_ascii=False) for key in extra)
        return (f"The property '{where}' contains additional properties [{listed}] "
                "outside of the schema when none are allowed")
    if error.validator == "required":
        missing = next(name for name in error.validator_value if name not in error.instance)
        return f"The property '{where}' did not contain a required property of '{missing}'"
    if error.validator == "type":
        actual = _JSON_TYPES.get(type(error.instance), "value")
        expected = error.validator_value
        return f"The property '{where}' of type {actual} did not match the following type: {expected}"
    return f"The property '{where}' is invalid"


def _section_messages(grants: list[Any]) -> list[str]:
    sections = [item for item in grants if isinstance(item, dict)]
    counts = {kind: sum(1 for s in sections if s.get("type") == kind) for kind in SECTION_TYPES}
    messages = []
    if counts["apis"] != 1:
        messages.append("only one apis section is allowed")
    for kind in ("database", "dataservices"):
        if counts[kind] > 1:
            messages.append(f"only one {kind} section is allowed")
    if any(s.get("type") == "apis" and "apis" not in s for s in sections):
        messages.append('apis array is needed for type "apis"')
    return messages


def grants_messages(grants: Any) -> list[str]:
    """Every problem with a grants document, each prefixed the way CARTO prints it."""
    if not isinstance(grants, list):
        return ["Grants grants has to be an array"]
    errors = sorted(_VALIDATOR.iter_errors(grants), key=lambda e: [str(p) for p in e.absolute_path])
    messages = [_schema_message(error) for error in errors]
    messages += _section_messages(grants)
    return ["Grants " + message for message in messages]


def plan_grants(grants: list[dict[str, Any]]) -> GrantsPlan:
    """Turn a document that passed `grants_messages` into a plan, merging duplicates."""
    by_type = {section["type"]: section for section in grants}
    database = by_type.get("database", {})
    merged: dict[tuple[str, str], set[str]] = {}
    for table in database.get("tables", []):
        merged.setdefault((table["schema"], table["name"]), set()).update(table["permissions"])
    tables = tuple(
        TableGrant(schema, name, frozenset(perms))
        for (schema, name), perms in merged.items() if perms
    )
    create_schemas = tuple(dict.fromkeys(
        s["name"] for s in database.get("schemas", []) if "create" in s["permissions"]
    ))
    return GrantsPlan(
        apis=tuple(dict.fromkeys(by_type["apis"]["apis"])),
        tables=tables,
        create_schemas=create_schemas,
        table_metadata="table_metadata" in database,
        services=tuple(dict.fromkeys(by_type.get("dataservices", {}).get("services", []))),
    )
