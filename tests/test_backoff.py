"""Pure timing decisions (worker/core/backoff.py): retry delays, poll schedule, Retry-After."""

from __future__ import annotations

import itertools
import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.backoff import parse_retry_after, poll_deadline, poll_interval, send_retry_delay

pytestmark = pytest.mark.unit

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)

# --- send_retry_delay ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "ceiling"),
    [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (20, 30.0)],
)
def test_send_retry_delay_in_upper_half_of_the_ceiling(attempts: int, ceiling: float) -> None:
    rng = random.Random(7)
    draws = [send_retry_delay(attempts, base=2.0, cap=30.0, rng=rng) for _ in range(500)]
    assert all(ceiling / 2 <= d <= ceiling for d in draws)
    # jittered, not a constant, and spread over the half range
    assert max(draws) - min(draws) > ceiling / 4


def test_send_retry_delay_grows_exponentially_until_the_cap() -> None:
    rng = random.Random(1)
    means = [
        sum(send_retry_delay(a, base=1.0, cap=1000.0, rng=rng) for _ in range(200)) / 200
        for a in range(1, 6)
    ]
    for lower, higher in itertools.pairwise(means):
        assert higher == pytest.approx(2 * lower, rel=0.15)


def test_send_retry_delay_seeded_is_reproducible() -> None:
    a = [send_retry_delay(3, base=1, cap=60, rng=random.Random(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


@given(
    attempts=st.integers(min_value=0, max_value=60),
    base=st.floats(min_value=0.01, max_value=100),
    cap=st.floats(min_value=0.01, max_value=10_000),
    seed=st.integers(0, 2**32),
)
def test_send_retry_delay_property(attempts: int, base: float, cap: float, seed: int) -> None:
    ceiling = min(cap, base * 2 ** max(attempts - 1, 0))
    delay = send_retry_delay(attempts, base=base, cap=cap, rng=random.Random(seed))
    assert ceiling / 2 <= delay <= ceiling <= cap


# --- poll_interval -------------------------------------------------------------------

POLL = {"first": 5.0, "factor": 2.0, "cap": 300.0, "jitter": 0.2, "min_gap": 1.0}


def test_first_poll_is_first_without_jitter() -> None:
    assert poll_interval(0, **{**POLL, "jitter": 0.0}, rng=random.Random(0)) == 5.0


def test_first_poll_within_jitter_of_first() -> None:
    rng = random.Random(3)
    draws = [poll_interval(0, **POLL, rng=rng) for _ in range(500)]
    assert all(4.0 <= d <= 6.0 for d in draws)
    assert max(draws) - min(draws) > 1.0  # the jitter is really applied


@pytest.mark.parametrize("polls", range(6))
def test_poll_interval_multiplies_by_factor_per_poll(polls: int) -> None:
    base = 5.0 * 2.0**polls
    rng = random.Random(polls)
    for _ in range(300):
        d = poll_interval(polls, **POLL, rng=rng)
        assert base * 0.8 <= d <= min(300.0, base * 1.2)


def test_poll_interval_without_jitter_is_exact() -> None:
    params = {**POLL, "jitter": 0.0}
    got = [poll_interval(n, **params, rng=random.Random(0)) for n in range(8)]
    assert got == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]


def test_poll_interval_is_capped() -> None:
    rng = random.Random(11)
    draws = [poll_interval(30, **POLL, rng=rng) for _ in range(500)]
    assert all(240.0 <= d <= 300.0 for d in draws)
    assert max(draws) == 300.0  # the upper jitter is clipped at the cap


def test_poll_interval_never_below_min_gap() -> None:
    params = {"first": 0.1, "factor": 1.0, "cap": 300.0, "jitter": 0.5, "min_gap": 1.0}
    rng = random.Random(5)
    assert all(poll_interval(n % 4, **params, rng=rng) == 1.0 for n in range(200))


def test_poll_interval_min_gap_wins_over_cap() -> None:
    assert poll_interval(3, first=5, factor=2, cap=0.5, jitter=0.1, min_gap=1.0) == 1.0


@pytest.mark.parametrize("polls", [1024, 1100, 5000])
def test_poll_interval_many_polls_stays_at_the_cap(polls: int) -> None:
    """A message polled often (a small cap over a 72 h deadline) must not crash the schedule.

    With POLL_MAX_INTERVAL_SECONDS=60 a message reaches 1024 polls in about 17 hours.
    """
    d = poll_interval(polls, **POLL, rng=random.Random(0))
    assert 240.0 <= d <= 300.0


@given(
    polls=st.integers(min_value=0, max_value=40),
    first=st.floats(min_value=0.1, max_value=60),
    factor=st.floats(min_value=1.0, max_value=3.0),
    cap=st.floats(min_value=1.0, max_value=3600),
    jitter=st.floats(min_value=0.0, max_value=0.99),
    min_gap=st.floats(min_value=1.0, max_value=10),
    seed=st.integers(0, 2**32),
)
def test_poll_interval_property(
    polls: int, first: float, factor: float, cap: float, jitter: float, min_gap: float, seed: int
) -> None:
    d = poll_interval(
        polls,
        first=first,
        factor=factor,
        cap=cap,
        jitter=jitter,
        min_gap=min_gap,
        rng=random.Random(seed),
    )
    base = min(cap, first * factor**polls)
    assert d >= min_gap
    assert d <= max(cap, min_gap)
    if d > min_gap:
        assert base * (1 - jitter) - 1e-9 <= d <= base * (1 + jitter) + 1e-9


# --- poll_deadline -------------------------------------------------------------------


def test_poll_deadline_is_ttl_plus_grace() -> None:
    assert poll_deadline(NOW, 600, grace=3600, max_age=259200) == NOW + timedelta(seconds=4200)


def test_poll_deadline_capped_at_max_age() -> None:
    got = poll_deadline(NOW, 31 * 24 * 3600, grace=3600, max_age=259200)
    assert got == NOW + timedelta(seconds=259200)


def test_poll_deadline_without_ttl_is_max_age() -> None:
    assert poll_deadline(NOW, None, grace=3600, max_age=7200) == NOW + timedelta(seconds=7200)


def test_poll_deadline_zero_ttl_is_grace() -> None:
    assert poll_deadline(NOW, 0, grace=60, max_age=7200) == NOW + timedelta(seconds=60)


@given(
    ttl=st.none() | st.integers(min_value=0, max_value=31 * 24 * 3600),
    grace=st.floats(min_value=0, max_value=86400),
    max_age=st.floats(min_value=1, max_value=259200),
)
def test_poll_deadline_property(ttl: int | None, grace: float, max_age: float) -> None:
    got = poll_deadline(NOW, ttl, grace=grace, max_age=max_age)
    assert NOW <= got <= NOW + timedelta(seconds=max_age)
    if ttl is not None and ttl + grace <= max_age:
        assert got == NOW + timedelta(seconds=ttl + grace)


# --- parse_retry_after ---------------------------------------------------------------


def _retry(value: str | None, *, default: float = 5.0, cap: float = 600.0) -> float:
    return parse_retry_after(value, now=NOW, default=default, cap=cap)


def test_retry_after_delta_seconds() -> None:
    assert _retry("3") == 3.0
    assert _retry("  120 ") == 120.0


def test_retry_after_fractional_seconds() -> None:
    assert _retry("1.5") == 1.5


def test_retry_after_http_date_in_the_future() -> None:
    header = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert _retry(header) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    header = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert _retry(header) == 0.0


def test_retry_after_http_date_is_capped() -> None:
    header = format_datetime(NOW + timedelta(days=2), usegmt=True)
    assert _retry(header, cap=600) == 600.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "3 seconds", "Wed, 99 Foo"])
def test_retry_after_garbage_gives_default(value: str | None) -> None:
    assert _retry(value, default=7.0) == 7.0


def test_retry_after_date_without_timezone_gives_default() -> None:
    # "-0000" means "no zone information": parsedate_to_datetime answers a naive datetime
    assert _retry("Sat, 01 Mar 2025 12:01:00 -0000", default=7.0) == 7.0


def test_retry_after_negative_is_zero() -> None:
    assert _retry("-5") == 0.0


def test_retry_after_is_capped() -> None:
    assert _retry("100000", cap=600) == 600.0
    assert _retry("inf", cap=600) == 600.0


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan"])
def test_retry_after_nan_gives_default(value: str) -> None:
    got = _retry(value, default=7.0)
    assert not math.isnan(got)
    assert got == 7.0


@given(st.text(max_size=40))
def test_retry_after_never_raises_and_stays_in_range(value: str) -> None:
    got = _retry(value, default=5.0, cap=600.0)
    assert 0.0 <= got <= 600.0
