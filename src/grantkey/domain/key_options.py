"""What a regular key's creator may choose besides its name and grants (its expiry, a
SQL time limit and a rate limit of its own), and a regeneration's grace for the old token: read from the
Auth API's JSON, each mistake a validation message in CARTO's style."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from grantkey.domain.rate_limits import Rate, read_rate_limit
from grantkey.domain.restrictions import Restrictions, read_restrictions

LIMIT_NAMES = ("sql_timeout_seconds",)
EXPIRY_FORMAT = ("Expires at must be a date and time in ISO 8601 with its time zone, "
                 "e.g. 2027-01-31T12:00:00Z")


@dataclass(frozen=True)
class KeyOptions:
    expires_at: datetime | None = None
    sql_timeout: float | None = None
    rate_limit: Rate | None = None
    restrictions: Restrictions | None = None


@dataclass(frozen=True)
class OptionRules:
    """The server's bounds (settings): days an expiry may lie ahead (0: any), whether one is
    required, and the SQL time limit of a regular key (a key's own may only be lower)."""

    max_lifetime_days: int = 0
    require_expiry: bool = False
    sql_timeout: float = math.inf


def read_options(body: Mapping[str, Any], now: datetime,
                 rules: OptionRules) -> tuple[KeyOptions, list[str]]:
    """The options in a create request's body, and what is wrong with them."""
    expires_at, problems = _expiry(body.get("expires_at"), now, rules)
    sql_timeout, limit_problems = _limits(body.get("limits"), rules.sql_timeout)
    rate, rate_problems = read_rate_limit(body.get("rate_limit"))
    restrictions, where_problems = read_restrictions(body.get("restrictions"))
    return (KeyOptions(expires_at, sql_timeout, rate, restrictions),
            problems + limit_problems + rate_problems + where_problems)


def _expiry(raw: object, now: datetime, rules: OptionRules) -> tuple[datetime | None, list[str]]:
    if raw is None:
        if rules.require_expiry:
            return None, ["Expires at can't be blank: this server requires every new key "
                          "to expire"]
        return None, []
    moment = parse_moment(raw)
    if moment is None:
        return None, [EXPIRY_FORMAT]
    if moment <= now:
        return None, ["Expires at must be in the future"]
    days = rules.max_lifetime_days
    if days and moment > now + timedelta(days=days):
        return None, [f"Expires at must be within {days} days from now (this server's "
                      "longest key lifetime)"]
    return moment, []


def parse_moment(raw: object) -> datetime | None:
    """An ISO 8601 date and time with its offset (`Z` too), or None."""
    if not isinstance(raw, str) or not 10 <= len(raw) <= 64:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        return None
    try:
        moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-12:00 is past the last moment Python knows
        return None
    return moment


def _limits(raw: object, server_limit: float) -> tuple[float | None, list[str]]:
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        return None, ['Limits must be an object, e.g. {"sql_timeout_seconds": 5}']
    unknown = sorted(str(name)[:64] for name in raw if name not in LIMIT_NAMES)
    if unknown:
        return None, [f"Limits has no option {', '.join(unknown)} (known: "
                      f"{', '.join(LIMIT_NAMES)})"]
    value = raw.get("sql_timeout_seconds")
    if value is None:
        return None, []
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 < value <= server_limit):
        return None, ["Limits sql_timeout_seconds must be a number of seconds above 0 and "
                      f"at most {server_limit:g} (this server's limit for a regular key)"]
    return float(value), []


def read_grace(body: object, max_grace: int) -> tuple[int, list[str]]:
    """A regeneration's `grace_seconds` (0 without a body: CARTO's immediate behaviour)."""
    if body is None or body == {} or body == b"":
        return 0, []
    if not isinstance(body, dict):
        return 0, ["The request body must be a JSON object, e.g. {\"grace_seconds\": 3600}"]
    value = body.get("grace_seconds", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_grace:
        return 0, [grace_message(max_grace)]
    return value, []


def grace_message(max_grace: int) -> str:
    return (f"Grace seconds must be a whole number from 0 to {max_grace} (this server's "
            "longest grace)")


_DURATION = re.compile(r"([0-9]{1,7})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
MAX_DURATION_SECONDS = 36_600 * 86_400.0  # a century: further back than any key


def parse_duration(text: str) -> float | None:
    """`30d`, `12h`, `90m`, `3600s` in seconds; None if it is not one."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        return None
    seconds = float(int(found.group(1)) * _UNIT_SECONDS[found.group(2)])
    return seconds if seconds <= MAX_DURATION_SECONDS else None
