"""The services of one process, built once from the settings."""

from __future__ import annotations

from grantkey.db.bootstrap import bootstrap
from grantkey.db.cluster import Cluster
from grantkey.domain.secrets_box import SecretBox
from grantkey.services.keys import KeyService
from grantkey.services.resolver import KeyResolver
from grantkey.services.revocation import KeyCache, Revoker
from grantkey.services.runtime import load_secret
from grantkey.services.users import UserService
from grantkey.settings import Settings


class Services:
    def __init__(self, settings: Settings, admin_url: str) -> None:
        self.settings = settings
        self.cluster = Cluster(admin_url)
        box = SecretBox(load_secret(settings))
        self.cache = KeyCache(settings.key_cache_size)
        self.users = UserService(self.cluster, box, settings.store_tokens)
        self.keys = KeyService(
            self.cluster, box, Revoker(self.cluster, self.cache),
            store_tokens=settings.store_tokens, max_keys_per_user=settings.max_keys_per_user,
        )
        self.resolver = KeyResolver(self.cluster, self.cache)

    async def open(self, *, migrate: bool = True) -> None:
        if migrate:
            await bootstrap(self.cluster.admin_url)
        await self.cluster.open()

    async def close(self) -> None:
        await self.cluster.close()
