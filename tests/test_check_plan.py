"""Status checks timed from the route's learned latencies: the pure plan, then a real stack."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from worker.core.backoff import (
    NO_PLAN,
    PAST_PLAN_FOLLOW,
    PAST_PLAN_STEPS,
    CheckPlan,
    explored_latency,
    explores,
    learn_plan,
    learned_delay,
)
from worker.core.states import FINAL
from worker.store.models import messages
from worker.store.pacing import LATENCIES

from .conftest import make_messages, make_stack

STEPS = {"step": 5.0, "explore_until": 180.0, "factor": 2.0, "cap": 300.0, "min_gap": 1.0}


def test_too_few_latencies_leave_the_fixed_schedule() -> None:
    assert learn_plan([10.0] * 49, (0.8, 0.99), 50) == NO_PLAN
    assert learn_plan([10.0] * 50, (0.8, 0.99), 50) == CheckPlan((10.0,))


def test_the_plan_is_the_upper_quantiles_of_what_was_seen() -> None:
    seen = [float(s) for s in range(1, 101)]  # 1..100
    assert learn_plan(seen, (0.8, 0.99), 10).ages == (80.0, 99.0)
    assert learn_plan(seen, (1.0,), 10).ages == (100.0,)


@given(
    st.lists(st.floats(0, 1e5), min_size=1, max_size=300),
    st.lists(st.floats(0.01, 1), min_size=1, max_size=4),
)
def test_plan_ages_are_seen_latencies_in_order(seen: list[float], quantiles: list[float]) -> None:
    ages = learn_plan(seen, quantiles, 1).ages
    assert list(ages) == sorted(set(ages))
    assert set(ages) <= set(seen)
    assert max(ages) <= max(seen)


def test_an_explorer_is_checked_every_step_until_it_has_explored_enough() -> None:
    ages = [0.0]
    while ages[-1] < 200:
        ages.append(ages[-1] + learned_delay(ages[-1], NO_PLAN, explorer=True, jitter=0, **STEPS))
    assert ages[1:37] == [5.0 * k for k in range(1, 37)]  # 5, 10 … 180
    assert ages[37] == 360.0  # then backing off with its age


def test_others_are_checked_at_the_plans_ages_followed_then_back_off() -> None:
    plan = CheckPlan((17.0, 29.5))
    age, ages = 0.0, []
    for _ in range(7):
        age += learned_delay(age, plan, explorer=False, jitter=0, **STEPS)
        ages.append(age)
    # Past the plan, every step up to 1.5 times its last age (a plan learned early ends
    # short of the truth), then backing off with its age.
    assert ages == [17.0, 29.5, 34.5, 39.5, 44.5, 89.0, 178.0]
    assert PAST_PLAN_FOLLOW == 1.5 and PAST_PLAN_STEPS == 3
    # A slow route's plan: at most three steps past it, not every step to 450 s.
    slow, age, ages = CheckPlan((60.0, 300.0)), 0.0, []
    for _ in range(6):
        age += learned_delay(age, slow, explorer=False, jitter=0, **STEPS)
        ages.append(age)
    assert ages == [60.0, 300.0, 305.0, 310.0, 315.0, 615.0]
    # A check closer than the minimum gap to a plan age skips it.
    assert learned_delay(16.5, plan, explorer=False, jitter=0, **STEPS) == 13.0


@given(
    age=st.floats(0, 1e6),
    ages=st.lists(st.floats(0, 1e4), max_size=3),
    explorer=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_checks_are_never_closer_than_the_gap_nor_further_than_the_cap(
    age: float, ages: list[float], explorer: bool, seed: int
) -> None:
    plan = CheckPlan(tuple(sorted(set(ages))))
    delay = learned_delay(
        age, plan, explorer=explorer, jitter=0.2, rng=random.Random(seed), **STEPS
    )
    assert delay >= 1.0
    assert delay <= max(300.0, max(plan.ages, default=0.0) - age, 5.0)


def test_on_a_spread_of_5_to_30s_a_message_costs_about_one_check_and_a_quarter() -> None:
    """What the plan is for, on the bench's delivery spread: few checks, finals found soon."""
    rng = random.Random(7)
    explored = [rng.uniform(5, 30) for _ in range(1000)]
    # An explorer learns its latency as the first step at or after it.
    seen = [5.0 * -(-latency // 5.0) for latency in explored]
    plan = learn_plan(seen, (0.8, 0.99), 50)
    checks, late = [], []
    for _ in range(10_000):
        latency, age, n = rng.uniform(5, 30), 0.0, 0
        while True:
            age += learned_delay(age, plan, explorer=False, jitter=0.2, rng=rng, **STEPS)
            n += 1
            if age >= latency:
                break
        checks.append(n)
        late.append(age - latency)
    assert statistics.mean(checks) <= 1.3  # the fixed 5 s ×2 schedule: 2.6
    assert max(age for age in late) <= 25.0
    assert statistics.quantiles(late, n=100)[98] <= 25.0


def test_one_message_in_every_n_explores() -> None:
    assert [pk for pk in range(1, 301) if explores(pk, 100)] == [100, 200, 300]
    assert not any(explores(pk, 0) for pk in range(1, 301))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_stack_learns_its_routes_latency_and_checks_the_rest_about_once(
    database_factory: Callable[[str], str], backend: str
) -> None:
    env = {
        "POLL_LEARN_EVERY": "4",
        "POLL_LEARN_STEP_SECONDS": "2",
        "POLL_LEARN_MIN_SAMPLES": "20",
        "POLL_FIRST_DELAY_SECONDS": "1",
        "POLL_BACKOFF_FACTOR": "2",
    }
    with make_stack(database_factory(backend), backend, env) as stack:
        stack.simulator.configure(delay_min=2.0, delay_max=3.0)
        stack.enqueue(make_messages(200, "learn-a"), "learn-a")
        stack.wait_final("learn-a", 200)
        broker = redis.Redis.from_url(stack.settings.broker_url)
        seen = [float(v) for v in broker.lrange(LATENCIES + "standard", 0, -1)]
        stack.enqueue(make_messages(200, "learn-b"), "learn-b")
        stack.wait_final("learn-b", 200)
        with stack.engine.connect() as conn:
            rows = conn.execute(
                select(messages.c.pk, messages.c.campaign, messages.c.polls, messages.c.state)
            ).all()

    assert len(seen) >= 40  # 1 in 4 of 200 explored
    assert all(2.0 <= latency <= 6.0 for latency in seen), seen
    assert all(r.state in FINAL for r in rows)

    def mean_polls(campaign: str) -> float:
        return statistics.mean(
            r.polls for r in rows if r.campaign == campaign and not explores(r.pk, 4)
        )

    # Before: the fixed 1 s ×2 schedule, checks at 1, 3, 7 s. After: at the learned ages.
    assert mean_polls("learn-a") >= 1.8
    assert mean_polls("learn-b") <= 1.4


def test_an_explorer_checked_late_teaches_nothing() -> None:
    """Checks that ran late (a backlog) would teach the plan the workers' own lag."""
    start = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)

    def at(seconds: float) -> datetime:
        return start + timedelta(seconds=seconds)

    assert explored_latency(start, None, at(seconds=5), 5.0) == 5.0  # first check, on time
    assert explored_latency(start, at(seconds=10), at(seconds=15.2), 5.0) == 15.2
    assert explored_latency(start, None, at(seconds=45), 5.0) is None  # first check 40 s late
    assert explored_latency(start, at(seconds=10), at(seconds=30), 5.0) is None  # a gap


def test_full_poll_batches_hand_out_the_next_without_waiting_for_the_sweep(
    database_factory: Callable[[str], str],
) -> None:
    """One queued poll task of 5 checks per 10 s sweep would take over 100 s for 100 messages;
    a full batch handing out the next checks them all well within that.

    The 100 go in one send request, so their first checks come due together 5 s later,
    after their delivery, and the chain checks them all at the next sweep: 11.5 s here. It
    took 11-111 s while the sweep counted `cascade.apply_reports` ticks in the poll queue
    as poll tasks: with room for one and the two ticks in step, no sweep found any."""
    env = {
        "POLL_SWEEP_INTERVAL_SECONDS": "10",
        "POLL_MAX_QUEUED_TASKS": "1",
        "POLL_BATCH_SIZE": "5",
        "POLL_FIRST_DELAY_SECONDS": "5",
        "SEND_BATCH_MIN": "100",
        "SEND_LINGER_SECONDS": "5",
    }
    with make_stack(database_factory("postgresql"), "postgresql", env) as stack:
        stack.simulator.configure(delay_min=0.5, delay_max=1.0)
        started = time.monotonic()
        stack.enqueue(make_messages(100, "chain"), "chain")
        report = stack.wait_final("chain", 100, timeout=60)
        took = time.monotonic() - started

    assert report["states"].get("delivered", 0) + report["states"].get("undeliverable", 0) > 0
    assert took < 40, took  # the sweep's pace alone: 100 checks at 5 per 10 s, ≥ 200 s
