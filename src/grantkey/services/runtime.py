"""Building the services from settings: the admin URL and the server secret."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from grantkey.errors import SetupError
from grantkey.settings import Settings

SECRET_FILE = "secret"  # noqa: S105 - a file name


def load_secret(settings: Settings) -> bytes:
    """GRANTKEY_SECRET, or the data directory's `secret` file (created 0600 on first use)."""
    if settings.secret:
        raw = settings.secret.encode("utf-8")
        if len(raw) < 32:
            raise SetupError("GRANTKEY_SECRET must be at least 32 characters")
        return raw
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    if path.stat().st_mode & 0o077:
        raise SetupError(f"{path} must be readable by its owner only (chmod 600)")
    value = path.read_text().strip().encode("utf-8")
    if len(value) < 32:
        raise SetupError(f"{path} holds a secret shorter than 32 characters")
    return value
