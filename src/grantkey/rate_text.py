"""A rate limit written as text (the settings' REQUESTS/SECONDS[/BURST]), checked: below
the layers, so that `settings` can refuse a bad one by its variable's name."""

from __future__ import annotations

MAX_PER_SECONDS = 86_400.0
MAX_REQUESTS = 1_000_000_000
MAX_PER_SECOND = 1_000_000  # one request a microsecond: finer, the clocks cannot tell


def rate_parts(text: str) -> tuple[int, float, int] | None:
    """(requests, seconds, burst) of `REQUESTS/SECONDS[/BURST]` (e.g. `100/60/20`); empty
    or `0`: None. ValueError says what is wrong."""
    text = text.strip()
    if text in ("", "0"):
        return None
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"must be REQUESTS/SECONDS or REQUESTS/SECONDS/BURST, not {text[:40]!r}")
    try:
        requests, per = int(parts[0]), float(parts[1])
        burst = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ValueError("must be whole REQUESTS, SECONDS and BURST numbers, not "
                         f"{text[:40]!r}") from None
    problem = rate_problem(requests, per, burst)
    if problem:
        raise ValueError(problem)
    return requests, per, burst


def rate_problem(requests: int, per: float, burst: int) -> str | None:
    if not 1 <= requests <= MAX_REQUESTS:
        return f"requests must be from 1 to {MAX_REQUESTS}"
    if not 0 < per <= MAX_PER_SECONDS:
        return f"per must be a number of seconds above 0 and at most {MAX_PER_SECONDS:g}"
    if not 0 <= burst <= MAX_REQUESTS:
        return f"burst must be from 0 to {MAX_REQUESTS}"
    if requests / per > MAX_PER_SECOND:
        return f"may allow at most {MAX_PER_SECOND} requests per second"
    return None
