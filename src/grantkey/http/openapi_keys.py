"""The Auth API's schemas in the OpenAPI document: a key, its grants, a new key's request
and a regeneration's (`openapi.py` puts them in the document)."""

from __future__ import annotations

from typing import Any

from grantkey.domain.grants import (
    API_NAMES,
    SCHEMA_PERMISSIONS,
    SECTION_TYPES,
    SERVICES,
    TABLE_PERMISSIONS,
)
from grantkey.domain.key_options import LIMIT_NAMES
from grantkey.domain.keys import KEY_TYPES

TIMESTAMP = {"type": "string", "pattern": r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000$"}
OPTIONAL_TIMESTAMP = {"oneOf": [{"type": "null"}, TIMESTAMP]}
RATE_LIMIT = {"type": "object", "required": ["requests", "per"], "properties": {
    "requests": {"type": "integer", "minimum": 1}, "per": {"type": "number", "exclusiveMinimum": 0},
    "burst": {"type": "integer", "minimum": 0}}}
RESTRICTIONS = {"type": "object", "additionalProperties": False, "properties": {
    "ips": {"type": "array", "items": {"type": "string"}, "maxItems": 100,
            "description": "Client addresses or CIDR networks."},
    "origins": {"type": "array", "items": {"type": "string"}, "maxItems": 100,
                "description": "Web page origins: scheme://host[:port], host may start `*.`."}}}
DURATION = {"type": "string", "pattern": "^[0-9]{1,7}[smhd]$"}
LIMITS = {"type": "object", "additionalProperties": False,
          "properties": {name: {"type": "number", "exclusiveMinimum": 0} for name in LIMIT_NAMES}}

KEY_SCHEMAS: dict[str, Any] = {
    "ApiKey": {
        "type": "object",
        "required": ["name", "user", "type", "token", "grants", "created_at", "updated_at",
                     "expires_at", "expired", "limits", "rate_limit", "restrictions",
                     "last_used_at", "token_rotated_at",
                     "old_token_stops_at"],
        "properties": {
            "name": {"type": "string"},
            "user": {"type": "object", "required": ["username"],
                     "properties": {"username": {"type": "string"}}},
            "type": {"enum": list(KEY_TYPES)},
            "token": {"type": ["string", "null"]},
            "grants": {"type": "array", "items": {"type": "object", "required": ["type"]}},
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
            "expires_at": {**OPTIONAL_TIMESTAMP, "description": "When the key stops working."},
            "expired": {"type": "boolean"},
            "limits": LIMITS,
            "rate_limit": {"oneOf": [{"type": "null"}, RATE_LIMIT]},
            "restrictions": {"oneOf": [{"type": "null"}, RESTRICTIONS]},
            "last_used_at": {**OPTIONAL_TIMESTAMP, "description": "Coarse: within minutes."},
            "token_rotated_at": {**OPTIONAL_TIMESTAMP,
                                 "description": "The token's last regeneration."},
            "old_token_stops_at": {**OPTIONAL_TIMESTAMP,
                                   "description": "During a regeneration's grace, when the "
                                                  "old token stops working."},
            "_links": {"type": "object", "properties": {"self": {"type": "string"}}},
        },
    },
    "Grants": {
        "type": "array",
        "description": "Sections: exactly one `apis`, at most one `database` and `dataservices`.",
        "items": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": list(SECTION_TYPES)},
            "apis": {"type": "array", "items": {"enum": list(API_NAMES)}},
            "tables": {"type": "array", "items": {
                "type": "object", "required": ["schema", "name", "permissions"],
                "properties": {"schema": {"type": "string"}, "name": {"type": "string"},
                               "permissions": {"type": "array", "items": {
                                   "enum": list(TABLE_PERMISSIONS)}},
                               "owner": {"type": "boolean"}}}},
            "schemas": {"type": "array", "items": {
                "type": "object", "required": ["name", "permissions"],
                "properties": {"name": {"type": "string"},
                               "permissions": {"type": "array",
                                               "items": {"enum": list(SCHEMA_PERMISSIONS)}}}}},
            "table_metadata": {"type": "array"},
            "services": {"type": "array", "items": {
                "enum": list(SERVICES)}},
        }},
    },
    "NewKey": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "grants": {"$ref": "#/components/schemas/Grants"},
                       "api_key": {"type": "string"},
                       "expires_at": {"type": "string", "format": "date-time",
                                      "description": "ISO 8601 with its offset, in the future."},
                       "limits": LIMITS, "rate_limit": RATE_LIMIT,
                       "restrictions": RESTRICTIONS},
    },
    "KeyUsage": {
        "type": "object", "required": ["name", "user", "since", "last_used_at", "days", "total"],
        "properties": {
            "name": {"type": "string"}, "user": {"type": "object"},
            "since": {"type": "string", "format": "date"},
            "last_used_at": OPTIONAL_TIMESTAMP,
            "days": {"type": "array", "items": {
                "type": "object", "required": ["date", "requests"],
                "properties": {"date": {"type": "string", "format": "date"},
                               "requests": {"type": "object",
                                            "additionalProperties": {"type": "integer"}}}}},
            "total": {"type": "object", "additionalProperties": {"type": "integer"}}}},
    "Regeneration": {
        "type": "object",
        "properties": {"grace_seconds": {"type": "integer", "minimum": 0,
                                         "description": "How long the old token keeps working."},
                       "token": {"type": "string",
                                 "description": "The key's current token, where the server "
                                                "does not keep tokens."},
                       "api_key": {"type": "string"}},
    },
}
