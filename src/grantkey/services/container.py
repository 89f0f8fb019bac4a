"""The services of one process, built once from the settings."""

from __future__ import annotations

from grantkey.db.bootstrap import bootstrap
from grantkey.db.cluster import Cluster
from grantkey.db.role_pools import RolePools
from grantkey.domain.key_options import OptionRules
from grantkey.domain.secrets_box import SecretBox
from grantkey.services.copy import CopyService
from grantkey.services.datasets import DatasetService
from grantkey.services.events import Events, KeyCreated, KeyRevoked, KeyRotated, UserDeleted
from grantkey.services.jobs import JobLimits, JobRunner, JobService
from grantkey.services.keyed_locks import KeyedLocks
from grantkey.services.keys import KeyService
from grantkey.services.maps import MapsService
from grantkey.services.named_maps import NamedMaps
from grantkey.services.rate_limits import RateLimits
from grantkey.services.rate_store import RedisBuckets, SharedBuckets, table_path
from grantkey.services.repair import RoleRepair
from grantkey.services.resolver import KeyResolver
from grantkey.services.revocation import KeyCache, Revoker
from grantkey.services.runtime import load_secret
from grantkey.services.sql import SqlService
from grantkey.services.tile_tokens import TileTokens
from grantkey.services.usage import Usage
from grantkey.services.users import UserService
from grantkey.settings import DEFAULT_SQL_MAX_CONNECTIONS, Settings


class Services:
    def __init__(self, settings: Settings, admin_url: str) -> None:
        self.settings = settings
        self.cluster = Cluster(admin_url, superuser_url=settings.superuser_url)
        box = SecretBox(load_secret(settings))
        self.cache = KeyCache(settings.key_cache_size)
        self.events = Events(self.cluster)
        self.users = UserService(self.cluster, box, settings.store_tokens, self.events,
                                 cache_size=settings.key_cache_size,
                                 storage_quota=settings.storage_quota)
        self.revoker = Revoker(self.cluster, self.cache, self.events)
        # every holder of a user's key lock queues here first (keys, role repair)
        key_queue = KeyedLocks()
        self.keys = KeyService(
            self.cluster, box, self.revoker, self.events,
            store_tokens=settings.store_tokens, max_keys_per_user=settings.max_keys_per_user,
            queue=key_queue,
            rules=OptionRules(max_lifetime_days=settings.key_max_lifetime_days,
                              require_expiry=settings.key_require_expiry,
                              sql_timeout=settings.sql_timeout),
            max_grace=settings.key_max_grace,
        )
        self.resolver = KeyResolver(self.cluster, self.cache, box)
        self.pools = RolePools(settings.sql_max_connections or DEFAULT_SQL_MAX_CONNECTIONS,
                               settings.sql_pool_wait,
                               settings.sql_idle_seconds, key_share=settings.sql_key_share,
                               user_share=settings.sql_user_share)
        self.revoker.pools = self.pools
        self.sql = SqlService(self.cluster, self.pools, self.resolver, box,
                              time_limit=settings.sql_timeout,
                              master_time_limit=settings.sql_master_timeout,
                              target_cache_size=settings.key_cache_size)
        self.revoker.forget_role = self.sql.forget_role
        self.copy = CopyService(self.sql, time_limit=settings.copy_timeout,
                                start_limit=settings.sql_timeout)
        limits = JobLimits(max_queued=settings.job_max_queued, time_limit=settings.job_timeout,
                           lease_seconds=settings.job_lease, keep_days=settings.job_keep_days)
        self.jobs = JobService(self.cluster, box, limits)
        self.job_runner = JobRunner(self.cluster, self.sql, self.resolver, box, limits,
                                    settings.job_runners)
        self.maps = MapsService(self.cluster, self.sql, idle_days=settings.maps_idle_days,
                                cache_size=settings.key_cache_size)
        self.tile_tokens = TileTokens(box, settings.key_cache_size)
        self.named_maps = NamedMaps(self.cluster, self.keys, self.maps, self.resolver, box,
                                    self.sql, max_sql_bytes=settings.max_query_bytes,
                                    max_templates=settings.max_templates_per_user,
                                    cache_size=settings.key_cache_size)
        self.rates = RateLimits(
            RedisBuckets(settings.redis_url) if settings.redis_url
            else SharedBuckets(table_path(settings.data_dir)),
            {"sql": settings.rate_limit_sql, "copy": settings.rate_limit_copy,
             "jobs": settings.rate_limit_jobs, "tiles": settings.rate_limit_tiles,
             "maps": settings.rate_limit_maps},
            settings.rate_limit_lookups)
        self.usage = Usage(self.cluster)
        self.datasets = DatasetService(self.cluster, self.events)
        self.repair = RoleRepair(self.cluster, box, key_queue)
        self.sql.repair = self.repair
        self._subscribe()

    def _subscribe(self) -> None:
        """What this process does once a change committed (other processes do the same
        on its NOTIFY: `notifications.py`). Each subscriber runs on its own: one that
        fails is logged and the next runs."""
        self.events.subscribe(KeyRevoked, self.revoker.forget_revoked)
        self.events.subscribe(KeyRevoked, self.revoker.end_revoked_sessions)
        self.events.subscribe(KeyRevoked, self._forget_tile_tokens)
        self.events.subscribe(KeyRotated, self._forget_rotated)
        self.events.subscribe(KeyCreated, self._drop_orphan_privilege_roles)
        self.events.subscribe(UserDeleted, self._forget_deleted_user)

    async def _forget_rotated(self, event: KeyRotated) -> None:
        """The old token's cached state (its connection string has the old password)."""
        self.cache.evict_user(event.user.id)
        self.sql.forget_role(event.user.database, event.key.role)

    async def _forget_tile_tokens(self, event: KeyRevoked) -> None:
        self.tile_tokens.forget_all()

    async def _drop_orphan_privilege_roles(self, event: KeyCreated) -> None:
        await self.revoker.drop_orphan_privilege_roles(event.user.id, event.user.database)

    async def _forget_deleted_user(self, event: UserDeleted) -> None:
        self.users.forget(event.user.username)
        self.cache.clear()  # rare: simpler than finding that user's keys
        self.sql.forget_all()
        self.maps.forget_user(event.user.id)
        self.usage.forget(event.user.database)

    async def open(self, *, migrate: bool = True) -> None:
        if migrate:
            await bootstrap(self.cluster.admin_url)
        await self.cluster.open()

    async def close(self) -> None:
        self.sql.expiry.close()
        await self.rates.close()
        await self.sql.quota.close()
        await self.revoker.drain()
        await self.pools.close()
        await self.cluster.close()
