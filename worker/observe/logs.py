"""JSON logs (LOG_FORMAT=json) for workers, beat and the API: one object a line.

Log shippers parse JSON without fragile patterns. Each line carries the fields a search
needs (`message_id`, `campaign`, `batch`, `claim_token`, `route`, the Celery task's
`task_id` and `task_name`) when the code passes them as `extra=`, and never anything
else of the record: arguments a caller did not mean to log stay out. Phone numbers stay
masked: the code masks them before logging (worker.core.redact), and as a second line of
defence anything in the message that still looks like an E.164 number is masked here.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.core.redact import mask_phone

# Fields taken from `extra=` (and Celery's task logger) when present; nothing else is.
FIELDS = ("message_id", "campaign", "batch", "claim_token", "route", "task_id", "task_name")
_E164 = re.compile(r"\+[1-9]\d{7,14}")


def scrub(text: str) -> str:
    """Mask anything that still looks like a full international number."""
    return _E164.sub(lambda m: mask_phone(m.group()), text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.process,
            "message": scrub(record.getMessage()),
        }
        entry |= _task_fields()
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "???":  # Celery's placeholder outside a task
                entry[name] = value if isinstance(value, int | float) else scrub(str(value))
        if record.exc_info:
            entry["error"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def _task_fields() -> dict[str, str]:
    """The running Celery task's id and name, so any module's line inside a task has them."""
    try:
        from celery import current_task

        if current_task and current_task.request.id:
            return {"task_id": current_task.request.id, "task_name": current_task.name}
    except Exception:  # outside Celery, or a half-initialised app: no task fields
        pass
    return {}


def use_json(logger: logging.Logger | None = None) -> None:
    """Give every handler of `logger` (default: the root logger) the JSON formatter."""
    target = logger or logging.getLogger()
    if not target.handlers:
        target.addHandler(logging.StreamHandler(sys.stderr))
    for handler in target.handlers:
        handler.setFormatter(JsonFormatter())


def configure(log_format: str, level: int = logging.INFO) -> None:
    """For processes we start ourselves (the API, `cascade metrics`)."""
    logging.basicConfig(level=level)
    if log_format == "json":
        use_json()
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            uvicorn_logger = logging.getLogger(name)
            if uvicorn_logger.handlers:
                use_json(uvicorn_logger)


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's own logging: JSON too when asked (else uvicorn's default)."""
    if log_format != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
        },
    }


def _celery_logger_ready(logger: logging.Logger, **_: Any) -> None:
    from config import get_settings

    if get_settings().log_format == "json":
        use_json(logger)


def connect_celery() -> None:
    """Celery sets up its loggers itself (workers, beat): swap the formatter afterwards."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    after_setup_logger.connect(_celery_logger_ready, weak=False)
    after_setup_task_logger.connect(_celery_logger_ready, weak=False)
