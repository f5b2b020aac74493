"""Figures that are row scans (channels, latency, top errors, the timeline, recent rates),
kept per process and recomputed at most once per max(the caller's refresh, 10 × what they
last took to compute).

Tallies answer the counts; these they cannot, and at 1,000,000 messages they cost seconds
a view. A page reloading every 5 s, or a dashboard polling `GET /v1/campaigns/{name}`,
would otherwise spend more than a core of PostgreSQL per viewer: bounded this way, a figure
costs at most a tenth of the database's time however many viewers reload, and the page and
the API say how old it is. `FIGURES` is the process's one cache: the live page and the API
share a campaign's analytics.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
COST_FACTOR = 10  # a figure is recomputed no sooner than 10 × what it took
KEPT = 64  # figures kept per process, the least recently used dropped first


def due(age: float | None, took: float, refresh: float) -> bool:
    """Whether a figure of this age (None: never computed) is computed again now."""
    return age is None or age >= max(refresh, COST_FACTOR * took)


@dataclass(frozen=True)
class Figure(Generic[T]):
    value: T
    age: float  # seconds since it was computed


@dataclass
class _Entry:
    value: Any
    at: float
    took: float


class FiguresCache:
    """One lock per figure, so it is computed by one viewer at a time. Viewers arriving
    while it is computed again get the figure they would have had a moment before, with its
    age, instead of waiting seconds for the new one; only a figure never computed yet is
    waited for (then shared, not computed again)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, kept: int = KEPT) -> None:
        self._clock = clock
        self._kept = kept
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T], refresh: float) -> Figure[T]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            kept = self._entries.get(key)
        if kept is not None and not lock.acquire(blocking=False):
            return Figure(kept.value, self._clock() - kept.at)  # being computed again
        if kept is None:
            lock.acquire()
        try:
            entry = self._entries.get(key)
            now = self._clock()
            if entry is None or due(now - entry.at, entry.took, refresh):
                value = compute()
                done = self._clock()
                entry = _Entry(value, done, done - now)
                self._store(key, entry)
            return Figure(entry.value, self._clock() - entry.at)
        finally:
            lock.release()

    def _store(self, key: Hashable, entry: _Entry) -> None:
        with self._guard:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._kept:
                dropped, _ = self._entries.popitem(last=False)
                self._locks.pop(dropped, None)


# The process's figures: the live page's (worker.http.live_page) and the API's report.
FIGURES = FiguresCache()
