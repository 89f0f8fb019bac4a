"""The CLI's one helper that walks a paged listing: every item once, in order, stopping at
the total or at an empty page (a listing that shrank meanwhile)."""

from __future__ import annotations

import asyncio

from grantkey.cli.common import every_page


def walk(items: list[int], size: int, claimed_total: int | None = None) -> tuple[list[int], list[int]]:
    asked: list[int] = []

    async def fetch(page: int) -> tuple[list[int], int]:
        asked.append(page)
        batch = items[(page - 1) * size:page * size]
        return batch, len(items) if claimed_total is None else claimed_total

    return asyncio.run(every_page(fetch)), asked


def test_every_item_once_in_order_and_no_page_past_the_total() -> None:
    assert walk(list(range(2500)), 1000) == (list(range(2500)), [1, 2, 3])
    assert walk(list(range(2000)), 1000) == (list(range(2000)), [1, 2])
    assert walk([], 1000) == ([], [1])


def test_a_listing_that_shrank_meanwhile_stops_at_the_first_empty_page() -> None:
    assert walk(list(range(1500)), 1000, claimed_total=5000) == (list(range(1500)), [1, 2, 3])
