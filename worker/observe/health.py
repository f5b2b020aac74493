"""Liveness that means something: is beat ticking, is the queue moving.

Beat records the time of every periodic task it sends in Redis (one SET), from beat's own
process: a tick recorded by the worker that ran the task would also stop when the workers
stop, and could not tell which of the two is stuck. `/healthz` and `cascade health beat`
(docker-compose's beat healthcheck) read it back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from celery.signals import beat_embedded_init, beat_init, before_task_publish

from config import get_settings
from worker.observe.gauges import BEAT_TICK_KEY, beat_last_tick, broker

log = logging.getLogger(__name__)

# A tick is kept a day: "never ticked" after that reads as unknown, not as stale forever.
TICK_TTL_SECONDS = 86400
_in_beat = False


@beat_init.connect
@beat_embedded_init.connect
def _beat_started(**_: Any) -> None:
    global _in_beat
    _in_beat = True


@before_task_publish.connect
def _beat_ticked(sender: str | None = None, **_: Any) -> None:
    """In beat only: every task it publishes is a tick. Never fails the publish."""
    if not _in_beat:
        return
    try:
        record_tick(get_settings().broker_url)
    except Exception as exc:  # a Redis hiccup must not stop the schedule
        log.warning("could not record beat's tick: %s", exc)


def record_tick(broker_url: str, now: float | None = None) -> None:
    broker(broker_url).set(BEAT_TICK_KEY, repr(now or time.time()), ex=TICK_TTL_SECONDS)


@dataclass
class BeatHealth:
    status: str  # ok | stale | unknown (never ticked: a fresh deployment, or no beat)
    last_tick: float | None
    age_seconds: float | None


def beat_health(broker_url: str, max_age: float, now: float | None = None) -> BeatHealth:
    tick = beat_last_tick(broker(broker_url))
    if tick is None:
        return BeatHealth("unknown", None, None)
    age = max(0.0, (now or time.time()) - tick)
    return BeatHealth("ok" if age <= max_age else "stale", tick, age)
