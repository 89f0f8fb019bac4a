"""The JSON documents CARTO's clients read, built in one place (the Auth API and the CLI's
`--json` output show the same): a key, with its grants rebuilt from live PostgreSQL state;
an audit log entry (grantkey's own)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from grantkey.domain.audit import AuditEntry
from grantkey.domain.keys import KeyRecord, KeyType, LiveGrants
from grantkey.services.keys import KeyView
from grantkey.services.usage import KeyUsage

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S +0000"


def key_document(view: KeyView) -> dict[str, Any]:
    record = view.record
    return {
        "name": record.name,
        "user": {"username": view.user.username},
        "type": record.type.value,
        "token": view.token,
        "grants": grants_document(record, view.grants),
        "created_at": timestamp(record.created_at),
        "updated_at": timestamp(record.updated_at),
        **lifetime_document(record, datetime.now(UTC)),
    }


def lifetime_document(record: KeyRecord, now: datetime) -> dict[str, Any]:
    """grantkey's additions to CARTO's key object (`carto-compat.md` §4 allows them)."""
    return {
        "expires_at": optional_timestamp(record.expires_at),
        "expired": record.expired(now),
        "limits": {} if record.sql_timeout is None else {
            "sql_timeout_seconds": _number(record.sql_timeout)},
        "rate_limit": None if record.rate_limit is None else record.rate_limit.document(),
        "restrictions": (None if record.restrictions is None
                         else record.restrictions.document()),
        "last_used_at": optional_timestamp(record.last_used_at),
        "token_rotated_at": optional_timestamp(record.token_rotated_at),
        "old_token_stops_at": (optional_timestamp(_earliest(record.grace_until,
                                                            record.expires_at))
                               if record.in_grace(now) else None),
    }


def optional_timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else timestamp(moment)


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def grants_document(record: KeyRecord, live: LiveGrants) -> list[dict[str, Any]]:
    """CARTO's grants array, rebuilt from live PostgreSQL state, in CARTO's order."""
    database: dict[str, Any] = {"type": "database", "tables": [], "schemas": []}
    if record.type is KeyType.REGULAR:
        database["tables"] = live.tables
        database["schemas"] = live.schemas
    if record.table_metadata:
        database["table_metadata"] = []
    sections: list[dict[str, Any]] = [{"type": "apis", "apis": list(record.apis)}, database]
    if record.services:
        sections.append({"type": "dataservices", "services": list(record.services)})
    return sections


def audit_document(entry: AuditEntry) -> dict[str, Any]:
    """One audit log entry: what happened (`type`, `key`, `detail`), who did it (`actor`:
    the key by name and type, null for the operator, and the client's address or `cli`),
    to which user, and when."""
    actor_key = (None if entry.actor_key is None
                 else {"name": entry.actor_key, "type": entry.actor_type})
    return {
        "id": entry.id,
        "type": entry.event,
        "created_at": timestamp(entry.at),
        "user": {"username": entry.username},
        "actor": {"key": actor_key, "client": entry.client},
        "key": None if entry.key_name is None else {"name": entry.key_name},
        "detail": entry.detail,
    }


def _number(value: float) -> float | int:
    return int(value) if value.is_integer() else value


def usage_document(usage: KeyUsage) -> dict[str, Any]:
    """A key's usage: requests per day (UTC) and API, days without any left out; totals;
    when the key was last used (coarse: within a minute or two)."""
    totals: dict[str, int] = {}
    for apis in usage.days.values():
        for api, requests in apis.items():
            totals[api] = totals.get(api, 0) + requests
    return {"name": usage.record.name, "user": {"username": usage.user.username},
            "since": usage.since.isoformat(),
            "last_used_at": optional_timestamp(usage.record.last_used_at),
            "days": [{"date": day.isoformat(), "requests": dict(sorted(apis.items()))}
                     for day, apis in usage.days.items()],
            "total": dict(sorted(totals.items()))}


def _earliest(first: datetime | None, second: datetime | None) -> datetime | None:
    """Both tokens stop at the key's expiry, whatever the grace."""
    moments = [m for m in (first, second) if m is not None]
    return min(moments) if moments else None
