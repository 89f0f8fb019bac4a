"""Token format: `gk` + type letter + 32 random base62 characters + 6-char base62 CRC32.

A scanner can match `gk[mr][0-9A-Za-z]{38}` and reject false positives by the checksum.
The default public key's token is the literal `default_public`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_PUBLIC_TOKEN = "default_public"  # noqa: S105 - public by design
PREFIX = "gk"
RANDOM_LENGTH = 32  # 32 * log2(62) ≈ 190 random bits
CHECKSUM_LENGTH = 6
TOKEN_LENGTH = len(PREFIX) + 1 + RANDOM_LENGTH + CHECKSUM_LENGTH
TYPE_LETTERS = {"master": "m", "regular": "r"}


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(BASE62[remainder])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def new_token(key_type: str) -> str:
    """A fresh secret token for a `master` or `regular` key."""
    body = PREFIX + TYPE_LETTERS[key_type]
    body += "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))
    return body + checksum(body)


def is_well_formed(token: str) -> bool:
    """True for the default public token and for tokens whose checksum matches."""
    if token == DEFAULT_PUBLIC_TOKEN:
        return True
    if len(token) != TOKEN_LENGTH or not token.startswith(PREFIX):
        return False
    if token[2] not in TYPE_LETTERS.values() or any(c not in BASE62 for c in token):
        return False
    body, check = token[:-CHECKSUM_LENGTH], token[-CHECKSUM_LENGTH:]
    return hmac.compare_digest(checksum(body), check)


def digest(token: str) -> bytes:
    """The SHA-256 digest tokens are looked up by."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
