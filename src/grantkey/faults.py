"""Named checkpoints inside multi-step operations, so tests can inject a failure at each.

Production code calls `checkpoint(name)`; it does nothing unless a test armed that name.
"""

from __future__ import annotations

_armed: set[str] = set()


class InjectedFault(RuntimeError):
    pass


def checkpoint(name: str) -> None:
    if name in _armed:
        raise InjectedFault(f"fault injected at {name}")


def arm(name: str) -> None:
    _armed.add(name)


def disarm_all() -> None:
    _armed.clear()
