"""Named checkpoints inside multi-step operations, so tests can inject a failure at each.

Production code calls `checkpoint(name)`; it does nothing unless a test armed that name
(an exception), or the process runs with GRANTKEY_CRASH_AT=<name> (the process kills
itself there with SIGKILL, as a crash would: crash-safety tests use it).
"""

from __future__ import annotations

import os
import signal

CRASH_VARIABLE = "GRANTKEY_CRASH_AT"
_armed: set[str] = set()


class InjectedFault(RuntimeError):
    pass


def checkpoint(name: str) -> None:
    if name in _armed:
        raise InjectedFault(f"fault injected at {name}")
    if os.environ.get(CRASH_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(name: str) -> None:
    _armed.add(name)


def disarm_all() -> None:
    _armed.clear()
