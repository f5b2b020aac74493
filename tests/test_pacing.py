"""Pauses shared through a real Redis: the longest one asked for wins, whatever the order."""

from __future__ import annotations

import threading

from config import Settings
from worker.core.sendpolicy import Answer
from worker.flows.dispatcher import CIRCUIT, THROTTLE, SendingPause, heed, sending_pause
from worker.provider.smsbat import Throttled, Unauthorized
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


def test_a_pause_keeps_its_reason_and_a_longer_pause_keeps_its_own(redis_db: str) -> None:
    pacing = Pacing(redis_db)
    assert pacing.pause_reason("send:throttle") is None
    pacing.pause("send:throttle", 30, "HTTP 429")
    pacing.pause("send:throttle", 1, "a shorter one")
    assert pacing.pause_reason("send:throttle") == "HTTP 429"
    pacing.open_circuit("send:circuit", 60, "HTTP 401: credentials refused")
    assert pacing.pause_reason("send:circuit") == "HTTP 401: credentials refused"


def test_sending_pause_names_the_longer_pause_and_its_cause(redis_db: str) -> None:
    """What status pages show: nothing while workers may send; else for how long and why."""
    pacing = Pacing(redis_db)
    settings = Settings(CIRCUIT_OPEN_SECONDS=120)  # type: ignore[call-arg]
    assert sending_pause(pacing) is None

    throttled: Answer = Throttled(retry_after=20)
    assert heed(pacing, settings, throttled) == 20
    pause = sending_pause(pacing)
    assert pause is not None and 19 < pause.seconds <= 20
    assert pause.reason == "the provider throttled sends (HTTP 429)"

    refused: Answer = Unauthorized("HTTP 401")
    assert heed(pacing, settings, refused) == 120
    pause = sending_pause(pacing)
    assert pause is not None and 119 < pause.seconds <= 120
    assert pause.reason == "HTTP 401: credentials refused; check SMSBAT_API_KEY"
    assert pause.as_dict() == {
        "paused_for_seconds": round(pause.seconds, 1),
        "reason": pause.reason,
    }
    assert pacing.paused_for(THROTTLE) and pacing.paused_for(CIRCUIT)
    assert isinstance(pause, SendingPause)
