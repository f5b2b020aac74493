"""Beat's ticks log at DEBUG and stay out of Flower; real work keeps its INFO lines."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import Stack, make_messages
from worker.celery import app
from worker.observe.ticks import tick_tasks

TICK_LINES = ("Task cascade.dispatch[", "Task cascade.poll_sweep[", "Sending due task")


def test_the_ticks_are_the_beat_schedules_tasks_not_the_work() -> None:
    ticks = tick_tasks(app)
    assert {"cascade.dispatch", "cascade.poll_sweep", "cascade.sweep"} <= ticks
    assert ticks.isdisjoint({"cascade.enqueue", "cascade.send_batch", "cascade.poll_batch"})
    assert ticks == {entry["task"] for entry in app.conf.beat_schedule.values()}


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_celerys_lines_about_a_tick_are_debug_lines(
    caplog: pytest.LogCaptureFixture, level: int
) -> None:
    """Celery's own calls, as its trace, strategy and beat modules make them."""
    caplog.set_level(level)
    fields = {"id": "1", "name": "cascade.dispatch", "runtime": 0.01, "return_value": "{}"}
    logging.getLogger("celery.app.trace").info("Task %(name)s[%(id)s] succeeded", fields)
    logging.getLogger("celery.beat").info(
        "Scheduler: Sending due task %s (%s)", "sweep", "cascade.sweep"
    )
    work = {**fields, "name": "cascade.send_batch"}
    logging.getLogger("celery.worker.strategy").info("Task %(name)s[%(id)s] received", work)

    shown = [(r.levelname, r.getMessage()) for r in caplog.records]
    ticks = [
        ("DEBUG", "Task cascade.dispatch[1] succeeded"),
        ("DEBUG", "Scheduler: Sending due task sweep (cascade.sweep)"),
    ]
    assert shown == [
        *(ticks if level == logging.DEBUG else []),
        ("INFO", "Task cascade.send_batch[1] received"),
    ]


def test_a_worker_at_info_logs_the_work_not_the_ticks(
    stack: Stack, sim: object, campaign: str
) -> None:
    stack.enqueue(make_messages(5, campaign), campaign)
    stack.wait_final(campaign, 5)  # dispatched and polled: the ticks ran
    logs = stack.logs()
    assert "INFO/MainProcess] Task cascade.send_batch[" in logs
    assert "INFO/MainProcess] Task cascade.poll_batch[" in logs
    assert [line for line in logs.splitlines() if any(t in line for t in TICK_LINES)] == []
