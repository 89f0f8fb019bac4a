"""CARTO's pagination `_links` for list answers."""

from __future__ import annotations

from math import ceil
from typing import Any

from starlette.datastructures import URL


def pagination_links(url: URL, page: int, per_page: int, total: int) -> dict[str, Any]:
    """first/last always; prev if page > 1; next if page < last. Never echoes `api_key`."""
    last = max(1, ceil(total / per_page))
    base = url.remove_query_params("api_key")

    def link(number: int) -> dict[str, str]:
        return {"href": str(base.include_query_params(page=number, per_page=per_page))}

    links: dict[str, Any] = {"first": link(1), "last": link(last)}
    if page > 1:
        links["prev"] = link(min(page - 1, last))
    if page < last:
        links["next"] = link(page + 1)
    return links
