"""Key types, key records and the principal a request resolves to."""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from grantkey.domain.rate_limits import Rate
from grantkey.domain.restrictions import Restrictions


class KeyType(StrEnum):
    MASTER = "master"
    DEFAULT = "default"
    REGULAR = "regular"


KEY_TYPES = tuple(t.value for t in KeyType)  # in CARTO's order
PRIVACIES = ("public", "link", "private")  # a dataset's, as CARTO names them
TYPE_ORDER = {KeyType.MASTER: 0, KeyType.DEFAULT: 1, KeyType.REGULAR: 2}
MASTER_NAME = "Master"
DEFAULT_NAME = "Default public"
RESERVED_NAMES = frozenset({MASTER_NAME, DEFAULT_NAME})


@dataclass(frozen=True)
class User:
    id: str
    username: str
    database: str
    owner_role: str
    public_role: str
    created_at: datetime
    storage_quota: str = "-1"  # what its database holds (GRANTKEY_STORAGE_QUOTA); -1: none


@dataclass(frozen=True)
class KeyRecord:
    """One row of a user's key table, as stored (the token only in sealed form)."""

    id: str
    name: str
    type: KeyType
    role: str
    token_digest: bytes
    sealed_token: bytes | None
    apis: tuple[str, ...]
    services: tuple[str, ...]
    table_metadata: bool
    created_at: datetime
    updated_at: datetime
    # chosen when the key is made (docs/http-api.md "Key lifetime and limits")
    expires_at: datetime | None = None
    sql_timeout: float | None = None  # seconds; None: the server's limit for its type
    rate_limit: Rate | None = None  # the key's own, on every API
    restrictions: Restrictions | None = None  # client addresses and web origins allowed
    last_used_at: datetime | None = None  # coarse: written once a minute (services/usage.py)
    # the last regeneration, and the old token's grace (`domain/key_options.py`)
    token_rotated_at: datetime | None = None
    grace_digest: bytes | None = None
    grace_until: datetime | None = None
    grace_password: bytes | None = None  # the new role password, sealed under the old token

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def in_grace(self, now: datetime) -> bool:
        return self.grace_until is not None and now < self.grace_until


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: resolved in exactly one place (`http.auth`)."""

    user: User
    key: KeyRecord
    token: str
    # set when `token` is a regenerated key's old token, in its grace: the role's password
    # (the new token's), opened with the old token, and when the old token stops
    password: str | None = None
    token_until: datetime | None = None

    @functools.cached_property
    def stop_time(self) -> float | None:
        """When this token stops working (its key's expiry, or its grace's end), in seconds
        since 1970; worked out once, as every request compares it with `time.time()`."""
        moments = [m.timestamp() for m in (self.key.expires_at, self.token_until)
                   if m is not None]
        return min(moments) if moments else None

    @functools.cached_property
    def rate_bucket(self) -> bytes:
        """The name of the key's rate-limit bucket: `k:<user id>:<key id>` (ids are hex)."""
        return f"k:{self.user.id}:{self.key.id}".encode()

    @property
    def is_master(self) -> bool:
        return self.key.type is KeyType.MASTER

    def allows_api(self, api: str) -> bool:
        return self.is_master or api in self.key.apis

    def api_hint(self, api: str) -> str:
        """Why a request of an API the key has no grant for is refused ("why denied")."""
        has = ", ".join(self.key.apis) or "none"
        return (f'key "{self.key.name[:100]}" has no grant for the {api} API (its APIs: '
                f'{has}); create a key with "{api}" in its apis')


def key_name_messages(name: object) -> list[str]:
    """CARTO's validation messages for a new regular key's name (empty when valid)."""
    if not isinstance(name, str) or not name.strip():
        return ["Name can't be blank"]
    if name in RESERVED_NAMES:
        return ["Name api_key name cannot be Master nor Default public"]
    messages = []
    if len(name) > KEY_NAME_MAX_LENGTH:
        messages.append(f"Name is too long (maximum is {KEY_NAME_MAX_LENGTH} characters)")
    if "/" in name:
        messages.append("Name can't contain '/'")
    if any(_hidden(c) for c in name):
        messages.append("Name can't contain control, format or invisible characters")
    if name != name.strip():
        messages.append("Name can't begin or end with spaces")
    return messages


# Unicode categories that can make a name look like another one: control (Cc), format
# (Cf: U+202E right-to-left override, zero-width joiners and spaces, U+FEFF), surrogate,
# private use and unassigned code points, and line and paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _hidden(char: str) -> bool:
    return unicodedata.category(char) in _HIDDEN_CATEGORIES


KEY_NAME_MAX_LENGTH = 255


@dataclass
class LiveGrants:
    """A regular key's tables and schemas as PostgreSQL shows them now (CARTO's shape)."""

    tables: list[dict[str, Any]] = field(default_factory=list)
    schemas: list[dict[str, Any]] = field(default_factory=list)
