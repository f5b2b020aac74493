"""The live page's scanned figures: recomputed at most once per max(refresh, 10 × cost)."""

from __future__ import annotations

import threading

import pytest

from worker.ops.cache import Figure, FiguresCache, due

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


def test_viewers_get_the_kept_figure_while_it_is_computed_again_not_wait_for_it() -> None:
    """The first computation is waited for; a recomputation is not: one viewer pays it
    while the others are answered the previous figure, with its age."""
    now = [0.0]
    cache = FiguresCache(clock=lambda: now[0])
    assert cache.get("k", lambda: "old", refresh=5).value == "old"
    now[0] += 6  # due
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(60)
        return "new"

    recomputing = threading.Thread(target=lambda: cache.get("k", slow, refresh=5))
    recomputing.start()
    assert started.wait(60)
    answered: list[Figure[str]] = []
    viewer = threading.Thread(
        target=lambda: answered.append(cache.get("k", lambda: "again", refresh=5))
    )
    viewer.start()
    viewer.join(60)  # a guard against a hang, not a measure: it returns at once, or never
    release.set()
    recomputing.join(60)
    viewer.join(60)
    assert answered and (answered[0].value, answered[0].age) == ("old", 6.0)
    assert cache.get("k", lambda: "again", refresh=5).value == "new"  # one computation


def test_viewers_wait_for_a_figure_never_computed_and_share_it() -> None:
    cache = FiguresCache()
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow() -> str:
        calls.append("slow")
        started.set()
        release.wait(60)
        return "first"

    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(cache.get("k", slow, 5).value))
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=lambda: results.append(cache.get("k", slow, 5).value))
    second.start()
    release.set()
    first.join(60)
    second.join(60)
    assert results == ["first", "first"] and calls == ["slow"]
