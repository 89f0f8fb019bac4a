"""The Auth API's use cases: create, list, show, delete and regenerate keys."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from grantkey.db import keys as key_store
from grantkey.db import managers as manager_store
from grantkey.db import migrations, postgis, privileges
from grantkey.db import revocations as revocation_store
from grantkey.db.cluster import AdminConnection, Cluster
from grantkey.db.failures import CLEANUP_ERRORS, is_lock_conflict
from grantkey.domain import names
from grantkey.domain.grants import grants_messages, plan_grants
from grantkey.domain.key_options import OptionRules, grace_message, read_options
from grantkey.domain.keys import (
    KeyRecord,
    KeyType,
    LiveGrants,
    Principal,
    User,
    key_name_messages,
)
from grantkey.domain.secrets_box import SecretBox
from grantkey.domain.tokens import DEFAULT_PUBLIC_TOKEN, digest, new_token
from grantkey.errors import (
    DatabaseUnavailable,
    Forbidden,
    KeyNotFound,
    QuotaReached,
    Unauthorized,
    ValidationFailed,
)
from grantkey.faults import checkpoint
from grantkey.services.events import (
    CLI,
    Actor,
    Events,
    KeyCreated,
    KeyDeleted,
    KeyRegenerated,
    KeyRotated,
)
from grantkey.services.keyed_locks import KeyedLocks
from grantkey.services.revocation import Revoker

NO_GUARD_MESSAGE = (
    "Grants schema create is not available on this server: keys that create tables need "
    "a guard against creating code, which only a PostgreSQL superuser can install")


@dataclass(frozen=True)
class KeyView:
    """A key as the Auth API shows it: its record, its token if known, its live grants."""

    user: User
    record: KeyRecord
    token: str | None
    grants: LiveGrants


@dataclass(frozen=True)
class TokenOwner:
    """A found token's key; `current`: False for a regenerated key's old token."""

    user: User
    record: KeyRecord
    current: bool


@dataclass(frozen=True)
class KeyPage:
    total: int
    keys: list[KeyView]


@dataclass(frozen=True)
class ListQuery:
    types: list[str]
    order: str = "updated_at"
    descending: bool = False
    page: int = 1
    per_page: int = 20
    unused_for: float | None = None  # seconds
    expiring_within: float | None = None  # seconds


def readable_token(box: SecretBox, record: KeyRecord) -> str | None:
    """A key's token, where it can be known: the literal for the default public key, the
    sealed copy for the others (None when tokens are not stored)."""
    if record.type is KeyType.DEFAULT:
        return DEFAULT_PUBLIC_TOKEN
    if record.sealed_token is None:
        return None
    return box.decrypt_token(record.sealed_token, record.id.encode())


class KeyService:
    def __init__(
        self, cluster: Cluster, box: SecretBox, revoker: Revoker, events: Events, *,
        store_tokens: bool, max_keys_per_user: int, queue: KeyedLocks | None = None,
        rules: OptionRules | None = None, max_grace: int = 0,
    ) -> None:
        self.cluster = cluster
        self.events = events
        self.box = box
        self.revoker = revoker
        self.store_tokens = store_tokens
        self.max_keys_per_user = max_keys_per_user
        self._queued = queue if queue is not None else KeyedLocks()
        self.rules = rules if rules is not None else OptionRules()
        self.max_grace = max_grace

    def _token_of(self, record: KeyRecord, principal: Principal | None = None) -> str | None:
        """A key's token, never shown to an old token in its grace (it would outlive it)."""
        if principal is not None and principal.token_until is not None:
            return None
        return readable_token(self.box, record)

    def _seal(self, token: str, key_id: str) -> bytes | None:
        return self.box.encrypt_token(token, key_id.encode()) if self.store_tokens else None

    async def _views(self, user: User, records: list[KeyRecord],
                     principal: Principal | None = None) -> list[KeyView]:
        # Only regular keys show tables and schemas; the owner role, a member of every key
        # role, would make reading the master's grants scan every membership.
        regular = [r.role for r in records if r.type is KeyType.REGULAR]
        live: dict[str, LiveGrants] = {}
        if regular:
            async with self.cluster.user_database(user.database) as conn:
                live = await privileges.read_live_grants(conn, regular)
        return [KeyView(user, r, self._token_of(r, principal), live.get(r.role, LiveGrants()))
                for r in records]

    async def find_token(self, users: list[User], token: str) -> TokenOwner | None:
        """Whose key a token is (by its digest: tokens are never stored in clear), among
        `users`; its current token or an old one in (or after) a grace. The operator's
        `grantkey keys find`, for a leaked token."""
        token_digest = digest(token)
        for user in users:
            async with self.cluster.user_database(user.database) as conn:
                record = await key_store.find_by_digest(conn, token_digest)
            if record is None:
                continue
            current = hmac.compare_digest(record.token_digest, token_digest)
            if current or record.in_grace(datetime.now(UTC)):
                return TokenOwner(user, record, current)
            return None  # an old token whose grace ended: it works nowhere
        return None

    async def master_principal(self, user: User) -> Principal:
        """Act as a user's master key without its token (the CLI, run by the operator)."""
        async with self.cluster.user_database(user.database) as conn:
            _, records = await key_store.list_keys(
                conn, types=[KeyType.MASTER.value], only_id=None, order="name", descending=False,
                limit=1, offset=0,
            )
        if not records:
            raise KeyNotFound("Master")
        return Principal(user=user, key=records[0], token="")

    async def list(self, principal: Principal, query: ListQuery) -> KeyPage:
        async with self.cluster.user_database(principal.user.database) as conn:
            total, records = await key_store.list_keys(
                conn, types=query.types,
                only_id=None if principal.is_master else principal.key.id,
                order=query.order, descending=query.descending,
                limit=query.per_page, offset=(query.page - 1) * query.per_page,
                unused_for=query.unused_for, expiring_within=query.expiring_within,
            )
        return KeyPage(total=total, keys=await self._views(principal.user, records, principal))

    async def show(self, principal: Principal, name: str) -> KeyView:
        if not principal.is_master and name != principal.key.name:
            raise KeyNotFound(name)
        async with self.cluster.user_database(principal.user.database) as conn:
            record = await key_store.find_by_name(conn, name)
        if record is None:
            raise KeyNotFound(name)
        return (await self._views(principal.user, [record], principal))[0]

    async def create(self, principal: Principal, name: Any, grants: Any, *,
                     options: Mapping[str, Any] | None = None, client: str = CLI,
                     reads_public: bool = True) -> KeyView:
        """One transaction: key row, LOGIN role, memberships and grants, or nothing. Its
        event is written in the metadata transaction that holds the key lock, which
        commits right after the user database's (a failure before either commit leaves
        neither the key nor its event). `reads_public=False` (a named map's publishing key):
        not a member of the reader role, so it reads only what `grants` give."""
        _require_master(principal)
        user = principal.user
        name_problems = key_name_messages(name)
        grant_problems = grants_messages(grants)
        chosen, option_problems = read_options(options or {}, datetime.now(UTC), self.rules)
        grant_problems += option_problems
        token = new_token("regular")
        key_id = names.new_id()
        role = names.key_role(user.id, key_id)
        async with self._key_lock(user) as meta, self.cluster.user_database(user.database) as conn:
            if not name_problems and await key_store.find_by_name(conn, name) is not None:
                name_problems.append("Name has already been taken")
            if name_problems or grant_problems:
                raise ValidationFailed(name_problems + grant_problems)
            if self.max_keys_per_user and (
                await key_store.count_regular(conn) >= self.max_keys_per_user
            ):
                raise QuotaReached("You have reached the limit of API keys for your plan")
            plan = plan_grants(grants)
            if plan.create_schemas and not await migrations.guard_installed(conn):
                raise ValidationFailed([NO_GUARD_MESSAGE])
            checkpoint("key.validated")
            managers = await manager_store.managers_for(conn, user.id, user.owner_role)
            await key_store.create_key_role(
                conn, role, self.box.role_password(role, token),
                names.reader_role(user.id) if reads_public else None,
                user.owner_role, managers, valid_until=chosen.expires_at,
            )
            checkpoint("key.role_created")
            # a key outside the reader role: PostGIS's schema (functions, types) of its own
            usage = () if reads_public else tuple(filter(None, [await postgis.schema(conn)]))
            try:
                await privileges.apply_grants(conn, user.id, role, plan, managers,
                                              usage_schemas=usage)
            except privileges.MissingObject as missing:
                raise ValidationFailed(
                    [f"Grants can only grant {missing.kind} permissions you have"]
                ) from None
            checkpoint("key.privileges_granted")
            now = datetime.now(UTC)
            record = KeyRecord(
                id=key_id, name=name, type=KeyType.REGULAR, role=role,
                token_digest=digest(token), sealed_token=self._seal(token, key_id),
                apis=plan.apis, services=plan.services, table_metadata=plan.table_metadata,
                created_at=now, updated_at=now, expires_at=chosen.expires_at,
                sql_timeout=chosen.sql_timeout, rate_limit=chosen.rate_limit,
                restrictions=chosen.restrictions,
            )
            await key_store.insert_key(conn, record)
            created = KeyCreated(user, Actor.of(principal, client), record,
                                 tables=len(plan.tables), schemas=len(plan.create_schemas))
            await self.events.record(meta, created)
            checkpoint("key.row_inserted")
            stored = await key_store.find_by_name(conn, name)
            live = await privileges.read_live_grants(conn, [role])
        assert stored is not None
        await self.events.deliver(created)
        return KeyView(user, stored, token, live[role])

    @asynccontextmanager
    async def _key_lock(self, user: User) -> AsyncIterator[AdminConnection]:
        """One user's key changes, one at a time; the lock lives in the metadata database,
        out of every client's reach, and is held until the block ends (in the transaction
        it yields). The changes of one user queue in this process first, holding nothing:
        however many wait (on a catalog row the user's own session keeps, say), one user
        holds one metadata connection here, not the pool every tenant's revocation needs."""
        async with self._queued.hold(user.id), self.cluster.metadata() as meta:
            await revocation_store.lock_user_keys(meta, user.id)
            yield meta

    async def delete(self, principal: Principal, name: str, *, client: str = CLI) -> None:
        """Decided in one metadata transaction (no login, no password, the event's audit
        row and NOTIFY at commit); the key's row goes right after, then the event is
        delivered; the role is removed best effort (see Revoker)."""
        _require_master(principal)
        user = principal.user
        actor = Actor.of(principal, client)
        async with self._key_lock(user):
            async with self.cluster.user_database(user.database) as conn:
                record = await _find_key(conn, name, allowed=(KeyType.REGULAR,))
                deleted = await self.revoker.decide(
                    user, record, password=None,
                    event=lambda oid: KeyDeleted(user, actor, record, role_oid=oid))
                checkpoint("key.revoked")
                await key_store.delete_key_row(conn, record.id)
            await self.events.deliver(deleted)
            await self.revoker.settled(user, record)
        await self.revoker.clean_up(user.id, user.database, user.owner_role, record.role,
                                    deleted.role_oid)

    async def regenerate(self, principal: Principal, name: str, *, grace_seconds: int = 0,
                         old_token: str | None = None, client: str = CLI) -> KeyView:
        """The new role password is decided first (the old token stops at that commit);
        the key's row takes the new token's digest right after. A crash between the two
        leaves a key that refuses every token until it is regenerated again. With a grace
        (`rotate`), the old token keeps working for `grace_seconds`."""
        _require_master(principal)
        if not 0 <= grace_seconds <= self.max_grace:
            raise ValidationFailed([grace_message(self.max_grace)])
        if grace_seconds:
            return await self._rotate(principal, name, grace_seconds, old_token, client)
        user = principal.user
        actor = Actor.of(principal, client)
        async with self._key_lock(user):
            async with self.cluster.user_database(user.database) as conn:
                record = await _find_key(conn, name, allowed=(KeyType.MASTER, KeyType.REGULAR))
                token = new_token(record.type.value)
                password = self.box.role_password(record.role, token)
                regenerated = await self.revoker.decide(
                    user, record, password=password,
                    event=lambda oid: KeyRegenerated(user, actor, record, role_oid=oid))
                checkpoint("key.regenerated_before_row")
                await key_store.update_token(
                    conn, record.id, digest(token), self._seal(token, record.id))
                updated = await key_store.find_by_name(conn, name)
                live = await privileges.read_live_grants(conn, [record.role])
            await self.events.deliver(regenerated)
            await self.revoker.settled(user, record)
        assert updated is not None
        return KeyView(user, updated, token, live[record.role])


    async def _rotate(self, principal: Principal, name: str, grace_seconds: int,
                      old_token: str | None, client: str) -> KeyView:
        """One transaction in the user's database: the role's new password and the key's
        new token, the old token's digest and grace beside it, and the new password sealed
        under the old token (with which, alone, the old token logs in during the grace).
        Its event (audit row, NOTIFY: forget the old token's cached state) commits right
        after. No session ends: both tokens are the same role."""
        user = principal.user
        async with self._key_lock(user) as meta, self.cluster.user_database(user.database) as conn:
            record = await _find_key(conn, name, allowed=(KeyType.MASTER, KeyType.REGULAR))
            current = self._current_token(record, old_token)
            token = new_token(record.type.value)
            password = self.box.role_password(record.role, token)
            grace = key_store.Grace(digest(current), grace_seconds,
                                    self.box.seal_for_old_token(password, current,
                                                                record.id.encode()))
            await revocation_store.bounded_lock_wait(conn)
            try:
                await key_store.set_role_password(conn, record.role, password)
            except CLEANUP_ERRORS as error:
                if not is_lock_conflict(error):
                    raise
                raise DatabaseUnavailable("the key's role is locked by one of its own "
                                          "sessions; try again") from error
            await key_store.update_token(conn, record.id, digest(token),
                                        self._seal(token, record.id), grace)
            rotated = KeyRotated(user, Actor.of(principal, client), record,
                                 grace_seconds=grace_seconds)
            await self.events.record(meta, rotated)
            updated = await key_store.find_by_name(conn, name)
            live = await privileges.read_live_grants(conn, [record.role])
        await self.events.deliver(rotated)
        assert updated is not None
        return KeyView(user, updated, token, live[record.role])

    def _current_token(self, record: KeyRecord, given: str | None) -> str:
        """The key's token now: `given` (checked), or the sealed copy."""
        if given is not None:
            if not hmac.compare_digest(digest(given), record.token_digest):
                raise ValidationFailed(["Token is not the key's current token"])
            return given
        known = self._token_of(record)
        if known is None:
            raise ValidationFailed([
                "Grace seconds needs the key's current token, which this server does not "
                'keep (GRANTKEY_STORE_TOKENS is off): send it as "token"'])
        return known


async def _find_key(conn: AdminConnection, name: str, allowed: tuple[KeyType, ...]) -> KeyRecord:
    """The named key, which must be of an allowed type (the caller holds the key lock)."""
    record = await key_store.find_by_name(conn, name)
    if record is None:
        raise KeyNotFound(name)
    if record.type not in allowed:
        raise Forbidden("You don't have permission to access that resource")
    return record


def _require_master(principal: Principal) -> None:
    """The master key's current token: an old one in its grace manages nothing (else whoever
    holds a leaked old token could keep the key past the grace)."""
    if not principal.is_master or principal.token_until is not None:
        raise Unauthorized("only the master key's current token can manage keys")
