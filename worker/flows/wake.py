"""Wake a periodic task now instead of at its next beat tick, coalescing bursts of wakes.

Tasks are asked for by name (`cascade.dispatch`, `cascade.apply_reports`): the flows that
wake them never import worker/tasks.py, which imports the flows.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

DISPATCH = "cascade.dispatch"
APPLY_REPORTS = "cascade.apply_reports"

WAKE_GAP_SECONDS = 0.5
_last_run: dict[tuple[str, str], float] = {}


def wake_delay(key: tuple[str, str], now: float, gap: float = WAKE_GAP_SECONDS) -> float | None:
    """When to run the task for a wake at `now`: 0 (at once), a countdown, or None (a run
    already planned covers this one).

    Runs are at least `gap` apart, and a wake between two runs plans the next one: a
    webhook or an API request per message must not become a task per message, and the last
    of a burst still gets its run within `gap`.
    """
    last = _last_run.get(key)
    if last is None or now >= last + gap:
        _last_run[key] = now
        return 0.0
    if last > now:
        return None
    _last_run[key] = last + gap
    return last + gap - now


def wake(task: str, broker_url: str) -> None:
    """Ask for the task named `task` now rather than at the next beat tick; harmless if it
    fails. Sent by name, so nothing here imports the tasks (which import these flows).

    No connection retries: with Redis down, kombu's default retrying holds the caller ~6 s.
    """
    # Here, not at the top: importing the app reads the worker's settings, which a process
    # that only imports `worker.producer` (or a receiver of callbacks) may not have.
    from worker.celery import app

    key = (broker_url, task)
    before = _last_run.get(key)
    delay = wake_delay(key, time.monotonic())
    if delay is None:
        return
    options = {**app.conf.broker_transport_options, "max_retries": 0}
    try:
        with app.connection_for_write(broker_url, transport_options=options) as conn:
            app.send_task(task, retry=False, connection=conn, countdown=delay or None)
    except Exception as exc:  # beat runs every such task on its own schedule anyway
        if before is None:  # no run happened: the next wake must not wait for one
            _last_run.pop(key, None)
        else:
            _last_run[key] = before
        log.warning("could not wake %s (%s); the next beat tick will", task, exc)


def wake_dispatcher(broker_url: str) -> None:
    wake(DISPATCH, broker_url)
