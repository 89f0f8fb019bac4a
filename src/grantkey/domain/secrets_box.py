"""Everything derived from the server secret: token encryption and role passwords.

The server secret never reaches PostgreSQL. Role passwords are HMAC(secret, role, token):
only someone holding both the secret and the token can log in as a key's role, and
PostgreSQL only ever sees a SCRAM verifier computed here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Iterations slow down guessing a weak password from a stolen verifier. Role passwords are
# 256-bit HMAC outputs, beyond guessing at any count, while libpq repeats the iterations at
# every login, in the server's event loop: 4,096 cost ~4 ms of CPU per login here, 16 cost
# ~0.1 ms (see docs/security.md).
SCRAM_ITERATIONS = 16
_NONCE_BYTES = 12


class SecretBox:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the server secret must be at least 32 bytes")
        self._encryption_key = hmac.new(secret, b"grantkey token encryption", "sha256").digest()
        self._password_key = hmac.new(secret, b"grantkey role password", "sha256").digest()
        self._aead = AESGCM(self._encryption_key)
        self._tile_aead = AESGCM(hmac.new(secret, b"grantkey tile token", "sha256").digest())

    def encrypt_token(self, token: str, associated: bytes) -> bytes:
        """AES-256-GCM; `associated` binds the ciphertext to its key row."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, token.encode("utf-8"), associated)

    def decrypt_token(self, sealed: bytes, associated: bytes) -> str:
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        return self._aead.decrypt(nonce, ciphertext, associated).decode("utf-8")

    def seal_tile_token(self, token: str, scope: bytes) -> bytes:
        """A key's token sealed for one layergroup's tiles (`scope`: user and layergroup),
        under a key of its own (not the stored tokens' key)."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._tile_aead.encrypt(nonce, token.encode("utf-8"), scope)

    def open_tile_token(self, sealed: bytes, scope: bytes) -> str:
        """The key's token; `cryptography.exceptions.InvalidTag` for another scope or a
        changed byte."""
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        return self._tile_aead.decrypt(nonce, ciphertext, scope).decode("utf-8")

    def _grace_aead(self, old_token: str) -> AESGCM:
        return AESGCM(hmac.new(self._password_key, b"grantkey grace\x00" + old_token.encode(),
                               "sha256").digest())

    def seal_for_old_token(self, password: str, old_token: str, associated: bytes) -> bytes:
        """A regenerated key's new role password, which only the old token (with the
        secret) opens: during a grace the old token logs in as the role, while the server
        alone, holding neither token, still cannot."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._grace_aead(old_token).encrypt(nonce, password.encode(), associated)

    def open_with_old_token(self, sealed: bytes, old_token: str, associated: bytes) -> str:
        """`cryptography.exceptions.InvalidTag` for another token, row or a changed byte."""
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        return self._grace_aead(old_token).decrypt(nonce, ciphertext, associated).decode()

    def role_password(self, role: str, token: str) -> str:
        message = role.encode("utf-8") + b"\x00" + token.encode("utf-8")
        return hmac.new(self._password_key, message, "sha256").hexdigest()


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """A PostgreSQL SCRAM-SHA-256 verifier, so the password itself never reaches the server."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
