"""The live page's scanned figures: recomputed at most once per max(refresh, 10 × cost)."""

from __future__ import annotations

import pytest

from worker.ops.cache import FiguresCache, due

pytestmark = pytest.mark.unit


def test_a_figure_is_due_after_the_refresh_or_ten_times_its_cost_whichever_is_longer() -> None:
    assert due(None, took=0.0, refresh=5)  # never computed
    assert not due(4.9, took=0.1, refresh=5)
    assert due(5.0, took=0.1, refresh=5)
    assert not due(30.0, took=4.0, refresh=5)  # a 4 s scan: every 40 s at most
    assert due(40.0, took=4.0, refresh=5)


def test_the_cache_recomputes_only_when_due_and_tells_the_age() -> None:
    now = [100.0]
    cache = FiguresCache(clock=lambda: now[0])
    calls: list[float] = []

    def compute() -> int:
        calls.append(now[0])
        now[0] += 2.0  # the scan takes 2 s: recomputed no sooner than 20 s later
        return len(calls)

    first = cache.get("k", compute, refresh=5)
    assert (first.value, first.age) == (1, 0.0)
    now[0] += 10
    again = cache.get("k", compute, refresh=5)
    assert (again.value, again.age) == (1, 10.0)
    now[0] += 10
    fresh = cache.get("k", compute, refresh=5)
    assert fresh.value == 2 and len(calls) == 2
    assert cache.get("other", compute, refresh=5).value == 3  # figures apart by key


def test_the_least_recently_computed_figure_is_dropped_past_the_limit() -> None:
    now = [0.0]
    cache = FiguresCache(clock=lambda: now[0], kept=2)
    for key in ("a", "b", "c"):
        cache.get(key, lambda key=key: key, refresh=5)
    assert cache.get("a", lambda: "a again", refresh=5).value == "a again"
    assert cache.get("c", lambda: "c again", refresh=5).value == "c"
