"""The Celery application: `celery -A worker worker|beat|flower` finds `app` here.

Redis carries only signals. Every task is idempotent against the database, so the
settings below favour redelivery over loss: late acks, one prefetched task per process,
and long-running tasks cancelled (not finished twice) when the broker connection drops.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from celery import Celery
from celery.signals import worker_init
from kombu import Queue
from sqlalchemy.exc import OperationalError

from config import Settings, get_settings
from worker.core.backoff import POLL_TIME_LIMIT_SHARE
from worker.observe.ticks import QuietTicksAMQP, quiet_ticks
from worker.store.db import NoSchema, require_schema

INTAKE_QUEUE = "cascade-intake"
SEND_QUEUE = "cascade-send"
POLL_QUEUE = "cascade-poll"
PERIODIC_QUEUE = "cascade-periodic"
CALLBACK_QUEUE = "cascade-callbacks"

VISIBILITY_TIMEOUT = 3600


def create_app(settings: Settings) -> Celery:
    app = Celery(
        "cascade", broker=settings.broker_url, include=["worker.tasks"], amqp=QuietTicksAMQP
    )
    send_limit = settings.send_lease_seconds * 0.9  # a claim must outlive its task
    # Else a second task polls the same rows.
    poll_limit = settings.poll_lease_seconds * POLL_TIME_LIMIT_SHARE
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_backend=settings.broker_url,
        result_backend_transport_options=transport,
        broker_transport_options=transport,
        result_expires=timedelta(days=1),
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_max_tasks_per_child=10_000,
        broker_connection_retry_on_startup=True,
        task_soft_time_limit=240,
        task_time_limit=300,
        task_annotations={
            "cascade.send_batch": {
                "soft_time_limit": send_limit * 0.9,
                "time_limit": send_limit,
            },
            "cascade.poll_batch": {
                "soft_time_limit": poll_limit * 0.9,
                "time_limit": poll_limit,
            },
        },
        # Task events are what Flower shows: without them it lists workers but no tasks.
        # They are cheap here because a task carries a whole batch (up to 1000 messages),
        # so it is a few events per batch, not per message. The sent event carries the queue.
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
        enable_utc=True,
        task_default_queue=INTAKE_QUEUE,
        task_queues=[
            Queue(q, routing_key=q)
            for q in (INTAKE_QUEUE, SEND_QUEUE, POLL_QUEUE, PERIODIC_QUEUE, CALLBACK_QUEUE)
        ],
        task_routes={
            "cascade.enqueue": {"queue": INTAKE_QUEUE},
            "cascade.send_batch": {"queue": SEND_QUEUE},
            "cascade.poll_batch": {"queue": POLL_QUEUE},
            "cascade.dispatch": {"queue": PERIODIC_QUEUE},
            "cascade.poll_sweep": {"queue": PERIODIC_QUEUE},
            "cascade.sweep": {"queue": PERIODIC_QUEUE},
            "cascade.enforce_holds": {"queue": PERIODIC_QUEUE},
            "cascade.apply_reports": {"queue": POLL_QUEUE},
            "cascade.deliver_callbacks": {"queue": CALLBACK_QUEUE},
        },
        beat_schedule={
            "dispatch": _tick("cascade.dispatch", settings.dispatch_interval_seconds),
            "poll-sweep": _tick("cascade.poll_sweep", settings.poll_sweep_interval_seconds),
            "sweep": _tick("cascade.sweep", settings.sweep_interval_seconds),
            "holds": _tick("cascade.enforce_holds", settings.dispatch_interval_seconds),
            "apply-reports": _tick("cascade.apply_reports", settings.reports_interval_seconds),
            "callbacks": _tick("cascade.deliver_callbacks", settings.callbacks_interval_seconds),
        },
    )
    quiet_ticks(app)
    return app


def _tick(task: str, every: float) -> dict[str, object]:
    # A tick nobody ran in time is dropped: the next one does the same work.
    return {"task": task, "schedule": every, "options": {"expires": max(every * 2, 2.0)}}


@worker_init.connect
def _require_schema(sender: object, **_: object) -> None:
    """Without our tables every task would fail, each with a traceback: stop with one line.
    Only our worker (another app's may run in a producer's process); a database that is
    down is waited for, as the tasks do."""
    if getattr(sender, "app", None) is not app:
        return
    try:
        require_schema(get_settings().database_url)
    except NoSchema as exc:
        logging.getLogger(__name__).critical("refusing to start the worker: %s", exc)
        raise SystemExit(1) from None
    except OperationalError as exc:
        reason = str(exc.orig).splitlines()[0]
        logging.getLogger(__name__).warning("the database is unreachable at start: %s", reason)


def flower_environment(settings: Settings) -> dict[str, str]:
    """Flower's own options from our settings, so `.env` configures `celery -A worker flower`.

    Flower reads FLOWER_* variables when its command runs, after `-A worker` imported this
    module. A variable already in the environment, or `--basic-auth`/`--max-tasks`/`--address`
    on the command line, still wins.
    """
    options = {
        "FLOWER_MAX_TASKS": str(settings.flower_max_tasks),  # Flower's 100k grows RAM
        "FLOWER_ADDRESS": settings.flower_address,
    }
    if settings.flower_basic_auth is not None:
        options["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
    return options


app = create_app(get_settings())
# httpx logs every request at INFO: a line per status check is most of a busy worker's log
# and a measurable share of its CPU. Failures still reach the log through our own messages.
logging.getLogger("httpx").setLevel(logging.WARNING)
for _name, _value in flower_environment(get_settings()).items():
    os.environ.setdefault(_name, _value)

# Observability: JSON logs when LOG_FORMAT=json, and beat's tick for /healthz (observe/health.py).
from worker.observe import health as _health  # noqa: E402, F401
from worker.observe import logs as _logs  # noqa: E402

_logs.connect_celery()
