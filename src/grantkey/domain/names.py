"""Usernames, key names, and the names of everything grantkey creates in PostgreSQL.

Databases and roles are named from random ids, never from anything a user typed.
"""

from __future__ import annotations

import re
import secrets

from grantkey.errors import InvalidUsername

USERNAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
NAME_PREFIX = "gk_"
# A user's database and any of its roles, by their names (the group: the user id).
USER_DATABASE = re.compile(r"gk_([0-9a-f]{16})")
USER_ROLE = re.compile(r"gk_([0-9a-f]{16})_.*")
# PostgreSQL regular expressions (installed in SQL): key roles and privilege roles.
KEY_ROLE_PATTERN = r"^gk_[0-9a-f]{16}_(k[0-9a-f]+|public)$"
PRIVILEGE_ROLE_PATTERN = r"^gk_[0-9a-f]+_[tnq][0-9]"


def check_username(username: str) -> str:
    if not USERNAME_PATTERN.fullmatch(username):
        raise InvalidUsername(
            f"invalid username {username[:80]!r}: use 1-63 lowercase letters, digits "
            "and '-', starting with a letter or digit"
        )
    return username


def new_id() -> str:
    return secrets.token_hex(8)


def database_name(user_id: str) -> str:
    return f"{NAME_PREFIX}{user_id}"


def owner_role(user_id: str) -> str:
    return f"{NAME_PREFIX}{user_id}_owner"


def public_role(user_id: str) -> str:
    return f"{NAME_PREFIX}{user_id}_public"


def reader_role(user_id: str) -> str:
    """NOLOGIN: SELECT on the user's public and link tables. The default public key's role
    and every key role are its members; keys are not members of the public login role, so
    they cannot watch or signal its sessions."""
    return f"{NAME_PREFIX}{user_id}_reader"


def maker_role(user_id: str) -> str:
    """NOLOGIN, CREATEROLE: creates the user's key roles when the admin is not a superuser
    (see `db.managers`)."""
    return f"{NAME_PREFIX}{user_id}_maker"


def granter_role(user_id: str) -> str:
    """NOLOGIN, CREATEROLE: creates the user's privilege roles and grants them (and the
    reader role) to key roles when the admin is not a superuser (see `db.managers`)."""
    return f"{NAME_PREFIX}{user_id}_granter"


def user_id_of_database(database: str) -> str:
    return database.removeprefix(NAME_PREFIX)


def key_role(user_id: str, key_id: str) -> str:
    return f"{NAME_PREFIX}{user_id}_k{key_id}"


def user_role_prefix(user_id: str) -> str:
    """Every role of one user, built-in, key and privilege roles alike, starts with this."""
    return f"{NAME_PREFIX}{user_id}_"


TABLE_PRIVILEGE_LETTERS = {"select": "s", "insert": "i", "update": "u", "delete": "d"}
SCHEMA_PRIVILEGE_LETTERS = {"usage": "u", "create": "c"}


def table_privilege_role(user_id: str, table_oid: int, privilege: str) -> str:
    """Named from the table's OID so a re-created table never hands rows to old keys."""
    return f"{NAME_PREFIX}{user_id}_t{table_oid}_{TABLE_PRIVILEGE_LETTERS[privilege]}"


def schema_privilege_role(user_id: str, schema_oid: int, privilege: str) -> str:
    return f"{NAME_PREFIX}{user_id}_n{schema_oid}_{SCHEMA_PRIVILEGE_LETTERS[privilege]}"


def sequence_privilege_role(user_id: str, sequence_oid: int) -> str:
    return f"{NAME_PREFIX}{user_id}_q{sequence_oid}"


def privilege_role_prefixes(user_id: str) -> tuple[str, str, str]:
    base = user_role_prefix(user_id)
    return base + "t", base + "n", base + "q"
