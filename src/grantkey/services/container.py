"""The services of one process, built once from the settings."""

from __future__ import annotations

from grantkey.db.bootstrap import bootstrap
from grantkey.db.cluster import Cluster
from grantkey.db.role_pools import RolePools
from grantkey.domain.secrets_box import SecretBox
from grantkey.services.datasets import DatasetService
from grantkey.services.keys import KeyService
from grantkey.services.repair import RoleRepair
from grantkey.services.resolver import KeyResolver
from grantkey.services.revocation import KeyCache, Revoker
from grantkey.services.runtime import load_secret
from grantkey.services.sql import SqlService
from grantkey.services.users import UserService
from grantkey.settings import DEFAULT_SQL_MAX_CONNECTIONS, Settings


class Services:
    def __init__(self, settings: Settings, admin_url: str) -> None:
        self.settings = settings
        self.cluster = Cluster(admin_url, superuser_url=settings.superuser_url)
        box = SecretBox(load_secret(settings))
        self.cache = KeyCache(settings.key_cache_size)
        self.users = UserService(self.cluster, box, settings.store_tokens,
                                 cache_size=settings.key_cache_size,
                                 storage_quota=settings.storage_quota)
        self.revoker = Revoker(self.cluster, self.cache)
        self.keys = KeyService(
            self.cluster, box, self.revoker,
            store_tokens=settings.store_tokens, max_keys_per_user=settings.max_keys_per_user,
        )
        self.resolver = KeyResolver(self.cluster, self.cache)
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
        self.datasets = DatasetService(self.cluster)
        self.repair = RoleRepair(self.cluster, box)
        self.sql.repair = self.repair

    async def open(self, *, migrate: bool = True) -> None:
        if migrate:
            await bootstrap(self.cluster.admin_url)
        await self.cluster.open()

    async def close(self) -> None:
        await self.sql.quota.close()
        await self.revoker.drain()
        await self.pools.close()
        await self.cluster.close()
