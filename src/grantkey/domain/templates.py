"""Named maps (templates, `carto-compat.md` §8): checked with CARTO's messages, and their
placeholders substituted with CARTO's escaping per type."""

from __future__ import annotations

import copy
import hmac
import re
from dataclasses import dataclass
from typing import Any

from grantkey.errors import BadInput, Forbidden

VERSION = "0.0.1"
# ASCII only: no look-alike letters (the Kelvin sign, long s, dotless i) nor other digits
TEMPLATE_NAME = re.compile(r"[a-z0-9][0-9a-z_-]*", re.IGNORECASE | re.ASCII)
PLACEHOLDER_NAME = re.compile(r"[a-z][0-9a-z_]*", re.IGNORECASE | re.ASCII)
PLACEHOLDER = re.compile(r"<%=\s*([A-Za-z][0-9A-Za-z_]*)\s*%>", re.ASCII)
NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?", re.ASCII)
CSS_COLOR = re.compile(r"#[0-9a-fA-F]{3}(?:[0-9a-fA-F]{3})?|[a-zA-Z]{1,40}", re.ASCII)
MAX_VALUE = 10_000  # characters of one parameter's value
MAX_DEPTH = 32  # nesting of a template's layergroup
TYPES = ("sql_literal", "sql_ident", "number", "css_color")
MAX_NAME = 128
MAX_PLACEHOLDERS = 64
MAX_TOKENS = 64
UNAUTHORIZED = "Unauthorized template instantiation"


@dataclass(frozen=True)
class Template:
    name: str
    auth_method: str
    valid_tokens: tuple[str, ...]
    placeholders: dict[str, tuple[str, Any]]  # name -> (type, default)
    layergroup: dict[str, Any]
    document: dict[str, Any]  # as the client sent it (what GET answers)


def is_template_name(name: str) -> bool:
    return len(name) <= MAX_NAME and TEMPLATE_NAME.fullmatch(name) is not None


def _depth(value: object, limit: int = MAX_DEPTH) -> None:
    if limit < 0:
        raise BadInput(f"The template's layergroup is nested too deep (at most {MAX_DEPTH})")
    if isinstance(value, dict):
        for item in value.values():
            _depth(item, limit - 1)
    elif isinstance(value, list):
        for item in value:
            _depth(item, limit - 1)


def _auth(raw: object) -> tuple[str, tuple[str, ...]]:
    if raw is None:
        return "open", ()
    if not isinstance(raw, dict):
        raise BadInput("Invalid 'auth': an object with 'method'")
    method = raw.get("method")
    if method == "open":
        return "open", ()
    if method != "token":
        raise BadInput(f"Unsupported authentication method: {str(method)[:40]}")
    tokens = raw.get("valid_tokens")
    if not isinstance(tokens, list):
        raise BadInput("Invalid 'token' authentication: missing valid_tokens")
    if not tokens:
        raise BadInput("Invalid 'token' authentication: no valid_tokens")
    if len(tokens) > MAX_TOKENS or not all(isinstance(t, str) and t for t in tokens):
        raise BadInput(f"Invalid 'token' authentication: up to {MAX_TOKENS} non-empty strings")
    return "token", tuple(tokens)


