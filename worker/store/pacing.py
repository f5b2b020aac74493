"""Pacing shared by every worker process through Redis: rate limits, pauses, the circuit,
and the latencies that time status checks.

A pause is a key with a time to live: a 429's Retry-After or an open circuit (a 401, or
an outage) stops every worker at once, and ends by itself. After an outage's pause the
circuit is half-open: one worker at a time sends a small probe until the provider answers.
If Redis is flushed all of this is gone and the next request simply probes the provider
again, which is the safe direction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import lru_cache

import redis
from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from config import Settings
from worker.core.backoff import NO_PLAN, CheckPlan, learn_plan
from worker.core.sendpolicy import learn_every

PREFIX = "cascade:pause:"
FAILURES = "cascade:failures:"
HALF_OPEN = "cascade:half-open:"
PROBE = "cascade:probe:"
# Consecutive failures further apart than this are not one outage.
FAILURE_MEMORY_MS = 600_000
# A circuit opened by an outage stays half-open until answered, or this long at most.
HALF_OPEN_MS = 24 * 3600 * 1000
LATENCIES = "cascade:latencies:"
# Latencies kept per route: enough for a 99th percentile, few enough to read per batch.
LATENCY_SAMPLES = 1000
LATENCY_MEMORY_S = 24 * 3600
# Set the key for ARGV[1] ms unless it already has longer to live.
_EXTEND = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
"""


class Pacing:
    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._extend = self._redis.register_script(_EXTEND)
        self._limiter = SlidingWindowCounterRateLimiter(
            storage_from_string(redis_url, key_prefix="cascade:rate")
        )

    def pause(self, name: str, seconds: float, reason: str = "paused") -> None:
        """Pause `name` for everyone for at least `seconds` (an existing longer pause stays,
        with its reason). One script, so two workers pausing at once cannot let the shorter
        pause win."""
        self._extend(keys=[PREFIX + name], args=[max(1, int(seconds * 1000)), reason])

    def pause_reason(self, name: str) -> str | None:
        """Why `name` is paused (what the pause was given), None when it is not."""
        value = self._redis.get(PREFIX + name)
        return value.decode(errors="replace") if isinstance(value, bytes) else None

    def paused_for(self, name: str) -> float:
        """Seconds left of a pause of `name`, 0 when there is none."""
        ms = self._redis.pttl(PREFIX + name)
        return ms / 1000 if ms and ms > 0 else 0.0

    def failed(self, name: str) -> int:
        """Count one more provider failure of `name` in a row; answer the count."""
        pipe = self._redis.pipeline()
        pipe.incr(FAILURES + name)
        pipe.pexpire(FAILURES + name, FAILURE_MEMORY_MS)
        count, _ = pipe.execute()
        return int(count)

    def open_circuit(self, name: str, seconds: float, reason: str = "circuit open") -> None:
        """Pause `name` for `seconds`, then let only probes through until it is answered."""
        self.pause(name, seconds, reason)
        pipe = self._redis.pipeline()
        pipe.set(HALF_OPEN + name, "1", px=HALF_OPEN_MS)
        pipe.delete(PROBE + name)
        pipe.execute()

    def half_open(self, name: str) -> bool:
        return bool(self._redis.exists(HALF_OPEN + name))

    def take_probe(self, name: str, seconds: float) -> bool:
        """Whether this worker sends the probe: one at a time, for at most `seconds`."""
        return bool(self._redis.set(PROBE + name, "1", nx=True, px=max(1, int(seconds * 1000))))

    def release_probe(self, name: str) -> None:
        self._redis.delete(PROBE + name)

    def answered(self, name: str) -> None:
        """The provider answered: the failure count, half-open state and probe are over."""
        self._redis.delete(FAILURES + name, HALF_OPEN + name, PROBE + name)

    def note_latencies(self, route: str, seconds: Sequence[float]) -> None:
        """Remember what explored checks showed: the newest LATENCY_SAMPLES of a route."""
        if not seconds:
            return
        key = LATENCIES + route
        pipe = self._redis.pipeline(transaction=False)
        pipe.lpush(key, *(f"{value:.3f}" for value in seconds))
        pipe.ltrim(key, 0, LATENCY_SAMPLES - 1)
        pipe.expire(key, LATENCY_MEMORY_S)
        pipe.execute()

    def check_plan(self, route: str, settings: Settings) -> CheckPlan:
        """The route's check plan from the latencies noted (none while learning is off)."""
        if not learn_every(settings):
            return NO_PLAN
        values = self._redis.lrange(LATENCIES + route, 0, -1)
        return learn_plan(
            [float(v) for v in values],
            settings.poll_learn_quantiles,
            settings.poll_learn_min_samples,
        )

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
