"""Beat's ticks, kept quiet: out of the INFO log and out of Flower.

A tick (`cascade.dispatch`, `.poll_sweep`, …) runs every second or two and mostly finds
nothing to do. At INFO, Celery logs each one received and succeeded and beat each one
sent: an idle worker wrote 156 lines and beat 77 per 30 s, and Flower's task history
(`FLOWER_MAX_TASKS`) filled with them in an hour. Their lines go to DEBUG and they send no
task events; the tasks that do the work (sends, polls, intake, callbacks) keep both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP

# The loggers of Celery's "Task … received", "Task … succeeded" and "Sending due task".
CELERY_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")


def tick_tasks(app: Celery) -> frozenset[str]:
    """The beat schedule names the ticks: one source of truth."""
    return frozenset(entry["task"] for entry in app.conf.beat_schedule.values())


class QuietTicksAMQP(AMQP):
    """Publishes ticks without the `task-sent` event (`task_send_sent_event` is app-wide)."""

    def as_task_v2(self, task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
        message = super().as_task_v2(task_id, name, *args, **kwargs)
        return message._replace(sent_event=None) if name in tick_tasks(self.app) else message


class TickLogsAtDebug(logging.Filter):
    """Celery's INFO lines about a tick become DEBUG lines (shown with `-l debug`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ticks: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._about_a_tick(record.args):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    def _about_a_tick(self, args: Any) -> bool:
        if isinstance(args, Mapping):  # received, succeeded: one dict of fields
            return args.get("name") in self.ticks
        # beat: "Scheduler: Sending due task %s (%s)" % (entry name, task name)
        return isinstance(args, tuple) and len(args) == 2 and args[1] in self.ticks


_FILTER = TickLogsAtDebug()


def quiet_ticks(app: Celery) -> None:
    """Ticks send no task events from the worker, and log at DEBUG."""
    ticks = tick_tasks(app)
    app.conf.task_annotations = {
        **app.conf.task_annotations,
        **{name: {"send_events": False} for name in ticks},
    }
    _FILTER.ticks |= ticks
    for name in CELERY_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)  # once: addFilter skips a filter it has
