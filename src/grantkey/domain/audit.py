"""An audit log entry as it is read back: who, of which user, did what, when."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    username: str
    event: str  # one of services.events.EventType
    actor_key: str | None  # the key that made the change (None: the operator, on the CLI)
    actor_type: str | None
    client: str  # the client's address, or `cli`
    key_name: str | None  # the key the event is about, if any
    detail: dict[str, Any]
