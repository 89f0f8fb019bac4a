"""Creating, listing and deleting users: a database, two roles and two built-in keys each."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from grantkey.db import keys as key_store
from grantkey.db import locks, migrations, postgis, storage_quota
from grantkey.db import managers as manager_store
from grantkey.db import users as user_store
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS
from grantkey.domain import names
from grantkey.domain.keys import DEFAULT_NAME, MASTER_NAME, KeyRecord, KeyType, User
from grantkey.domain.secrets_box import SecretBox
from grantkey.domain.tokens import DEFAULT_PUBLIC_TOKEN, digest, new_token
from grantkey.errors import UserNotFound
from grantkey.faults import checkpoint
from grantkey.services.events import CLI, Actor, Events, UserCreated, UserDeleted
from grantkey.services.lru import Lru

BUILTIN_APIS = ("sql", "maps")
log = logging.getLogger("grantkey.users")


@dataclass(frozen=True)
class CreatedUser:
    user: User
    master_token: str


class UserService:
    def __init__(self, cluster: Cluster, box: SecretBox, store_tokens: bool, events: Events,
                 cache_size: int = 10_000, storage_quota: str = "-1") -> None:
        self.cluster = cluster
        self.events = events
        self.storage_quota = storage_quota
        self.box = box
        self.store_tokens = store_tokens
        self._known: Lru[str, User] = Lru(cache_size)
        self._postgis_template: str | None = None

    async def get(self, username: str, *, cached: bool = False,
                  before_lookup: Callable[[], Awaitable[None]] | None = None) -> User:
        """A ready user. `cached` may answer from this process's memory: a deletion
        reaches every process through NOTIFY (see `forget`); an unknown name is never cached,
        so a user created elsewhere is found at once. `before_lookup` runs before the
        database is asked (a client address's rate limit)."""
        if cached:
            known = self._known.get(username)
            if known is not None:
                return known
        if before_lookup is not None:
            await before_lookup()
        async with self.cluster.metadata() as conn:
            user = await user_store.find_user(conn, username)
        if user is None:
            raise UserNotFound(username)
        self._known.put(username, user)
        return user

    def known(self, username: str) -> User | None:
        """The user as this process's memory has it, if it does."""
        return self._known.get(username)

    def forget(self, username: str | None = None) -> None:
        """Drop one user (or, with None, every user) from this process's memory."""
        if username is None:
            self._known.clear()
        else:
            self._known.pop(username)

    async def all(self) -> list[User]:
        async with self.cluster.metadata() as conn:
            return await user_store.list_users(conn)

    async def create(self, username: str, *, client: str = CLI) -> CreatedUser:
        """All or nothing: on any failure the database, roles and row are removed. The
        event is written in the transaction that makes the user ready."""
        names.check_username(username)
        user_id = names.new_id()
        user = User(
            id=user_id, username=username, database=names.database_name(user_id),
            owner_role=names.owner_role(user_id), public_role=names.public_role(user_id),
            created_at=datetime.now(UTC),
        )
        async with self.cluster.metadata() as conn:
            await user_store.reserve_user(conn, user)  # UserExists if the name is taken
        master_token = new_token("master")
        created = UserCreated(user, Actor(client))
        async with self.cluster.autocommit() as lock:
            # Held until provisioning ends, so start-up repair leaves this user alone.
            await locks.hold_user_lock(lock, user.id)
            try:
                checkpoint("user.reserved")
                await self._provision(user, master_token, created)
            except BaseException:
                await user_store.drop_user_everywhere(self.cluster, user.id, user.database)
                raise
        await self.events.deliver(created)
        return CreatedUser(user=user, master_token=master_token)

    async def _provision(self, user: User, master_token: str, created: UserCreated) -> None:
        async with self.cluster.metadata() as conn:
            await user_store.create_builtin_roles(
                conn, user,
                self.box.role_password(user.owner_role, master_token),
                self.box.role_password(user.public_role, DEFAULT_PUBLIC_TOKEN),
            )
        checkpoint("user.roles_created")
        template = await self._template()
        async with self.cluster.autocommit() as conn:
            await user_store.create_database(conn, user, template)
        checkpoint("user.database_created")
        async with self.cluster.user_database(user.database) as conn:
            await user_store.harden_database(conn, user)
        async with self.cluster.superuser_session(user.database) as su:
            await postgis.install(su)
        async with self.cluster.user_database(user.database) as conn:
            version = await migrations.run_user_migrations(
                conn, partial(self.cluster.superuser_session, user.database))
            for record in self._builtin_keys(user, master_token):
                await key_store.insert_key(conn, record)
            await manager_store.managers_for(conn, user.id, user.owner_role)
            checkpoint("user.keys_inserted")
            quota = "-1"
            if version >= migrations.QUOTA_VERSION:  # else no superuser: `serve` refuses a quota
                await storage_quota.set_limit(conn, self.storage_quota)
                quota = self.storage_quota
        checkpoint("user.database_prepared")
        async with self.cluster.metadata() as conn:
            await user_store.mark_ready(conn, user.id, version)
            await user_store.record_storage_quota(conn, user.id, quota)
            await self.events.record(conn, created)

    async def _template(self) -> str:
        """grantkey's PostGIS template where the server can have one (made once), else
        template0; asked once per process."""
        if self._postgis_template is None:
            try:
                async with self.cluster.autocommit() as conn:
                    ready = await postgis.template_ready(conn)
                if not ready and await self.cluster.postgis_available():
                    await postgis.make_template(self.cluster)
                    async with self.cluster.autocommit() as conn:
                        ready = await postgis.template_ready(conn)
            except CLEANUP_ERRORS as error:  # a user made from template0 is as good, slower
                log.warning("the PostGIS template database could not be made: %s", error)
                ready = False
            self._postgis_template = postgis.TEMPLATE if ready else "template0"
        return self._postgis_template

    def _builtin_keys(self, user: User, master_token: str) -> list[KeyRecord]:
        now = datetime.now(UTC)
        master_id, default_id = names.new_id(), names.new_id()
        sealed = (
            self.box.encrypt_token(master_token, master_id.encode()) if self.store_tokens else None
        )
        master = KeyRecord(
            id=master_id, name=MASTER_NAME, type=KeyType.MASTER, role=user.owner_role,
            token_digest=digest(master_token), sealed_token=sealed, apis=BUILTIN_APIS,
            services=(), table_metadata=False, created_at=now, updated_at=now,
        )
        default = KeyRecord(
            id=default_id, name=DEFAULT_NAME, type=KeyType.DEFAULT, role=user.public_role,
            token_digest=digest(DEFAULT_PUBLIC_TOKEN), sealed_token=None, apis=BUILTIN_APIS,
            services=(), table_metadata=False, created_at=now, updated_at=now,
        )
        return [master, default]

    async def delete(self, username: str, *, client: str = CLI) -> None:
        """Decided when the user is marked deleting: its event (audit row, and the NOTIFY
        every process stops serving the user at) is written in that transaction. Its
        audit history stays."""
        user = await self.get(username)
        self.forget(username)
        deleted = UserDeleted(user, Actor(client))
        async with self.cluster.metadata() as conn:
            await user_store.mark_deleting(conn, user.id)
            await self.events.record(conn, deleted)
        await self.events.deliver(deleted)
        try:
            await user_store.drop_user_everywhere(self.cluster, user.id, user.database)
        except CLEANUP_ERRORS as error:  # the user is gone for every API
            log.warning("cleanup of deleted user %s left for the start-up repair: %s",
                        user.id, error)
