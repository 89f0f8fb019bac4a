"""The one seam every change goes through: typed events, written with the change and
delivered after it.

A use case that changes something builds an event and hands it to `Events.record` inside
the transaction that decides the change, on the metadata database: the audit row is
inserted there, and the event's NOTIFY (for the events other server processes must act
on) is queued there, so both exist if and only if the change commits (PostgreSQL delivers
the NOTIFY at commit). Once that transaction committed, the use case calls
`Events.deliver`: the subscribers of this process run (cache eviction, closing pooled
connections, ending sessions, dropping orphan privilege roles), one after the other. A
subscriber that fails is logged and skipped: it never undoes the change nor stops the
others, nor fails the request (a revocation is decided at its commit; what follows is
cleanup, which every process and the start-up repair do again).

Other processes hear the NOTIFY (`services/notifications.py`) and act as this process's
subscribers do.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from grantkey.db import audit
from grantkey.db.cluster import AdminConnection, Cluster
from grantkey.db.notify import notify
from grantkey.domain.audit import AuditEntry
from grantkey.domain.keys import KeyRecord, KeyType, Principal, User
from grantkey.errors import Unauthorized

log = logging.getLogger("grantkey.events")

CLI = "cli"  # the client address the command line records
CHANNEL = "grantkey_keys"  # where the events other processes act on are announced


class EventType(StrEnum):
    KEY_CREATED = "key.created"
    KEY_DELETED = "key.deleted"
    KEY_REGENERATED = "key.regenerated"
    USER_CREATED = "user.created"
    USER_DELETED = "user.deleted"
    PRIVACY_CHANGED = "dataset.privacy_changed"


EVENT_TYPES = tuple(t.value for t in EventType)


@dataclass(frozen=True)
class Actor:
    """Who made a change: a key (by name and type: never its token) and where the request
    came from (the client's address; `cli` for the command line, which acts as the
    operator, with no key, or as a user's master key)."""

    client: str = CLI
    key_name: str | None = None
    key_type: KeyType | None = None

    @classmethod
    def of(cls, principal: Principal, client: str) -> Actor:
        return cls(client, principal.key.name, principal.key.type)


OPERATOR = Actor()


@dataclass(frozen=True)
class Event:
    """Something that changed for `user`, made by `actor`."""

    type: ClassVar[EventType]
    user: User
    actor: Actor

    @property
    def key_name(self) -> str | None:
        """The key the event is about, if any."""
        return None

    def detail(self) -> dict[str, Any]:
        return {}

    def notification(self) -> str | None:
        """What other server processes are told at commit (None: nothing)."""
        return None


@dataclass(frozen=True)
class KeyEvent(Event):
    key: KeyRecord

    @property
    def key_name(self) -> str | None:
        return self.key.name

    def detail(self) -> dict[str, Any]:
        return {"type": self.key.type.value}


@dataclass(frozen=True)
class KeyCreated(KeyEvent):
    type = EventType.KEY_CREATED
    tables: int = 0
    schemas: int = 0

    def detail(self) -> dict[str, Any]:
        return {"type": self.key.type.value, "apis": list(self.key.apis),
                "tables": self.tables, "schemas": self.schemas,
                "table_metadata": self.key.table_metadata}


@dataclass(frozen=True)
class KeyRevoked(KeyEvent):
    """The key's old token stopped working (`key` is the record as it was, old digest)."""

    role_oid: int = 0

    def notification(self) -> str | None:
        return payload(self.user, self.key, self.role_oid)


@dataclass(frozen=True)
class KeyDeleted(KeyRevoked):
    type = EventType.KEY_DELETED


@dataclass(frozen=True)
class KeyRegenerated(KeyRevoked):
    type = EventType.KEY_REGENERATED


@dataclass(frozen=True)
class KeyRotated(KeyEvent):
    """Regenerated with a grace: the old token keeps working until the grace ends (nothing
    is revoked now); every process forgets what it cached of the old token."""

    type = EventType.KEY_REGENERATED
    grace_seconds: int = 0

    def detail(self) -> dict[str, Any]:
        return {"type": self.key.type.value, "grace_seconds": self.grace_seconds}

    def notification(self) -> str | None:
        return f"{KEY_ROTATED}{self.user.id}:{self.user.database}:{self.key.role}"


@dataclass(frozen=True)
class UserCreated(Event):
    type = EventType.USER_CREATED


@dataclass(frozen=True)
class UserDeleted(Event):
    type = EventType.USER_DELETED

    def notification(self) -> str | None:
        return user_deleted(self.user.username)


@dataclass(frozen=True)
class PrivacyChanged(Event):
    type = EventType.PRIVACY_CHANGED
    schema: str = ""
    table: str = ""
    privacy: str = ""
    previous: str = ""
    tables: int = 1  # the table and the tables inheriting from it

    def detail(self) -> dict[str, Any]:
        return {"schema": self.schema, "table": self.table, "privacy": self.privacy,
                "previous": self.previous, "tables": self.tables}


E = TypeVar("E", bound=Event)
Subscriber = Callable[[E], Awaitable[None]]


@dataclass(frozen=True)
class AuditQuery:
    key_name: str | None = None  # events made by that key or about it
    types: list[str] | None = None
    page: int = 1
    per_page: int = 20


@dataclass(frozen=True)
class AuditPage:
    total: int
    entries: list[AuditEntry]


class Events:
    """Writes events with their change; delivers them to this process's subscribers;
    reads the audit log back."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._subscribers: list[tuple[type[Event], Callable[[Any], Awaitable[None]]]] = []

    def subscribe(self, kind: type[E], subscriber: Subscriber[E]) -> None:
        """`subscriber` runs after every committed event of `kind` (or a subclass)."""
        self._subscribers.append((kind, subscriber))

    def unsubscribe(self, subscriber: Callable[[Any], Awaitable[None]]) -> None:
        self._subscribers = [(k, s) for k, s in self._subscribers if s is not subscriber]

    async def record(self, meta: AdminConnection, event: Event) -> None:
        """In the change's own transaction on the metadata database: the audit row, and the
        NOTIFY other processes act on. Both exist if and only if it commits."""
        await audit.append(meta, audit.AuditRow(
            user_id=event.user.id, username=event.user.username, event=event.type.value,
            client=event.actor.client, actor_key=event.actor.key_name,
            actor_type=None if event.actor.key_type is None else event.actor.key_type.value,
            key_name=event.key_name, detail=event.detail()))
        message = event.notification()
        if message is not None:
            await notify(meta, CHANNEL, message, stamped=isinstance(event, KeyRevoked))

    async def deliver(self, event: Event) -> None:
        """After the commit: every subscriber of the event, in the order they subscribed.
        Never raises: a failing subscriber is logged and the next one runs."""
        for kind, subscriber in list(self._subscribers):
            if not isinstance(event, kind):
                continue
            try:
                await subscriber(event)
            except Exception:
                log.exception("a subscriber of %s failed (the change stands)", event.type.value)

    async def read(self, principal: Principal, query: AuditQuery) -> AuditPage:
        """The master key reads its user's audit log; no other key may."""
        if not principal.is_master:
            raise Unauthorized("only the master key can read the audit log")
        return await self.read_for(principal.user, query)

    async def read_for(self, user: User, query: AuditQuery) -> AuditPage:
        """One page of a user's audit log, newest first (the operator, from the CLI)."""
        async with self.cluster.metadata() as meta:
            total, entries = await audit.page(
                meta, user.id, key_name=query.key_name, events=query.types,
                limit=query.per_page, offset=(query.page - 1) * query.per_page)
        return AuditPage(total, entries)


# The NOTIFY payloads, as `services/notifications.py` reads them in every process.
def payload(user: User, record: KeyRecord, role_oid: int) -> str:
    return f"{user.id}:{record.token_digest.hex()}:{user.database}:{record.role}:{role_oid}"


USER_DELETED = "user-deleted:"
KEY_ROTATED = "key-rotated:"


def rotated_role(message: str) -> tuple[str, str, str] | None:
    """(user id, database, role) of a key regenerated with a grace, if `message` names one."""
    if not message.startswith(KEY_ROTATED):
        return None
    parts = message[len(KEY_ROTATED):].split(":")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def user_deleted(username: str) -> str:
    """The payload telling every process that a user is going away."""
    return USER_DELETED + username


def deleted_username(message: str) -> str | None:
    return message[len(USER_DELETED):] if message.startswith(USER_DELETED) else None


def payload_role(message: str) -> tuple[str, str, int, float | None] | None:
    """(database, role, role OID, when the revocation was recorded: epoch seconds of
    PostgreSQL's clock, if stamped) named by a payload, if it names them."""
    parts = message.split(":")
    if len(parts) not in (5, 6) or not parts[4].isascii() or not parts[4].isdigit():
        return None
    stamp = None
    if len(parts) == 6:
        try:
            stamp = float(parts[5])
        except ValueError:
            return None
    return parts[2], parts[3], int(parts[4]), stamp
