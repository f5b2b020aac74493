"""Pure timing decisions: send retry backoff, the poll schedule (fixed or learned from
recent latencies), Retry-After parsing."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
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
    return _jittered(base, jitter=jitter, cap=cap, min_gap=min_gap, rng=rng)


def _jittered(
    base: float, *, jitter: float, cap: float, min_gap: float, rng: random.Random | None
) -> float:
    """`base` ±`jitter`, kept between `min_gap` and `cap` (the poll schedules' one rule)."""
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


@dataclass(frozen=True, slots=True)
class CheckPlan:
    """Ages (seconds after submit) to check a message at, learned from its route's recent
    submit→final latencies: a check at the 80th percentile finds most messages final and
    one at the 99th nearly all, so a message costs little more than one check while each
    is found final soon after it is. Empty: too little is known, the fixed schedule runs."""

    ages: tuple[float, ...] = ()


# Too little known: the fixed schedule.
NO_PLAN = CheckPlan()


def learn_plan(
    latencies: Sequence[float], quantiles: Sequence[float], min_samples: int
) -> CheckPlan:
    """The plan whose ages are these `quantiles` of the latencies (upper bounds, as checks
    see them: conservative), once at least `min_samples` are known."""
    if len(latencies) < max(1, min_samples):
        return NO_PLAN
    ordered = sorted(latencies)
    last = len(ordered) - 1
    ages = {ordered[min(last, max(0, math.ceil(q * len(ordered)) - 1))] for q in quantiles}
    return CheckPlan(tuple(sorted(ages)))


def explores(pk: int, every: int) -> bool:
    """Whether a message is one of the few checked on a fine schedule to learn latencies
    from: the others' checks are timed by what these show, so they alone are unbiased."""
    return every > 0 and pk % every == 0


# An explored latency is kept only if the check before the final one was at most this many
# steps earlier: a check that ran late (workers behind) says only "final by now".
EXPLORE_SLACK = 1.5


def explored_latency(
    start: datetime, previous: datetime | None, final_seen: datetime, step: float
) -> float | None:
    """What an explorer found final at `final_seen` shows of its route's latency: the upper
    bound (conservative), if the check before it (or the start) was less than
    `EXPLORE_SLACK` steps earlier, so the bound is tight; else nothing. Learning from late
    checks would teach the plan the workers' own lag, and time checks later and later."""
    before = max(previous or start, start)
    if (final_seen - before).total_seconds() > EXPLORE_SLACK * step:
        return None
    return max(0.0, (final_seen - start).total_seconds())


# A message not final at the plan's last age is checked every step until this many times
# that age, then backs off: a plan learned early (from the fastest) ends short of the truth.
# At most this many steps, so a slow route's tail (a phone off for hours) costs few checks.
PAST_PLAN_FOLLOW = 1.5
PAST_PLAN_STEPS = 3


def learned_delay(
    age: float,
    plan: CheckPlan,
    *,
    explorer: bool,
    step: float,
    explore_until: float,
    factor: float,
    cap: float,
    jitter: float,
    min_gap: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds from a check made `age` s after submit to the next one, on a learned plan.

    An explorer is checked every `step` s (the provider's 5–10 s advice) up to
    `explore_until`; another message at the next age of the plan at least `min_gap` ahead.
    Past the plan (or the exploring), checks back off with the message's age: the next at
    age × `factor`, ±`jitter`, at most `cap` apart.
    """
    if explorer and age < explore_until:
        return max(min_gap, (math.floor(age / step) + 1) * step - age)
    ahead = [a for a in plan.ages if a >= age + min_gap]
    if ahead and not explorer:
        return ahead[0] - age
    if plan.ages and not explorer:
        last = plan.ages[-1]
        if age < min(PAST_PLAN_FOLLOW * last, last + PAST_PLAN_STEPS * step):
            return max(min_gap, step)
    base = max(age, min_gap) * (factor - 1)
    return _jittered(base, jitter=jitter, cap=cap, min_gap=min_gap, rng=rng)
