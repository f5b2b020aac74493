"""Prometheus metrics: counters and histograms the workers write, and their exposition.

Celery runs prefork children, so the workers count in prometheus_client's multiprocess
mode: with PROMETHEUS_MULTIPROC_DIR set (before this module is imported), every process
writes its own files there and whoever serves `/metrics` (`cascade api`, `cascade
metrics`) sums them. Without it, values live in the serving process only (tests, a
single-process API). Gauges are not counted here: they are read from the database and
Redis at scrape time (`worker.observe.gauges`), so they say what is true, not what a process saw.

Label values are fixed vocabularies (outcomes, states, kinds): never a phone, a text or an id.
"""

from __future__ import annotations

import os
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

from worker.provider.smsbat import (
    NotFound,
    ProviderError,
    SendClient,
    StatusClient,
    StatusReport,
    Throttled,
    Unauthorized,
    Unavailable,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()  # a `_created` series per counter doubles the output for nothing
SEND_OUTCOMES = ("200", "400", "401", "429", "5xx", "unknown")
CHECK_OUTCOMES = ("200", "404", "401", "429", "5xx", "error")
# Provider latency: a status check takes milliseconds, a 1000-message send up to seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Submit to final: the provider's delivery takes seconds to hours (TTL + grace ≤ 72 h).
FINAL_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600, 72 * 3600)

SEND_REQUESTS = Counter(
    "cascade_send_requests",
    "Send requests to the provider, by outcome (HTTP status class, or unknown).",
    ["outcome"],
)
MESSAGES_SUBMITTED = Counter(
    "cascade_messages_submitted", "Messages the provider accepted (answered with a messageId)."
)
SEND_RESULTS = Counter(
    "cascade_send_results",
    "Messages out of send batches, by the state each went to.",
    ["state"],
)
STATUS_CHECKS = Counter("cascade_status_checks", "Status checks (polls) by outcome.", ["outcome"])
WEBHOOK_PUSHES = Counter(
    "cascade_webhook_pushes",
    "Pushed report requests received, by source and outcome (accepted or the refusal code).",
    ["source", "outcome"],
)
REPORTS_APPLIED = Counter(
    "cascade_reports_processed",
    "Stored pushed reports processed, by outcome (applied, ignored, orphan).",
    ["outcome"],
)
PROVIDER_LATENCY = Histogram(
    "cascade_provider_request_seconds",
    "Provider request duration, by kind (send, status).",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
SUBMIT_TO_FINAL = Histogram(
    "cascade_submit_to_final_seconds",
    "From the provider's acceptance to the final state, per message the provider finished "
    "(by a poll, a status webhook or a delivery report).",
    buckets=FINAL_BUCKETS,
)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


# --- what the workers count ------------------------------------------------------------------


def check_outcome(answer: object) -> str:
    """The outcome label of one status check, from its answer or the error it raised."""
    if not isinstance(answer, ProviderError):
        return "200"
    if isinstance(answer, NotFound):
        return "404"
    if isinstance(answer, Unauthorized):
        return "401"
    if isinstance(answer, Throttled):
        return "429"
    if isinstance(answer, Unavailable):
        return "5xx"
    return "error"


def count_checks(results: Iterable[tuple[Any, object]]) -> None:
    """Count a poll batch's answers (`polling.Checked` pairs) by outcome."""
    for outcome, n in Tally(check_outcome(answer) for _, answer in results).items():
        STATUS_CHECKS.labels(outcome).inc(n)


def count_send_batch(report: Any) -> None:
    """Count a `dispatcher.BatchReport`: its requests by outcome (`sendpolicy.answer_label`),
    its messages by state."""
    for outcome, n in report.answers.items():
        if n and outcome != "held":  # nothing was sent
            SEND_REQUESTS.labels(outcome if outcome in SEND_OUTCOMES else "unknown").inc(n)
    for state, n in (report.counts or {}).items():
        if n:
            SEND_RESULTS.labels(str(state)).inc(n)
    submitted = report.counts.get("submitted", 0) if report.counts else 0
    if submitted:
        MESSAGES_SUBMITTED.inc(submitted)


def count_reports(counts: Mapping[str, int]) -> None:
    for outcome in ("applied", "ignored", "orphan"):
        if counts.get(outcome):
            REPORTS_APPLIED.labels(outcome).inc(counts[outcome])


def observe_finals(durations: Sequence[float]) -> None:
    for seconds in durations:
        SUBMIT_TO_FINAL.observe(max(0.0, seconds))


class TimedSendClient(SendClient):
    """SendClient that times each request (its outcome is counted from the batch report)."""

    def send(self, route: str, payloads: Any) -> dict[str, str]:
        started = time.perf_counter()
        try:
            return super().send(route, payloads)
        finally:
            PROVIDER_LATENCY.labels("send").observe(time.perf_counter() - started)


class TimedStatusClient(StatusClient):
    """StatusClient that times each check (its outcome is counted by the poll batch)."""

    def status(self, message_id: str) -> Any:
        started = time.perf_counter()
        try:
            return super().status(message_id)
        finally:
            PROVIDER_LATENCY.labels("status").observe(time.perf_counter() - started)

    def status_all(
        self,
        message_ids: Iterable[str],
        *,
        width: int,
        deadline: float,
        go_on: Callable[[], bool],
        threads: Executor,
    ) -> Iterator[tuple[str, StatusReport | ProviderError, float]]:
        latency = PROVIDER_LATENCY.labels("status")
        answers = super().status_all(
            message_ids, width=width, deadline=deadline, go_on=go_on, threads=threads
        )
        for message_id, answer, seconds in answers:
            latency.observe(seconds)
            yield message_id, answer, seconds


# --- exposition ------------------------------------------------------------------------------


class _ProcessMetrics(Collector):
    """The serving process's own counters, when there is no multiprocess directory."""

    def collect(self) -> Iterable[Any]:
        # Only ours: the default registry also holds python_* and process_* families.
        return (family for family in REGISTRY.collect() if family.name.startswith("cascade_"))


def exposition(*collectors: Collector) -> bytes:
    """The text format of the workers' counters (every process's) plus `collectors`.

    A registry per scrape: collectors that fail raise, and the caller answers 503.
    """
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ProcessMetrics())
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)
