"""Pacing shared by every worker process through Redis: rate limits and pauses.

A pause is a key with a time to live: a 429's Retry-After or an open circuit after a 401
stops every worker at once, and ends by itself. If Redis is flushed the pause is gone
and the next request simply probes the provider again, which is the safe direction.
"""

from __future__ import annotations

import time
from functools import lru_cache

import redis
from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

PREFIX = "cascade:pause:"
# Set the key for ARGV[1] ms unless it already has longer to live.
_EXTEND = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
"""


class Pacing:
    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._extend = self._redis.register_script(_EXTEND)
        self._limiter = SlidingWindowCounterRateLimiter(
            storage_from_string(redis_url, key_prefix="cascade:rate")
        )

    def pause(self, name: str, seconds: float) -> None:
        """Pause `name` for everyone for at least `seconds` (an existing longer pause stays).

        One script, so two workers pausing at once cannot let the shorter pause win.
        """
        self._extend(keys=[PREFIX + name], args=[max(1, int(seconds * 1000))])

    def paused_for(self, name: str) -> float:
        """Seconds left of a pause of `name`, 0 when there is none."""
        ms = self._redis.pttl(PREFIX + name)
        return ms / 1000 if ms and ms > 0 else 0.0

    def acquire(self, name: str, per_second: int, cost: int = 1) -> None:
        """Block until `cost` units of `name` fit in the shared per-second budget (0 = no limit)."""
        if per_second <= 0:
            return
        item = RateLimitItemPerSecond(per_second)
        while cost > 0:
            chunk = min(cost, per_second)
            while not self._limiter.hit(item, name, cost=chunk):
                reset = self._limiter.get_window_stats(item, name).reset_time
                time.sleep(min(1.0, max(0.01, reset - time.time())))
            cost -= chunk


@lru_cache(maxsize=2)
def get_pacing(redis_url: str) -> Pacing:
    return Pacing(redis_url)
