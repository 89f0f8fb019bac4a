"""The one parser for integers clients send (query parameters, headers)."""

from __future__ import annotations

import re

# ASCII digits only: str.isdigit() also accepts "²" or "٣", which int() then refuses
_INTEGER = re.compile(r"\s*(-?[0-9]{1,18})\s*")


def strict_int(text: str) -> int | None:
    """The integer `text` spells in ASCII digits (optional sign, surrounding spaces), else
    None."""
    match = _INTEGER.fullmatch(text)
    return None if match is None else int(match.group(1))
