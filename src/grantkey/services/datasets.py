"""Datasets: table privacy (public/link/private) and the metadata listing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from grantkey.db import datasets as dataset_store
from grantkey.db.cluster import AdminConnection, Cluster
from grantkey.db.failures import CLEANUP_ERRORS, is_lock_conflict
from grantkey.domain import names
from grantkey.domain.keys import PRIVACIES, KeyType, Principal, User
from grantkey.errors import BadInput, DatabaseUnavailable, Forbidden, NotFound
from grantkey.services.events import CLI, OPERATOR, Actor, Events, PrivacyChanged

PRIVACY_ATTEMPTS = 8


@dataclass(frozen=True)
class DatasetPage:
    total: int
    datasets: list[dict[str, Any]]


def _document(row: dict[str, Any]) -> dict[str, Any]:
    updated = row["updated_at"]
    return {"schema": row["schema"], "name": row["name"], "privacy": row["privacy"],
            "updated_at": updated.strftime("%Y-%m-%d %H:%M:%S +0000") if updated else None,
            "mode": row["mode"]}


class DatasetService:
    def __init__(self, cluster: Cluster, events: Events) -> None:
        self.cluster = cluster
        self.events = events

    async def list(self, principal: Principal, page: int, per_page: int) -> DatasetPage:
        if not (principal.is_master or (principal.key.type is KeyType.REGULAR
                                        and principal.key.table_metadata)):
            raise Forbidden("This key cannot list datasets: it needs the master key or a key "
                            "created with table_metadata")
        async with self.cluster.user_database(principal.user.database) as conn:
            total, rows = await dataset_store.list_datasets(
                conn, public_role=principal.user.public_role, caller=principal.key.role,
                limit=per_page, offset=(page - 1) * per_page)
        return DatasetPage(total, [_document(row) for row in rows])

    async def set_privacy(self, principal: Principal, schema: str, name: str,
                          privacy: object, *, client: str = CLI) -> dict[str, Any]:
        if not principal.is_master:
            raise Forbidden("Only the master key can change a dataset's privacy")
        if privacy not in PRIVACIES:
            raise BadInput("Wrong 'privacy' value. Valid values are one of "
                           + json.dumps(list(PRIVACIES)))
        return await self.change_privacy(principal.user, schema, name, str(privacy),
                                         actor=Actor.of(principal, client))

    async def change_privacy(self, user: User, schema: str, name: str, privacy: str, *,
                             actor: Actor = OPERATOR) -> dict[str, Any]:
        """The privacy of a table and of the tables inheriting from it, in the user's
        database; its event in a metadata transaction that commits right after.

        Two changes granting on one catalog row at once (the schema's, the table's): the
        second fails with "tuple concurrently updated" once the first commits (it answered
        500). It is tried again (each attempt all or nothing, and at least one of the
        changes racing in a round commits); after the last, 503 "try again shortly"."""
        for attempt in range(PRIVACY_ATTEMPTS):
            try:
                return await self._change_privacy(user, schema, name, privacy, actor)
            except CLEANUP_ERRORS as error:
                if not is_lock_conflict(error):
                    raise
                if attempt == PRIVACY_ATTEMPTS - 1:
                    raise DatabaseUnavailable(
                        "The table's privileges are being changed by another request; "
                        "try again shortly") from error
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _change_privacy(self, user: User, schema: str, name: str, privacy: str,
                              actor: Actor) -> dict[str, Any]:
        """One attempt.

        The metadata connection is taken only once the change is made: the change waits on
        locks any client of the user may hold (its table's catalog row), and a shared
        metadata connection held meanwhile would let one tenant's stalled changes exhaust
        the pool other tenants' revocations need."""
        async with contextlib.AsyncExitStack() as after_user_commit, \
                self.cluster.user_database(user.database) as conn:
            table_oid = await dataset_store.find_table(conn, schema, name)
            if table_oid is None:
                raise NotFound(f"Dataset not found: {schema}.{name}")
            parent = await dataset_store.parent_of(conn, table_oid)
            if parent is not None:
                raise BadInput(
                    f"{schema}.{name} inherits from (or is a partition of) {parent}: privacy "
                    f"applies to a whole inheritance tree, so change the privacy of its root")
            previous = await self._privacy_of(conn, user, table_oid)
            # reading a parent reads its children's rows: the whole tree shares the privacy
            reader = names.reader_role(user.id)
            await dataset_store.set_privacy(conn, table_oid, schema, name, privacy, reader)
            children = await dataset_store.descendants(conn, table_oid)
            for child in children:
                await dataset_store.set_privacy(conn, int(child["oid"]), child["schema"],
                                                child["name"], privacy, reader)
            changed = PrivacyChanged(user, actor, schema=schema, table=name, privacy=privacy,
                                     previous=previous, tables=1 + len(children))
            # entered last, left after the user database's commit (a failed commit there
            # rolls the event back): never an event without its change
            meta = await after_user_commit.enter_async_context(self.cluster.metadata())
            await self.events.record(meta, changed)
            _, rows = await dataset_store.list_datasets(
                conn, public_role=user.public_role, caller=user.owner_role, limit=1, offset=0,
                table_oid=table_oid)
        await self.events.deliver(changed)
        return _document(rows[0])

    async def _privacy_of(self, conn: AdminConnection, user: User, table_oid: int) -> str:
        _, rows = await dataset_store.list_datasets(
            conn, public_role=user.public_role, caller=user.owner_role, limit=1, offset=0,
            table_oid=table_oid)
        return str(rows[0]["privacy"]) if rows else "private"
