"""Pure timing decisions: send retry backoff, the poll schedule, Retry-After parsing."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

# Growth stops mattering long before this; beyond it a float power would overflow.
_MAX_EXPONENT = 64

# A poll task's hard time limit as a share of its claim's lease (worker/celery.py sets the
# limit, worker/flows/polling.py relies on it).
POLL_TIME_LIMIT_SHARE = 0.9


def send_retry_delay(
    attempts: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds before a failed send is tried again: exponential, with jitter in its upper half.

    `attempts` counts failures so far (1 after the first). The jitter spreads the retries
    of a whole failed batch so they do not come back as one burst.
    """
    ceiling = min(cap, base * 2 ** min(max(attempts - 1, 0), _MAX_EXPONENT))
    return (rng or random).uniform(ceiling / 2, ceiling)


def poll_interval(
    polls: int,
    *,
    first: float,
    factor: float,
    cap: float,
    jitter: float,
    min_gap: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the next status check of a message already polled `polls` times.

    0 polls: the first check, `first` seconds after submit; then ×`factor` per poll,
    ±`jitter`, capped at `cap`, and never under `min_gap` (the provider's 1 s rule).
    """
    base = min(cap, first * factor ** min(polls, _MAX_EXPONENT))
    spread = (rng or random).uniform(1 - jitter, 1 + jitter)
    return max(min_gap, min(cap, base * spread))


def poll_deadline(start: datetime, ttl: int | None, *, grace: float, max_age: float) -> datetime:
    """When a message still without a final status becomes `timeout`: TTL + grace, ≤ max_age."""
    life = max_age if ttl is None else min(max_age, ttl + grace)
    return start + timedelta(seconds=life)


def parse_retry_after(value: str | None, *, now: datetime, default: float, cap: float) -> float:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date."""
    if value is None or not value.strip():
        return default
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        if when.tzinfo is None:
            return default
        seconds = (when - now).total_seconds()
    if seconds != seconds:  # NaN
        return default
    return min(cap, max(0.0, seconds))
