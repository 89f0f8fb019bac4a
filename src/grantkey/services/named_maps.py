"""Named maps (templates): saved by the master or by a regular key with `maps`, and drawn as
their *publishing key*, never as the owner.

A regular key's template renders with that key's rights (its token kept sealed with the
template): deleting or regenerating the key ends its tiles. A template the master saves
renders as a key made for it (`named map <name>`, visible in the key list, audited like any
key): `maps` and SELECT on exactly the relations its layers read, as PostgreSQL reports them
when it is saved (the dependencies of a temporary view of each layer, made as the master
and gone with its session), and nothing else (not a member of the reader role: the user's
public tables it does not read are not its); saving it again makes a new key and deletes
the old one, and deleting the template deletes its key (a revocation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from grantkey.db import named_maps as store
from grantkey.db.cluster import Cluster
from grantkey.db.tiles import reads_probe
from grantkey.domain import names
from grantkey.domain.keys import KeyType, Principal, User
from grantkey.domain.mapconfig import MapConfig, parse_mapconfig
from grantkey.domain.secrets_box import SecretBox
from grantkey.domain.templates import (
    Template,
    check_token,
    instantiate,
    is_template_name,
    parse_template,
)
from grantkey.errors import (
    BadInput,
    Forbidden,
    LayerFailed,
    LimitReached,
    NotFound,
    QuotaReached,
    SqlError,
    Unauthorized,
    ValidationFailed,
)
from grantkey.services.keys import KeyService
from grantkey.services.lru import Lru
from grantkey.services.maps import Layergroup, MapsService
from grantkey.services.resolver import KeyResolver
from grantkey.services.sql import SqlService

KEY_PREFIX = "named map "
PUBLISHER_GONE = ("permission denied: the key that published this template was deleted or "
                  "regenerated; save the template again")


def _generation(row: dict[str, Any]) -> str:
    """Which version of a template a layergroup instantiates (its layergroups' `template`
    is `<name>/<generation>`)."""
    return str(row["updated_at"].timestamp())


# lets a request act as a template's publishing key, or raises (http: restrictions, limits)
Admit = Callable[[Principal], Awaitable[None]]

class NamedMaps:
    def __init__(self, cluster: Cluster, keys: KeyService, maps: MapsService,
                 resolver: KeyResolver, box: SecretBox, sql_service: SqlService, *,
                 max_sql_bytes: int, max_templates: int = 0, cache_size: int = 10_000) -> None:
        self.cluster = cluster
        self.keys = keys
        self.maps = maps
        self.resolver = resolver
        self.box = box
        self.sql = sql_service
        self.max_sql_bytes = max_sql_bytes
        self.max_templates = max_templates
        # (user, template, saved at) -> the layergroup its defaults make (direct tiles)
        self._defaults: Lru[tuple[str, str, str], Layergroup] = Lru(cache_size)

    @staticmethod
    def _manager(principal: Principal) -> str | None:
        """The master manages every template of the user; a regular key with `maps` those it
        published (its id); any other key none."""
        if principal.is_master:
            return None
        if principal.key.type is KeyType.REGULAR and principal.allows_api("maps"):
            return principal.key.id
        raise Forbidden("Forbidden")

    def _seal(self, user: User, name: str, key_id: str, token: str) -> bytes:
        return self.box.encrypt_token(token, self._aad(user, name, key_id))

    @staticmethod
    def _aad(user: User, name: str, key_id: str) -> bytes:
        return b"named map\0" + f"{user.id}\0{name}\0{key_id}".encode()

    async def _row(self, principal: Principal, name: str) -> dict[str, Any]:
        owner = self._manager(principal)
        row = await self._stored(principal.user, name)
        if row is None or (owner is not None and row["key_id"] != owner):
            raise NotFound(f"Template '{name[:128]}' of user '{principal.user.username}' "
                           "does not exist")
        return row

    async def _publisher(self, principal: Principal,
                         template: Template) -> tuple[str, str, str, bool]:
        """(key id, key name, token, made for it) of the key the template renders as."""
        if not principal.is_master:
            return principal.key.id, principal.key.name, principal.token, False
        config = self._config(template, {})
        relations: set[tuple[str, str]] = set()
        for layer in config.layers:
            try:
                async with await self.sql.start(principal, reads_probe(layer.sql)) as running:
                    relations |= {(str(s), str(n)) async for s, n in running.rows()}
            except SqlError as error:
                raise LayerFailed(error, layer.index, layer.id) from None
        grants: list[dict[str, Any]] = [{"type": "apis", "apis": ["maps"]}]
        if relations:
            grants.append({"type": "database", "tables": [
                {"schema": s, "name": n, "permissions": ["select"]}
                for s, n in sorted(relations)]})
        # a name of its own (a user's key can never be taken for it)
        key_name = f"{KEY_PREFIX}{template.name} ({names.new_id()[:8]})"
        try:
            view = await self.keys.create(principal, key_name, grants, reads_public=False)
        except (ValidationFailed, QuotaReached) as error:
            raise BadInput("The key this template renders as could not be made: "
                           f"{error.public_message()}") from None
        assert view.token is not None
        return view.record.id, view.record.name, view.token, True

    def _config(self, template: Template, params: object) -> MapConfig:
        return parse_mapconfig(instantiate(template, params, max_bytes=2 * self.max_sql_bytes),
                               max_sql_bytes=self.max_sql_bytes)

    async def create(self, principal: Principal, raw: object) -> str:
        self._manager(principal)
        template = parse_template(raw)
        self._config(template, {})  # the layergroup is checked when saved, by any publisher
        user = principal.user
        async with self.cluster.metadata() as conn:
            if await store.get(conn, user.id, template.name) is not None:
                raise BadInput(f"Template '{template.name}' of user '{user.username}' "
                               "already exists")
            count = await store.count(conn, user.id)
            if self.max_templates and count >= self.max_templates:
                raise LimitReached(f"User '{user.username}' reached limit on number of "
                                   f"templates ({count}/{self.max_templates})")
        key_id, key_name, token, own = await self._publisher(principal, template)
        async with self.cluster.metadata() as conn:
            stored = await store.insert(conn, user.id, template.name, template.document,
                                        key_id, key_name,
                                        self._seal(user, template.name, key_id, token), own)
        if not stored:
            await self._drop_key(principal.user, key_id, key_name, own)
            raise BadInput(f"Template '{template.name}' of user '{user.username}' "
                           "already exists")
        return template.name

    async def names(self, principal: Principal) -> list[str]:
        owner = self._manager(principal)
        async with self.cluster.metadata() as conn:
            return await store.names(conn, principal.user.id, owner)

    async def get(self, principal: Principal, name: str) -> dict[str, Any]:
        template: dict[str, Any] = (await self._row(principal, name))["template"]
        return template

    async def update(self, principal: Principal, name: str, raw: object) -> str:
        row = await self._row(principal, name)
        if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"] != name:
            raise BadInput(f"Cannot update name of a map template ('{name}' != "
                           f"'{str(raw['name'])[:128]}')")
        template = parse_template({**raw, "name": name} if isinstance(raw, dict) else raw)
        self._config(template, {})
        # the new publishing key first (a failure leaves the template as it was), then the
        # row, then the old key made for it; its old layergroups go with the old version
        key_id, key_name, token, own = await self._publisher(principal, template)
        async with self.cluster.metadata() as conn:
            await store.replace(conn, principal.user.id, name, template.document, key_id,
                                key_name, self._seal(principal.user, name, key_id, token), own)
        self._defaults.pop_where(lambda key: key[:2] == (principal.user.id, name))
        await self._drop_key(principal.user, row["key_id"], row["key_name"], row["own_key"])
        return name

    async def delete(self, principal: Principal, name: str) -> None:
        row = await self._row(principal, name)
        async with self.cluster.metadata() as conn:
            await store.delete(conn, principal.user.id, name)
        self._defaults.pop_where(lambda key: key[:2] == (principal.user.id, name))
        await self._drop_key(principal.user, row["key_id"], row["key_name"], row["own_key"])

    async def _drop_key(self, user: User, key_id: str, key_name: str, own: bool) -> None:
        """The key made for a template, if it is still that key (by its id)."""
        if not own:
            return
        master = await self.keys.master_principal(user)
        with contextlib.suppress(NotFound):  # deleted by hand already
            if (await self.keys.show(master, key_name)).record.id == key_id:
                await self.keys.delete(master, key_name)

    async def _stored(self, user: User, name: str) -> dict[str, Any] | None:
        if not is_template_name(name):
            return None
        async with self.cluster.metadata() as conn:
            return await store.get(conn, user.id, name)

    async def _template(self, user: User, name: str) -> tuple[Template, dict[str, Any]]:
        row = await self._stored(user, name)
        if row is None:
            raise NotFound(f"Template '{name[:128]}' of user '{user.username}' does not exist")
        return parse_template(row["template"]), row

    async def check_tile(self, user: User, instance: str, auth_token: str | None) -> None:
        """A named map's tile: its template still exists as it was when the layergroup was
        made (not edited, deleted or made anew since), and its token, if it has one."""
        name, _, generation = instance.partition("/")
        template, row = await self._template(user, name)
        if _generation(row) != generation:
            raise NotFound(f"Template '{name}' of user '{user.username}' changed since this "
                           "map was made: instantiate it again")
        check_token(template, auth_token)

    async def publisher(self, user: User, row: dict[str, Any]) -> Principal:
        token = self.box.decrypt_token(bytes(row["sealed_token"]),
                                       self._aad(user, row["name"], row["key_id"]))
        try:
            return await self.resolver.resolve(user, token, fresh=False)
        except Unauthorized:
            raise Forbidden(PUBLISHER_GONE) from None

    async def instantiate(self, user: User, name: str, params: object,
                          auth_token: str | None,
                          admit: Admit | None = None) -> tuple[Layergroup, Principal]:
        """The layergroup of the template with `params`, made as its publishing key (once
        `admit` let the request act as that key: its restrictions and rate limit)."""
        template, row = await self._template(user, name)
        check_token(template, auth_token)
        publisher = await self.publisher(user, row)
        if admit is not None:
            await admit(publisher)
        config = self._config(template, params)
        layergroup = await self.maps.create(publisher, config,
                                            template=f"{name}/{_generation(row)}")
        if not params:
            self._defaults.put((user.id, name, str(row["updated_at"])), layergroup)
        return layergroup, publisher

    async def default_layergroup(self, user: User, name: str, auth_token: str | None,
                                 admit: Admit | None = None) -> tuple[Layergroup, Principal]:
        """For direct tiles of a template: the layergroup of its defaults (made once)."""
        template, row = await self._template(user, name)
        check_token(template, auth_token)
        cached = self._defaults.get((user.id, name, str(row["updated_at"])))
        if cached is not None:
            publisher = await self.publisher(user, row)
            if admit is not None:
                await admit(publisher)
            return cached, publisher
        return await self.instantiate(user, name, {}, auth_token, admit)

