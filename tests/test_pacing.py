"""Pauses shared through a real Redis: the longest one asked for wins, whatever the order."""

from __future__ import annotations

import threading

from worker.store.pacing import Pacing


def test_a_shorter_pause_never_cuts_a_longer_one(redis_db: str) -> None:
    pacing = Pacing(redis_db)
    pacing.pause("send:throttle", 30)
    pacing.pause("send:throttle", 1)
    assert 29 < pacing.paused_for("send:throttle") <= 30
    pacing.pause("send:throttle", 60)
    assert 59 < pacing.paused_for("send:throttle") <= 60
    assert pacing.paused_for("poll:throttle") == 0


def _pause_together(pacings: list[Pacing], name: str, seconds: list[float]) -> None:
    start = threading.Barrier(len(pacings))

    def pause(pacing: Pacing, length: float) -> None:
        start.wait()
        pacing.pause(name, length)

    threads = [
        threading.Thread(target=pause, args=pair) for pair in zip(pacings, seconds, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_pauses_keep_the_longest(redis_db: str) -> None:
    pacings = [Pacing(redis_db) for _ in range(8)]
    for round_ in range(20):
        name = f"race:{round_}"
        _pause_together(pacings, name, [5 if i % 2 else 50 for i in range(len(pacings))])
        assert pacings[0].paused_for(name) > 45
