"""Why PostgreSQL refused a key's statement, said in the key's terms ("why denied"): what
the key holds on the object PostgreSQL's message names, and what it lacks. Computed from the
key's live privileges, never from the SQL; about no object the message does not name."""

from __future__ import annotations

import re

_DENIED = re.compile(r"permission denied for (table|view|materialized view|sequence|"
                     r"foreign table|schema) (.{1,128})")
_ALL = {"schema": ("usage", "create"), "relation": ("select", "insert", "update", "delete")}

Held = tuple[str, str | None, list[str]]  # schema, relation (None: the schema), privileges


def denied_object(message: str) -> tuple[str, str] | None:
    """("schema" or "relation", its name) named by a permission-denied message."""
    found = _DENIED.fullmatch(message)
    if found is None:
        return None
    return ("schema" if found.group(1) == "schema" else "relation"), found.group(2)


def denial_hint(key_name: str, kind: str, held: list[Held]) -> str | None:
    """`key "k" may select public.t but not insert, update or delete; …`, per object found."""
    parts = []
    for schema, relation, privileges in held:
        target = f"schema {schema}" if relation is None else f"{schema}.{relation}"
        missing = [p for p in _ALL[kind] if p not in privileges]
        if privileges:
            parts.append(f"may {_words(privileges)} {target} but not {_words(missing, 'or')}")
        else:
            parts.append(f"has no permission on {target}")
    if not parts:
        return None
    return (f'key "{key_name[:100]}" ' + "; ".join(parts) + ". Keys are immutable: create a key "
            "with the permission the statement needs")


def _words(items: list[str] | tuple[str, ...], last: str = "and") -> str:
    items = list(items)
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"
