"""Rate limits: a rate, the decision on one request, and the algorithm deciding it.

The generic cell rate algorithm (GCRA), as CARTO's redis-cell runs it: a bucket is one
number, its theoretical arrival time (TAT). A rate of `requests` per `per` seconds spaces
requests `per / requests` seconds apart (the emission interval); `burst` more may come at
once. The decision carries what CARTO's headers say: the limit (`burst + 1`), the requests
left now, the seconds until one more is allowed (on a refusal) and until the bucket is full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from grantkey.rate_text import rate_parts, rate_problem


@dataclass(frozen=True)
class Rate:
    requests: int
    per: float  # seconds
    burst: int = 0
    # worked out once (every request's decision reads them): the seconds between two
    # requests, and how far ahead of now a bucket's TAT may be
    emission: float = field(init=False, repr=False, compare=False)
    tolerance: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        emission = self.per / self.requests
        object.__setattr__(self, "emission", emission)
        object.__setattr__(self, "tolerance", emission * (self.burst + 1))

    @property
    def limit(self) -> int:
        return self.burst + 1

    def __str__(self) -> str:
        return f"{self.requests}/{self.per:g}/{self.burst}"

    def describe(self) -> str:
        return f"{self.requests} requests per {self.per:g} s (burst {self.burst})"

    def document(self) -> dict[str, Any]:
        return {"requests": self.requests, "per": _number(self.per), "burst": self.burst}


class Decision(NamedTuple):  # a tuple: made on every request, cheaper than a dataclass
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until one more is allowed; -1 when allowed
    reset_after: float  # seconds until the bucket is full again
    taken: int = 1  # requests taken at once (a process's lease, `services/rate_leases.py`)

    def headers(self) -> dict[str, str]:
        """CARTO's headers (integers: the SDK reads them with int()); Retry-After only on
        a refusal."""
        headers = {"Carto-Rate-Limit-Limit": str(self.limit),
                   "Carto-Rate-Limit-Remaining": str(self.remaining),
                   "Carto-Rate-Limit-Reset": str(math.ceil(self.reset_after))}
        if not self.allowed:
            headers["Retry-After"] = str(max(math.ceil(self.retry_after), 1))
        return headers

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` as an answer's raw header lines (an allowed request's: on the hot
        path, so built straight away)."""
        return [(b"carto-rate-limit-limit", b"%d" % self.limit),
                (b"carto-rate-limit-remaining", b"%d" % self.remaining),
                (b"carto-rate-limit-reset", b"%d" % math.ceil(self.reset_after))]


def gcra(tat: float | None, now: float, rate: Rate,
         count: int = 1) -> tuple[float | None, Decision]:
    """The decision on `count` requests at once at `now` for a bucket whose TAT is `tat`
    (None: a new or forgotten bucket), and the TAT to store (None: unchanged, on a refusal).
    A TAT further ahead than the rate allows (a clock that went back) counts as a full
    bucket's."""
    emission, tolerance = rate.emission, rate.tolerance
    if tat is None or tat < now or tat > now + tolerance + emission:
        tat = now
    new_tat = tat + emission * count
    wait = (new_tat - tolerance) - now
    if wait > 0:
        ttl = tat - now
        return None, Decision(False, rate.burst + 1, _remaining(tolerance - ttl, emission),
                              wait, ttl, 0)
    ttl = new_tat - now
    return new_tat, Decision(True, rate.burst + 1, _remaining(tolerance - ttl, emission), -1,
                             ttl, count)


def gcra_up_to(tat: float | None, now: float, rate: Rate,
               count: int) -> tuple[float | None, Decision]:
    """`count` requests at once if the bucket has room for them, else one (its decision)."""
    new_tat, decision = gcra(tat, now, rate, count)
    if new_tat is None and count > 1:
        return gcra(tat, now, rate, 1)
    return new_tat, decision


def _remaining(room: float, emission: float) -> int:
    # a hair of float rounding must not take a whole request away
    left = int(room / emission + 1e-9)
    return left if left > 0 else 0


def stricter(first: Decision | None, second: Decision | None) -> Decision | None:
    """The decision to report when two buckets applied: the refusal, else fewer left."""
    if first is None or second is None:
        return first or second
    if first.allowed != second.allowed:
        return second if first.allowed else first
    return first if first.remaining <= second.remaining else second


def parse_rate(text: str) -> Rate | None:
    """A setting's `REQUESTS/SECONDS[/BURST]` (e.g. `100/60/20`); empty or `0`: none.
    ValueError says what is wrong."""
    parts = rate_parts(text)
    return None if parts is None else Rate(*parts)


def read_rate_limit(raw: object) -> tuple[Rate | None, list[str]]:
    """A key's `rate_limit` ({"requests": N, "per": seconds, "burst": B}), and what is
    wrong with it."""
    if raw is None:
        return None, []
    example = '{"requests": 100, "per": 60, "burst": 10}'
    if not isinstance(raw, dict):
        return None, [f"Rate limit must be an object, e.g. {example}"]
    unknown = sorted(str(name)[:64] for name in raw if name not in ("requests", "per", "burst"))
    if unknown:
        return None, [f"Rate limit has no option {', '.join(unknown)} (known: requests, per, burst)"]
    requests, per, burst = raw.get("requests"), raw.get("per"), raw.get("burst", 0)
    if not _whole(requests) or not _number_ok(per) or not _whole(burst):
        return None, [f"Rate limit needs whole requests and burst and a number of seconds per, "
                      f"e.g. {example}"]
    assert isinstance(requests, int) and isinstance(per, int | float) and isinstance(burst, int)
    problem = rate_problem(requests, float(per), burst)
    return (None, [f"Rate limit {problem}"]) if problem else (Rate(requests, float(per), burst), [])


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_ok(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def rate_from_document(document: object) -> Rate | None:
    """A stored rate limit (jsonb), or None."""
    if not isinstance(document, dict):
        return None
    return Rate(int(document["requests"]), float(document["per"]), int(document.get("burst", 0)))


def _number(value: float) -> float | int:
    return int(value) if value.is_integer() else value