def _placeholders(raw: object) -> dict[str, tuple[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_PLACEHOLDERS:
        raise BadInput(f"Invalid placeholders: an object of up to {MAX_PLACEHOLDERS}")
    found = {}
    for name, spec in raw.items():
        if not PLACEHOLDER_NAME.fullmatch(name):
            raise BadInput(f"Invalid characters in placeholder name '{name[:60]}'")
        if not isinstance(spec, dict) or "default" not in spec:
            raise BadInput(f"Missing default for placeholder '{name}'")
        if "type" not in spec:
            raise BadInput(f"Missing type for placeholder '{name}'")
        if spec["type"] not in TYPES:
            raise BadInput(f"Invalid placeholder type '{str(spec['type'])[:40]}'")
        escape(spec["type"], name, spec["default"])  # a default must be a valid value
        found[name] = (str(spec["type"]), spec["default"])
    return found


def parse_template(raw: object) -> Template:
    if not isinstance(raw, dict):
        raise BadInput("The template must be a JSON object")
    version = raw.get("version")
    if version != VERSION:
        raise BadInput(f"Unsupported template version {str(version)[:40]}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadInput("Missing template name")
    if not is_template_name(name):
        raise BadInput(f"Invalid characters in template name '{name[:MAX_NAME]}'")
    layergroup = raw.get("layergroup")
    if (not isinstance(layergroup, dict) or not isinstance(layergroup.get("layers"), list)
            or not layergroup["layers"]):
        raise BadInput("Missing or empty layers array from layergroup config")
    _depth(layergroup)
    method, tokens = _auth(raw.get("auth"))
    # as saved, with CARTO's defaults filled in (the SDK reads every field back)
    document = {"version": VERSION, "name": name,
                "auth": raw.get("auth") or {"method": "open"},
                "placeholders": raw.get("placeholders") or {},
                "layergroup": layergroup, "view": raw.get("view") or {}}
    return Template(name, method, tokens, _placeholders(raw.get("placeholders")),
                    layergroup, document)


def escape(kind: str, name: str, value: object) -> str:
    """A parameter's text as it goes into the layergroup: CARTO's escaping per type."""
    if kind == "number":
        text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else value
        if not isinstance(text, str) or not NUMBER.fullmatch(text):
            raise BadInput(f"Invalid number value for template parameter '{name}': "
                           f"{str(value)[:60]}")
        # a sign could join the text before it (`10-<%= n %>` with -1 makes a comment)
        return f"({text})" if text[0] in "+-" else text
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise BadInput(f"Invalid {kind} value for template parameter '{name}': a string")
    text = str(value)
    if len(text) > MAX_VALUE:
        raise BadInput(f"The value of template parameter '{name}' is too long: at most "
                       f"{MAX_VALUE} characters")
    if kind == "sql_literal":
        return text.replace("'", "''")
    if kind == "sql_ident":
        return text.replace('"', '""')
    if not CSS_COLOR.fullmatch(text):
        raise BadInput(f"Invalid css_color value for template parameter '{name}': {text[:60]}")
    return text


def _substitute(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_substitute(item, values) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, values) for key, item in value.items()}
    return value


def _size(value: Any, values: dict[str, str]) -> int:
    """The characters of the strings of `value` once substituted (computed, not built)."""
    if isinstance(value, str):
        return len(value) + sum(len(values.get(m.group(1), m.group(0))) - len(m.group(0))
                                for m in PLACEHOLDER.finditer(value))
    if isinstance(value, list):
        return sum(_size(item, values) for item in value)
    if isinstance(value, dict):
        return sum(_size(item, values) for item in value.values())
    return 0


def instantiate(template: Template, params: object, *, max_bytes: int) -> dict[str, Any]:
    """The layergroup config with the placeholders replaced (a parameter not given takes its
    default; keys that are not placeholders, like the SDK's `api_key`, are ignored). Its
    size is known before it is built: more than `max_bytes` characters is 400."""
    given = params if isinstance(params, dict) else {}
    values = {name: escape(kind, name, given.get(name, default))
              for name, (kind, default) in template.placeholders.items()}
    if _size(template.layergroup, values) > max_bytes:
        raise BadInput(f"The template's layergroup with these parameters is too large: at "
                       f"most {max_bytes} characters")
    return _substitute(copy.deepcopy(template.layergroup), values)  # type: ignore[no-any-return]


def check_token(template: Template, auth_token: str | None) -> None:
    """Token templates need one of their tokens (compared in constant time)."""
    if template.auth_method != "token":
        return
    if auth_token is None or not any(
            hmac.compare_digest(auth_token.encode(), token.encode())
            for token in template.valid_tokens):
        raise Forbidden(UNAUTHORIZED)
