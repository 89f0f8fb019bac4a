"""Tile tokens: what a layergroup's tile URLs carry instead of the key that made it.

A tile token is the key's token sealed (AES-256-GCM, a key derived for this use only) with
the user and the layergroup as associated data: it opens only on that layergroup's tiles,
and what it opens to is resolved and logged in with exactly as the key itself, so it dies
the instant the key is deleted or regenerated. Nothing is stored: the token carries all.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag

from grantkey.domain.secrets_box import SecretBox
from grantkey.errors import Unauthorized
from grantkey.services.lru import Lru

PREFIX = "gkt"  # not a key token's shape (`gk` + m|r + 38 base62 characters)
MAX_LENGTH = 200


def is_tile_token(credential: str) -> bool:
    return credential.startswith(PREFIX)


def _scope(user_id: str, layergroup: str) -> bytes:
    return b"grantkey tile token\0" + user_id.encode() + b"\0" + layergroup.encode()


def _text(sealed: bytes) -> str:
    return base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")


class TileTokens:
    def __init__(self, box: SecretBox, cache_size: int = 10_000) -> None:
        self.box = box
        # opened tokens (a tile map asks for many tiles with one): what opens is still
        # resolved and logged in with as the key on every request, so a revoked key's
        # entry opens to a refused token
        self._opened: Lru[tuple[str, str, str], str] = Lru(cache_size)

    def issue(self, user_id: str, layergroup: str, token: str) -> str:
        return PREFIX + _text(self.box.seal_tile_token(token, _scope(user_id, layergroup)))

    def open(self, user_id: str, layergroup: str | None, credential: str) -> str:
        """The key's token inside a tile token of this user's `layergroup`; 401 for any
        other (another layergroup or user, a changed character, no layergroup: not a tile)."""
        if layergroup is None or len(credential) > MAX_LENGTH:
            raise Unauthorized("a tile token outside its layergroup's tiles")
        cache_key = (user_id, layergroup, credential)
        opened = self._opened.get(cache_key)
        if opened is None:
            opened = self._open(user_id, layergroup, credential)
            self._opened.put(cache_key, opened)
        return opened

    def forget_all(self) -> None:
        """After a revocation: no revoked key's token stays in this process's memory here
        (hygiene: it would open to a refused token anyway). Revocations are rare."""
        self._opened.clear()

    def _open(self, user_id: str, layergroup: str, credential: str) -> str:
        body = credential[len(PREFIX):]
        try:
            sealed = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_",
                                      validate=True)
            if _text(sealed) != body:  # one spelling only: no `+`, `/`, padding or spare bits
                raise ValueError("not the canonical text")
            return self.box.open_tile_token(sealed, _scope(user_id, layergroup))
        except (binascii.Error, ValueError, InvalidTag):
            raise Unauthorized("a tile token of another layergroup, or altered") from None
