"""Maps API use cases: make a layergroup, draw its tiles.

Everything that touches a layer's SQL runs logged in as the requesting key's role, through
`SqlService.start` (its pools, fair shares, time limit and revocation handling): the probes
at creation (columns, relations read) and every tile. The admin connections read only the
catalog and the table statistics (the cache buster) and keep the layergroups.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from grantkey.db import layergroups
from grantkey.db.cluster import Cluster
from grantkey.db.tiles import (
    GEOM,
    GEOMETRY_TYPES,
    HIDDEN,
    LayerShape,
    columns_probe,
    default_srid,
    join_tile,
    layer_tile,
    property_kind,
    relations_probe,
    typmod_srid,
)
from grantkey.domain.keys import Principal, User
from grantkey.domain.mapconfig import MapConfig, MapLayer, from_canonical
from grantkey.domain.tiles import TileCoord
from grantkey.errors import LayerFailed, LayergroupNotFound, SqlError
from grantkey.services.lru import Lru
from grantkey.services.sql import SqlService

log = logging.getLogger("grantkey.maps")
TOUCH_EVERY = 3600.0  # seconds between two marks of a layergroup's use, per process
EXPIRE_EVERY = 3600.0
MAX_CACHED = 1000  # layergroups a process keeps: up to a few hundred KiB of SQL each
NO_POSTGIS = "The Maps API needs PostGIS"


@dataclass(frozen=True)
class Layergroup:
    user_id: str
    hash: str
    config: MapConfig
    shapes: tuple[LayerShape, ...]
    changed_at: datetime
    template: str | None = None  # the named map it instantiates
    # each layer's part of the tile statement, composed once (tile_query's join)
    parts: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def made(cls, user_id: str, lg_hash: str, config: MapConfig,
             shapes: tuple[LayerShape, ...], changed_at: datetime,
             template: str | None) -> Layergroup:
        parts = tuple(layer_tile(layer, shape)
                      for layer, shape in zip(config.layers, shapes, strict=True))
        return cls(user_id, lg_hash, config, shapes, changed_at, template, parts)

    @property
    def last_modified(self) -> str:
        return self.changed_at.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")

    @property
    def buster(self) -> int:
        return int(self.changed_at.timestamp() * 1000)

    @property
    def id(self) -> str:
        return f"{self.hash}:{self.buster}"

    def layers(self) -> list[tuple[MapLayer, LayerShape]]:
        return list(zip(self.config.layers, self.shapes, strict=True))


def _relations(plan: object) -> set[tuple[str, str]]:
    """The (schema, relation) pairs a JSON plan scans, at any depth."""
    found: set[tuple[str, str]] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("Relation Name"), str) and isinstance(node.get("Schema"), str):
                found.add((node["Schema"], node["Relation Name"]))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class MapsService:
    def __init__(self, cluster: Cluster, sql: SqlService, *, idle_days: int,
                 cache_size: int = 10_000) -> None:
        self.cluster = cluster
        self.sql = sql
        self.idle_days = idle_days
        # a hash always names the same config: a cached one is never stale (with when this
        # process last marked it used)
        self._layergroups: Lru[tuple[str, str], tuple[Layergroup, float]] = Lru(
            min(cache_size, MAX_CACHED))

    async def create(self, principal: Principal, config: MapConfig,
                     template: str | None = None) -> Layergroup:
        """Probe each layer as the key (a failure names the layer), then keep the map.
        `template`: the named map this instantiates (its tiles check it still exists)."""
        await self.sql.require_postgis(principal.user, NO_POSTGIS)
        shapes, relations = [], set()
        for layer in config.layers:
            try:
                shapes.append(await self._shape(principal, layer))
                relations |= await self._read_relations(principal, layer)
            except SqlError as error:
                raise LayerFailed(error, layer.index, layer.id) from None
        user = principal.user
        lg_hash = config.layergroup_hash(user.database, principal.key.role, template)
        async with self.cluster.user_database(user.database) as conn:
            tables = await layergroups.relation_oids(conn, sorted(relations))
            stamp = await layergroups.fingerprint(conn, tables)
        async with self.cluster.metadata() as conn:
            changed = await layergroups.save(
                conn, user_id=user.id, hash=lg_hash, config=orjson.loads(config.canonical()),
                shapes=[{"srid": s.srid, "geometry_columns": list(s.geometry_columns),
                         "properties": [list(p) for p in s.properties]} for s in shapes],
                tables=tables, fingerprint=stamp, template=template)
        layergroup = Layergroup.made(user.id, lg_hash, config, tuple(shapes), changed, template)
        self._layergroups.put((user.id, lg_hash), (layergroup, time.monotonic()))
        return layergroup

    async def _shape(self, principal: Principal, layer: MapLayer) -> LayerShape:
        async with await self.sql.start(principal, columns_probe(layer), params=[0]) as running:
            listed = [(c.name, running.type_name(c), c.type_modifier) for c in running.columns]
        columns = {name: (kind, modifier) for name, kind, modifier in listed}
        if len(columns) != len(listed) or GEOM in columns:
            twice = sorted({n for n, _, _ in listed if [m for m, _, _ in listed].count(n) > 1})
            raise SqlError(400, "the layer's columns must have distinct names, none of them "
                                f"{GEOM} (found twice: {', '.join(twice)[:200]})")
        geometry = tuple(sorted(name for name, (kind, _) in columns.items()
                                if kind in GEOMETRY_TYPES))
        if layer.geom_column not in columns:
            raise SqlError(400, f"column \"{layer.geom_column[:63]}\" does not exist in the "
                                f"layer's result (geom_column)")
        kind, modifier = columns[layer.geom_column]
        if kind != "geometry":
            raise SqlError(400, f"geom_column \"{layer.geom_column[:63]}\" is {kind}, not "
                                "geometry")
        properties = tuple((name, property_kind(kind)) for name, kind, _ in listed
                           if name not in geometry and name not in HIDDEN
                           and name != layer.geom_column)
        return LayerShape(typmod_srid(modifier) or default_srid(layer.geom_column), geometry,
                          properties)

    async def _read_relations(self, principal: Principal,
                              layer: MapLayer) -> set[tuple[str, str]]:
        async with await self.sql.start(principal, relations_probe(layer),
                                        params=[1]) as running:
            rows = [row async for row in running.rows()]
        plan = rows[0][0] if rows else None
        return _relations(orjson.loads(plan) if isinstance(plan, str) else plan)

    async def layergroup(self, user: User, token: str, lg_hash: str) -> Layergroup:
        """A stored layergroup (cached: a hash always names the same config); 404 if none.
        Once an hour per process it is read again (what a new creation refreshed: shapes,
        cache buster) and its use is marked."""
        cache_key = (user.id, lg_hash)
        cached = self._layergroups.get(cache_key)
        now = time.monotonic()
        if cached is not None and now - cached[1] < TOUCH_EVERY:
            return cached[0]
        self._layergroups.pop(cache_key)
        async with self.cluster.metadata() as conn:
            row = await layergroups.get(conn, user.id, lg_hash)
            if row is not None:
                await layergroups.touch(conn, user.id, lg_hash)
        if row is None:
            raise LayergroupNotFound(token)
        layergroup = Layergroup.made(
            user.id, lg_hash, from_canonical(row["config"]),
            tuple(LayerShape(int(s["srid"]), tuple(s["geometry_columns"]),
                             tuple((str(c), str(k)) for c, k in s.get("properties", [])))
                  for s in row["shapes"]), row["changed_at"], row["template"])
        self._layergroups.put(cache_key, (layergroup, now))
        return layergroup

    async def tile(self, principal: Principal, layergroup: Layergroup,
                   layers: tuple[MapLayer, ...], coord: TileCoord) -> bytes:
        """The tile's MVT bytes (empty: no feature), drawn as the key."""
        drawn = tuple(layer.index for layer in layers if layer.draws_at(coord.z))
        if not drawn:
            return b""
        query = join_tile([layergroup.parts[index] for index in drawn])
        async with await self.sql.start(principal, query,
                                        params=[coord.z, coord.x, coord.y]) as running:
            rows = [row async for row in running.rows()]
        data = rows[0][0] if rows else None
        return bytes(data) if data else b""

    def forget_user(self, user_id: str) -> None:
        self._layergroups.pop_where(lambda key: key[0] == user_id)

    async def expire(self) -> int:
        """Delete the layergroups unused for `idle_days` (a process that still caches one
        marks its use within the hour: one in use is never that idle)."""
        async with self.cluster.metadata() as conn:
            gone = await layergroups.expire(conn, self.idle_days)
        if gone:
            log.info("%d layergroups unused for %d days deleted", gone, self.idle_days)
        return gone

    async def expire_forever(self) -> None:
        """`expire`, now and every hour."""
        while True:
            try:
                await self.expire()
            except Exception as error:  # the database may be restarting: next time
                log.warning("expiring layergroups failed: %s", type(error).__name__)
            await asyncio.sleep(EXPIRE_EVERY)

