"""Reading a request's parameters: query string and body (JSON, form, multipart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request

from grantkey.domain.numbers import strict_int
from grantkey.errors import BadInput, PayloadTooLarge


@dataclass
class Params:
    query: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)
    json_body: Any = None

    def get(self, name: str) -> Any:
        """Body wins over the query string (CARTO's rule for the SQL API)."""
        if name in self.body:
            return self.body[name]
        return self.query.get(name)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    size_declared = strict_int(declared) if declared else None
    if size_declared is not None and size_declared > limit:
        raise PayloadTooLarge(f"Request body too large: the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body too large: the limit is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def header(request: Request, name: bytes) -> str | None:
    """One header's first value, straight from the ASGI scope (names come lowercased):
    cheaper than Starlette's `Headers`, which is built and searched for each look-up."""
    for key, value in request.scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


async def read_params(request: Request, body_limit: int, *, read_body: bool = True) -> Params:
    # what Starlette's QueryParams holds, as a plain dict (the last of repeated names wins)
    query = request.scope["query_string"].decode("latin-1")
    params = Params(query=dict(parse_qsl(query, keep_blank_values=True)))
    if request.method in ("GET", "HEAD", "OPTIONS", "DELETE") or not read_body:
        return params
    raw = await _read_body(request, body_limit)
    if not raw:
        return params
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in ("application/x-www-form-urlencoded", "multipart/form-data"):
        params.body = await _form(request, raw)
        return params
    try:
        params.json_body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadInput("The request body is not valid JSON") from None
    if isinstance(params.json_body, dict):
        params.body = params.json_body
    return params


async def _form(request: Request, raw: bytes) -> dict[str, Any]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as error:  # the multipart parser raises several kinds
        raise BadInput(f"The request body is not a valid form: {error}") from None
    try:
        return {key: value for key, value in form.items() if not isinstance(value, UploadFile)}
    finally:
        await form.close()  # an uploaded file's spooled temporary file: not left to the GC
