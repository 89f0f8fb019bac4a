"""The OpenAPI 3.1 document of every endpoint, served at /openapi.json.

Each operation is listed once, under its canonical path (`routing.CANONICAL_PREFIX`); the
other forms the same route list is served in (`routing.for_every_user`: the other user
prefixes, the host form, a trailing slash) are described once, in the document's info
and its `x-grantkey-aliases`, not repeated. A test compares the document with the routes
the app serves.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from grantkey import __version__
from grantkey.domain.keys import KEY_TYPES, PRIVACIES
from grantkey.http.auth_api import DIRECTIONS, ORDERS
from grantkey.http.errors import json_response
from grantkey.http.openapi_keys import DURATION, KEY_SCHEMAS
from grantkey.http.routing import CANONICAL_PREFIX, HOST_FORM, USER_PREFIXES
from grantkey.services.events import EVENT_TYPES

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page_of(item: str) -> dict[str, Any]:
    """A paginated list (the key list, the audit log, the datasets): one shape."""
    return {"type": "object", "required": ["total", "count", "result", "_links"],
            "properties": {"total": {"type": "integer", "minimum": 0},
                           "count": {"type": "integer", "minimum": 0},
                           "result": {"type": "array", "items": _ref(item)},
                           "_links": _ref("Links")}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _auth_error(description: str) -> dict[str, Any]:
    return _json(_ref("AuthError"), description)


def _data_error(description: str) -> dict[str, Any]:
    return _json(_ref("DataError"), description)


def _maps_error(description: str) -> dict[str, Any]:
    return _json(_ref("MapsError"), description)


EMPTY_401 = {"description": "Failed authentication (CARTO: empty body)."}
JOB_QUERY = ("A string, a list of strings, or {query: [{query, onsuccess?, onerror?, "
             "timeout?}], onsuccess?, onerror?}; answered with each query's status.")
SCHEMAS: dict[str, Any] = {
    "AuthError": {
        "type": "object", "required": ["errors", "errors_cause"],
        "properties": {"errors": {"type": "string"}, "errors_cause": {"type": "null"}},
    },
    "MapsError": {
        "type": "object", "required": ["errors", "errors_with_context"],
        "properties": {
            "errors": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "errors_with_context": {"type": "array", "items": {
                "type": "object", "required": ["type", "message"],
                "properties": {"type": {"enum": ["layer", "limit", "auth", "tile", "unknown"]},
                               "subtype": {"type": "string"}, "message": {"type": "string"},
                               "layer": {"type": "object"}}}}},
    },
    "Layergroup": {
        "type": "object", "required": ["layergroupid", "metadata", "last_updated"],
        "properties": {"layergroupid": {"type": "string", "pattern": "^0[0-9a-f]{39}:[0-9]+$"},
                       "metadata": {"type": "object",
                                    "required": ["layers", "tilejson", "url", "dataviews",
                                                 "analyses"]},
                       "last_updated": {"type": "string", "format": "date-time"}},
    },
    "DataError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                       "hint": {"type": "string"}, "detail": {"type": "string"},
                       "context": {"type": "string"}},
    },
    "Links": {
        "type": "object", "required": ["first", "last"],
        "properties": {rel: {"type": "object", "required": ["href"],
                             "properties": {"href": {"type": "string"}}}
                       for rel in ("first", "last", "prev", "next")},
    },
    "ApiKeyList": _page_of("ApiKey"),
    "AuditEntry": {
        "type": "object",
        "required": ["id", "type", "created_at", "user", "actor", "key", "detail"],
        "properties": {
            "id": {"type": "integer"},
            "type": {"enum": list(EVENT_TYPES)},
            "created_at": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000$"},
            "user": {"type": "object", "required": ["username"],
                     "properties": {"username": {"type": "string"}}},
            "actor": {"type": "object", "required": ["key", "client"], "properties": {
                "key": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["name", "type"],
                    "properties": {"name": {"type": "string"},
                                   "type": {"enum": list(KEY_TYPES)}}}]},
                "client": {"type": "string",
                           "description": "The client's address, or `cli`."}}},
            "key": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}}}]},
            "detail": {"type": "object"},
        },
    },
    "AuditList": _page_of("AuditEntry"),
    **KEY_SCHEMAS,
    "SqlAnswer": {
        "type": "object", "required": ["rows", "time", "fields", "total_rows"],
        "properties": {"rows": {"type": "array", "items": {"type": "object"}},
                       "time": {"type": "number"}, "fields": {"type": "object"},
                       "total_rows": {"type": "integer", "minimum": 0}},
    },
    "CopyResult": {
        "type": "object", "required": ["time", "total_rows"],
        "properties": {"time": {"type": "number"}, "total_rows": {"type": "integer", "minimum": 0}},
    },
    "CopyParameters": {
        "type": "object",
        "properties": {"q": {"type": "string"}, "filename": {"type": "string"},
                       "api_key": {"type": "string"}},
    },
    "Job": {"type": "object", "required": ["job_id", "user", "query", "status", "created_at",
                                           "updated_at"],
            "properties": {"job_id": {"type": "string"}, "user": {"type": "string"},
                           "query": {"description": JOB_QUERY}, "status": {"type": "string"},
                           "failed_reason": {"type": "string"},
                           "fallback_status": {"type": "string"},
                           "created_at": {"type": "string"}, "updated_at": {"type": "string"}}},
    "JobList": {"type": "object", "required": ["total", "count", "result"],
                "properties": {"total": {"type": "integer"}, "count": {"type": "integer"},
                               "result": {"type": "array", "items": _ref("Job")},
                               "_links": {"type": "object"}}},
    "JobRequest": {"type": "object", "required": ["query"], "properties": {
        "api_key": {"type": "string"}, "query": {"description": JOB_QUERY, "anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}},
            {"type": "object", "properties": {"query": {"type": "array"}}}]}}},
    "SqlParameters": {
        "type": "object",
        "properties": {"q": {"type": "string"}, "format": {"type": "string"},
                       "filename": {"type": "string"}, "skipfields": {"type": "string"},
                       "dp": {"type": "integer", "minimum": 0, "maximum": 15},
                       "rows_per_page": {"type": "integer", "minimum": 1},
                       "page": {"type": "integer", "minimum": 0},
                       "api_key": {"type": "string"}, "map_key": {"type": "string"}},
    },
    "Dataset": {
        "type": "object", "required": ["schema", "name", "privacy", "updated_at", "mode"],
        "properties": {"schema": {"type": "string"}, "name": {"type": "string"},
                       "privacy": {"enum": list(PRIVACIES)},
                       "updated_at": {"type": ["string", "null"]},
                       "mode": {"enum": ["r", "rw", None]}},
    },
    "DatasetList": _page_of("Dataset"),
    "PrivacyChange": {
        "type": "object", "required": ["privacy"],
        "properties": {"privacy": {"enum": list(PRIVACIES)},
                       "schema": {"type": "string"}},
    },
    "Health": {
        "type": "object", "required": ["status", "postgres"],
        "properties": {"status": {"type": "string"}, "postgres": {"type": "string"},
                       "postgis": {"type": "boolean",
                                   "description": "Whether user databases can have PostGIS."},
                       "version": {"type": "string"}},
    },
}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


API_KEY = _query("api_key", {"type": "string"}, "The key's token (also Basic or Bearer).")
KEY_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "The key's name, URL-encoded."}
TABLE_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
USERNAME = {"name": "username", "in": "path", "required": True, "schema": {"type": "string"}}
SQL_QUERY_PARAMETERS = [
    _query("q", {"type": "string"}, "The SQL."),
    _query("format", {"type": "string"}, "json (default), csv or geojson; case-insensitive."),
    _query("filename", {"type": "string"}),
    _query("skipfields", {"type": "string"}),
    _query("dp", {"type": "integer", "minimum": 0, "maximum": 15}),
    _query("rows_per_page", {"type": "integer", "minimum": 1}),
    _query("page", {"type": "integer", "minimum": 0}),
    _query("callback", {"type": "string"}, "JSONP: errors are then answered 200."),
    API_KEY,
    _query("map_key", {"type": "string"}),
]
COMMON_AUTH = {"404": _auth_error("Unknown user or key."),
               "503": _auth_error("PostgreSQL is unavailable.")}
SQL_RESPONSES = {
    "200": {"description": "The last statement's result, streamed (or a JSONP wrapper).",
            "content": {JSON: {"schema": {"oneOf": [
                _ref("SqlAnswer"),
                {"type": "object", "required": ["type", "features"],
                 "properties": {"type": {"const": "FeatureCollection"},
                                "features": {"type": "array"}}}]}},
                        "text/csv": {"schema": {"type": "string"}},
                        "text/javascript": {"schema": {"type": "string"}}}},
    "400": _data_error("Bad parameters, or PostgreSQL refused the SQL."),
    "401": _data_error("Unknown token, or the key was revoked."),
    "403": _data_error("No `sql` grant, Basic user mismatch, or permission denied."),
    "404": _data_error("Unknown user."),
    "413": _data_error("Request body too large."),
    "429": _data_error("Time limit reached, no database connection became free, or a rate "
                       "limit (with Retry-After and the Carto-Rate-Limit-* headers)."),
    "503": _data_error("PostgreSQL is unavailable."),
}

COPY_Q = _query("q", {"type": "string"}, "The COPY statement; it must start with `COPY `.")
COPY_ERRORS = {key: value for key, value in SQL_RESPONSES.items() if key != "200"}
COPY_FROM = {
    "summary": "COPY … FROM STDIN as the key's role, fed with the body as it arrives "
               "(gzip with Content-Encoding: gzip); all rows or none.",
    "parameters": [COPY_Q, API_KEY, _query("map_key", {"type": "string"})],
    "requestBody": {"content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}},
    "responses": {"200": _json(_ref("CopyResult"), "Rows written and seconds taken."),
                  **{key: value for key, value in COPY_ERRORS.items() if key != "413"}},
}
COPY_TO_ANSWERS = {
    "200": {"description": "COPY … TO STDOUT's output, streamed (cut short on a later error).",
            "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
            "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}}},
    **COPY_ERRORS}
COPY_TO_PARAMETERS = [COPY_Q, _query("filename", {"type": "string"},
                                     "Download name (default carto-sql-copyto.dmp)."),
                      API_KEY, _query("map_key", {"type": "string"})]
COPY_TO_BODY = {"content": {"application/x-www-form-urlencoded": {"schema": _ref("CopyParameters")},
                            JSON: {"schema": _ref("CopyParameters")}}}


def _copy_operations(version: str) -> list[tuple[str, str, dict[str, Any]]]:
    path = f"/api/{version}/sql"
    return [(f"{path}/copyfrom", "post", COPY_FROM),
            (f"{path}/copyto", "get", {"summary": "COPY … TO STDOUT as the key's role, streamed.",
                                       "parameters": COPY_TO_PARAMETERS,
                                       "responses": COPY_TO_ANSWERS}),
            (f"{path}/copyto", "post", {"summary": "COPY … TO STDOUT (parameters in the body "
                                                   "win).",
                                        "parameters": COPY_TO_PARAMETERS,
                                        "requestBody": COPY_TO_BODY,
                                        "responses": COPY_TO_ANSWERS})]


JOB_ERRORS = {
    "400": _data_error("Invalid query, payload too large, queue full, or a status that does "
                       "not allow it (Cannot set status from done to cancelled)."),
    "401": _data_error("Unknown token, or the key was revoked."),
    "403": _data_error("No `sql` grant, the default public key, or Basic user mismatch."),
    "404": _data_error("Unknown user, or a job that is not the caller's (Job with id … not "
                       "found)."),
    "413": _data_error("Request body too large."),
    "503": _data_error("PostgreSQL is unavailable."),
}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
JOB_BODY = {"required": True, "content": {JSON: {"schema": _ref("JobRequest")}}}


def _job_operations(version: str) -> list[tuple[str, str, dict[str, Any]]]:
    path, item = f"/api/{version}/sql/job", f"/api/{version}/sql/job/{{job_id}}"
    job = {"200": _json(_ref("Job"), "The job."), **JOB_ERRORS}
    paging = [_query("page", {"type": "integer", "minimum": 1}),
              _query("per_page", {"type": "integer", "minimum": 1, "maximum": 1000})]
    return [
        (path, "post", {"summary": "Create a batch job, run as the key's role.",
                        "parameters": [API_KEY], "requestBody": JOB_BODY, "responses": {
                            "201": _json(_ref("Job"), "The new job."), **JOB_ERRORS}}),
        (path, "get", {"summary": "The caller's jobs, newest first (the master: all).",
                       "parameters": [API_KEY, *paging], "responses": {
                           "200": _json(_ref("JobList"), "A page of jobs."), **JOB_ERRORS}}),
        (item, "get", {"summary": "Read a job.", "parameters": [JOB_ID, API_KEY],
                       "responses": job}),
        (item, "delete", {"summary": "Cancel a pending or running job.",
                          "parameters": [JOB_ID, API_KEY], "responses": job}),
        (item, "put", {"summary": "Replace a pending job's query (same form).",
                       "parameters": [JOB_ID, API_KEY], "requestBody": JOB_BODY,
                       "responses": job})]


MAPS_ERRORS = {
    "400": _maps_error("Bad config or tile request, or PostgreSQL refused a layer's SQL."),
    "401": _maps_error("Unknown token, or the key was revoked."),
    "403": _maps_error("No `maps` grant (Forbidden), Basic user mismatch, or permission denied."),
    "404": _maps_error("Unknown user or layergroup, or a relation that does not exist."),
    "413": _maps_error("Request body too large."),
    "429": _maps_error("Time limit reached, no database connection became free, or a rate "
                       "limit (with Retry-After and the Carto-Rate-Limit-* headers)."),
    "503": _maps_error("PostgreSQL is unavailable."),
}
MAP_CREATED = {"200": {"description": "The layergroup (JSONP with `callback`).",
                       "headers": {"X-Layergroup-Id": {"schema": {"type": "string"}}},
                       "content": {JSON: {"schema": _ref("Layergroup")},
                                   "text/javascript": {"schema": {"type": "string"}}}},
               **MAPS_ERRORS}
TILE_ANSWERS = {"200": {"description": "A Mapbox vector tile.",
                        "content": {"application/x-protobuf": {"schema": {"type": "string",
                                                                          "format": "binary"}}}},
                "204": {"description": "An empty tile (no feature): no body."}, **MAPS_ERRORS}
TILE_PARAMETERS = [
    {"name": "lgid", "in": "path", "required": True, "schema": {"type": "string"},
     "description": "The layergroup id (`<hash>:<cache buster>`)."},
    {"name": "z", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "x", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "tile", "in": "path", "required": True, "schema": {"type": "string"},
     "description": "`<y>.mvt`."},
    API_KEY, _query("map_key", {"type": "string"})]

TEMPLATE_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "The template's name."}

# (path, method, operation); every path is served under each user prefix (see ALIASES).
OPERATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("/api/v3/api_keys", "get", {
        "summary": "List keys (E1). Non-master keys see only themselves.",
        "parameters": [API_KEY, _query("page", {"type": "integer", "minimum": 1}),
                       _query("per_page", {"type": "integer", "minimum": 1, "maximum": 1000}),
                       _query("order", {"enum": ORDERS}),
                       _query("order_direction", {"enum": DIRECTIONS}),
                       _query("type", {"type": "string"},
                              "Comma-separated subset of master, default, regular."),
                       _query("unused_for", DURATION, "Only keys unused that long (30d)."),
                       _query("expiring_within", DURATION, "Only keys expiring within it.")],
        "responses": {"200": _json(_ref("ApiKeyList"), "A page of keys."),
                      "400": _auth_error("Wrong list parameter."), "401": EMPTY_401,
                      **COMMON_AUTH}}),
    ("/api/v3/api_keys", "post", {
        "summary": "Create a regular key (E3), master key only.",
        "parameters": [API_KEY],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("NewKey")}}},
        "responses": {"201": _json(_ref("ApiKey"), "The new key, with its token."),
                      "400": _auth_error("The body is not a JSON object."), "401": EMPTY_401,
                      "403": _auth_error("Key quota reached."),
                      "413": _auth_error("Request body too large."),
                      "422": _auth_error("Validation failed: …"), **COMMON_AUTH}}),
    ("/api/v3/api_keys/{name}", "get", {
        "summary": "Show a key (E2). Non-master keys only themselves.",
        "parameters": [KEY_NAME, API_KEY],
        "responses": {"200": _json(_ref("ApiKey"), "The key."), "401": EMPTY_401,
                      **COMMON_AUTH}}),
    ("/api/v3/api_keys/{name}/usage", "get", {
        "summary": "A key's requests per day and API (the master, or the key itself).",
        "parameters": [KEY_NAME, API_KEY, _query("days", {"type": "integer", "minimum": 1,
                                                          "maximum": 366})],
        "responses": {"200": _json(_ref("KeyUsage"), "Its usage."),
                      "400": _auth_error("Wrong days."), "401": EMPTY_401, **COMMON_AUTH}}),
    ("/api/v3/api_keys/{name}", "delete", {
        "summary": "Delete a regular key (E4), master key only.",
        "parameters": [KEY_NAME, API_KEY],
        "responses": {"204": {"description": "Deleted; empty body."}, "401": EMPTY_401,
                      "403": _auth_error("Master and default keys cannot be deleted."),
                      **COMMON_AUTH}}),
    ("/api/v3/api_keys/{name}/token/regenerate", "post", {
        "summary": "Give a key a new token (E5), master key only; optionally with a grace.",
        "parameters": [KEY_NAME, API_KEY],
        "requestBody": {"required": False, "content": {JSON: {"schema": _ref("Regeneration")}}},
        "responses": {"200": _json(_ref("ApiKey"), "The key with its new token."),
                      "400": _auth_error("The body is not valid JSON."),
                      "401": EMPTY_401, "403": _auth_error("The default key's token is fixed."),
                      "422": _auth_error("Validation failed: …"),
                      "413": _auth_error("Request body too large."), **COMMON_AUTH}}),
    ("/api/v3/audit", "get", {
        "summary": "Read the user's audit log, newest first (master key only; read-only).",
        "parameters": [API_KEY, _query("page", {"type": "integer", "minimum": 1}),
                       _query("per_page", {"type": "integer", "minimum": 1, "maximum": 1000}),
                       _query("name", {"type": "string"},
                              "Only the events made by the key of that name or about it."),
                       _query("type", {"type": "string"},
                              "Comma-separated subset of " + ", ".join(EVENT_TYPES) + ".")],
        "responses": {"200": _json(_ref("AuditList"), "A page of events."),
                      "400": _auth_error("Wrong list parameter (the message names it)."),
                      "401": EMPTY_401, **COMMON_AUTH}}),
    ("/api/v2/sql", "get", {"summary": "Run SQL as the key's role.",
                            "parameters": SQL_QUERY_PARAMETERS, "responses": SQL_RESPONSES}),
    ("/api/v2/sql", "post", {
        "summary": "Run SQL as the key's role (parameters in the body win).",
        "parameters": SQL_QUERY_PARAMETERS,
        "requestBody": {"content": {
            "application/x-www-form-urlencoded": {"schema": _ref("SqlParameters")},
            JSON: {"schema": _ref("SqlParameters")}}},
        "responses": SQL_RESPONSES}),
    ("/api/v1/sql", "get", {"summary": "SQL API v1 path: the same as v2.",
                            "parameters": SQL_QUERY_PARAMETERS, "responses": SQL_RESPONSES}),
    ("/api/v1/sql", "post", {
        "summary": "SQL API v1 path: the same as v2.", "parameters": SQL_QUERY_PARAMETERS,
        "requestBody": {"content": {
            "application/x-www-form-urlencoded": {"schema": _ref("SqlParameters")},
            JSON: {"schema": _ref("SqlParameters")}}},
        "responses": SQL_RESPONSES}),
    *_copy_operations("v2"),
    *_copy_operations("v1"),
    *_job_operations("v2"),
    *_job_operations("v1"),
    ("/api/v1/map", "get", {
        "summary": "Make a layergroup from `config` (a MapConfig as JSON), as the key's role.",
        "parameters": [_query("config", {"type": "string"}, "The MapConfig, URL-encoded JSON."),
                       _query("callback", {"type": "string"}, "JSONP: errors answered 200."),
                       API_KEY, _query("map_key", {"type": "string"})],
        "responses": MAP_CREATED}),
    ("/api/v1/map", "post", {
        "summary": "Make a layergroup from the MapConfig in the body, as the key's role.",
        "parameters": [_query("callback", {"type": "string"}, "JSONP: errors answered 200."),
                       API_KEY, _query("map_key", {"type": "string"})],
        "requestBody": {"required": True, "content": {JSON: {"schema": {"type": "object"}}}},
        "responses": MAP_CREATED}),
    ("/api/v1/map/named", "get", {
        "summary": "The template names the key manages (master: all; a maps key: its own).",
        "parameters": [API_KEY],
        "responses": {"200": _json({"type": "object", "required": ["template_ids"]},
                                   "{\"template_ids\": [...]}"), **MAPS_ERRORS}}),
    ("/api/v1/map/named", "post", {
        "summary": "Save a template (master, or a regular key with maps: its publisher).",
        "parameters": [API_KEY],
        "requestBody": {"required": True, "content": {JSON: {"schema": {"type": "object"}}}},
        "responses": {"200": _json({"type": "object", "required": ["template_id"]},
                                   "{\"template_id\": name}"), **MAPS_ERRORS}}),
    ("/api/v1/map/named/{name}", "get", {
        "summary": "A template as saved.", "parameters": [TEMPLATE_NAME, API_KEY],
        "responses": {"200": _json({"type": "object", "required": ["template"]},
                                   "{\"template\": {...}}"), **MAPS_ERRORS}}),
    ("/api/v1/map/named/{name}", "put", {
        "summary": "Replace a template (same name).", "parameters": [TEMPLATE_NAME, API_KEY],
        "requestBody": {"required": True, "content": {JSON: {"schema": {"type": "object"}}}},
        "responses": {"200": _json({"type": "object", "required": ["template_id"]},
                                   "{\"template_id\": name}"), **MAPS_ERRORS}}),
    ("/api/v1/map/named/{name}", "delete", {
        "summary": "Delete a template: its tiles end at once.",
        "parameters": [TEMPLATE_NAME, API_KEY],
        "responses": {"204": {"description": "Deleted; empty body."}, **MAPS_ERRORS}}),
    ("/api/v1/map/named/{name}", "post", {
        "summary": "Instantiate a template (params in the body): a layergroup drawn as its "
                   "publishing key.",
        "parameters": [TEMPLATE_NAME, _query("auth_token", {"type": "string"}), API_KEY],
        "requestBody": {"content": {JSON: {"schema": {"type": "object"}}}},
        "responses": MAP_CREATED}),
    ("/api/v1/map/named/{name}/{z}/{x}/{tile}", "get", {
        "summary": "A tile of a template with its defaults, drawn as its publishing key.",
        "parameters": [TEMPLATE_NAME, *TILE_PARAMETERS[1:4],
                       _query("auth_token", {"type": "string"}), *TILE_PARAMETERS[-2:]],
        "responses": TILE_ANSWERS}),
    ("/api/v1/map/named/{name}/{layers}/{z}/{x}/{tile}", "get", {
        "summary": "A tile of some layers of a template with its defaults.",
        "parameters": [TEMPLATE_NAME, {"name": "layers", "in": "path", "required": True,
                                       "schema": {"type": "string"}}, *TILE_PARAMETERS[1:4],
                       _query("auth_token", {"type": "string"}), *TILE_PARAMETERS[-2:]],
        "responses": TILE_ANSWERS}),
    ("/api/v1/map/{lgid}/preview", "get", {
        "summary": "An HTML page drawing the layergroup with MapLibre GL JS (tile tokens).",
        "parameters": [TILE_PARAMETERS[0], *TILE_PARAMETERS[-2:]],
        "responses": {code: {"description": answer["description"],
                             "content": {"text/html": {"schema": {"type": "string"}}}}
                      for code, answer in {"200": {"description": "The page."},
                                           **MAPS_ERRORS}.items()}}),
    ("/api/v1/map/{lgid}/{z}/{x}/{tile}", "get", {
        "summary": "A vector tile of every layer, drawn as the requesting key's role.",
        "parameters": TILE_PARAMETERS, "responses": TILE_ANSWERS}),
    ("/api/v1/map/{lgid}/{layers}/{z}/{x}/{tile}", "get", {
        "summary": "A vector tile of some layers (`all`, `mapnik`, indexes or ids, commas).",
        "parameters": [*TILE_PARAMETERS[:1],
                       {"name": "layers", "in": "path", "required": True,
                        "schema": {"type": "string"}}, *TILE_PARAMETERS[1:]],
        "responses": TILE_ANSWERS}),
    ("/api/v4/datasets", "get", {
        "summary": "List datasets (master, or keys created with table_metadata).",
        "parameters": [API_KEY, _query("page", {"type": "integer", "minimum": 1}),
                       _query("per_page", {"type": "integer", "minimum": 1, "maximum": 1000})],
        "responses": {"200": _json(_ref("DatasetList"), "A page of datasets."),
                      "400": _auth_error("Wrong list parameter."),
                      "401": _auth_error("No valid key."), "403": _auth_error("Not allowed."),
                      **COMMON_AUTH}}),
    ("/api/v4/datasets/{name}", "patch", {
        "summary": "Change a table's privacy (master key only).",
        "parameters": [TABLE_NAME, API_KEY],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PrivacyChange")}}},
        "responses": {"200": _json(_ref("Dataset"), "The dataset after the change."),
                      "400": _auth_error("Wrong privacy or body."),
                      "401": _auth_error("No valid key."),
                      "403": _auth_error("Not the master key."),
                      "413": _auth_error("Request body too large."), **COMMON_AUTH}}),
]
GLOBAL_OPERATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("/health", "get", {"summary": "Readiness (as /health/ready): 200 once PostgreSQL answers.",
                        "responses": {"200": _json(_ref("Health"), "Healthy."),
                                      "503": _json(_ref("Health"), "PostgreSQL unreachable.")}}),
    ("/health/ready", "get", {
        "summary": "Readiness: 200 when PostgreSQL answers, else 503 with Retry-After.",
        "responses": {"200": _json(_ref("Health"), "Ready."),
                      "503": _json(_ref("Health"), "PostgreSQL unreachable.")}}),
    ("/health/live", "get", {
        "summary": "Liveness: 200 whenever the process answers, whatever PostgreSQL does.",
        "responses": {"200": _json({"type": "object", "required": ["status", "version"],
                                    "properties": {"status": {"const": "live"},
                                                   "version": {"type": "string"}}},
                                   "Alive.")}}),
    ("/openapi.json", "get", {"summary": "This document.",
                              "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")}}),
]


ALIASES_TEXT = (
    "Each operation is listed once, under its canonical path `" + CANONICAL_PREFIX + "/…`. "
    "The same operations answer, unchanged, under every form in `x-grantkey-aliases`: the "
    "prefix `/u/{username}/…`, and no prefix at all (the host form: the user is the first "
    "label of the Host header, `alice.example.com` → `alice`; the only form for the SQL API "
    "when the server is reached by name). A path that does not end in a parameter also "
    "answers with a trailing slash (`/api/v3/api_keys/`).")
ALIASES = {
    "canonical": CANONICAL_PREFIX,
    "prefixes": [*USER_PREFIXES, HOST_FORM],
    "hostForm": "With the prefix \"\", the user is the first label of the Host header.",
    "trailingSlash": "Paths that do not end in a parameter also answer with a trailing /.",
}


def _operation_id(path: str, method: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in path).strip("_")
    return f"{method}_{cleaned}"


def build_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for path, method, operation in OPERATIONS:
        canonical = CANONICAL_PREFIX + path
        paths.setdefault(canonical, {})[method] = dict(
            operation, operationId=_operation_id(canonical, method),
            parameters=[USERNAME, *operation.get("parameters", [])])
    for path, method, operation in GLOBAL_OPERATIONS:
        paths.setdefault(path, {})[method] = dict(operation,
                                                  operationId=_operation_id(path, method))
    return {
        "openapi": "3.1.0",
        "info": {"title": "grantkey", "version": __version__,
                 "description": "CARTO-compatible Auth API v3, SQL API v2 and datasets, "
                                "where every API key is a PostgreSQL role.\n\n"
                                + ALIASES_TEXT},
        "x-grantkey-aliases": ALIASES,
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "basic": {"type": "http", "scheme": "basic"},
            "bearer": {"type": "http", "scheme": "bearer"},
            "api_key": {"type": "apiKey", "in": "query", "name": "api_key"}}},
        "security": [{"basic": []}, {"bearer": []}, {"api_key": []}, {}],
    }


DOCUMENT = build_document()


async def openapi(request: Request) -> Response:
    return json_response(DOCUMENT)
