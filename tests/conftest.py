"""Fixtures on real services: Redis, PostgreSQL and SQLite, the simulator and Celery workers.

Every integration test runs the processes a deployment runs (`celery -A worker worker -B`,
`cascade simulator`) over real sockets. Each test process (one per pytest-xdist worker)
runs a redis-server of its own, so a developer's Redis is never touched; each stack
claims a DB index of its own on it. PostgreSQL databases are created and dropped per run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from worker.dev.stack import PrivateRedis, Simulator, Workers, start_simulator, workers

# The port is chosen now, so the in-process Celery app (it wakes the dispatcher) is built
# for it; the server starts in pytest_configure. DB 15 is that app's, never a stack's.
REDIS_SERVER = PrivateRedis(Path(), die_with_parent=True)
REDIS = f"redis://127.0.0.1:{REDIS_SERVER.port}"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

# Set, not defaulted: pytest-xdist's workers inherit the controller's environment, and a
# developer's own BROKER_URL or DATABASE_URL must never be what a test falls back to.
os.environ["BROKER_URL"] = f"{REDIS}/15"
os.environ["DATABASE_URL"] = "sqlite://"  # in memory, for a test that forgets its own

from config import Settings  # noqa: E402
from worker.flows.producer import EnqueueResult, enqueue  # noqa: E402
from worker.ops.reports import campaign_summary  # noqa: E402
from worker.store.db import get_engine  # noqa: E402
from worker.store.migrate import upgrade_database  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Start the redis-server where tests run: not in pytest-xdist's controller, and not for
    `-m unit` (pure tests: a unit test that reached for Redis would fail, as it should)."""
    if config.getoption("markexpr", "") == "unit":
        return
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        REDIS_SERVER.logdir = Path(tempfile.mkdtemp(prefix="cascade-tests-redis-"))
        REDIS_SERVER.start()


# Fixtures that start or reach services: a test using one is not a unit test.
SERVICE_FIXTURES = frozenset({"redis_db", "database_factory", "stack", "sim"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the `unit` marker honest: a unit test may not use a service fixture."""
    wrong = [
        item.nodeid
        for item in items
        if item.get_closest_marker("unit")
        and SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if wrong:
        raise pytest.UsageError(f"marked unit but uses a service fixture: {', '.join(wrong)}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if REDIS_SERVER.process is not None:
        REDIS_SERVER.stop()
        shutil.rmtree(REDIS_SERVER.logdir)


# Short timings so a test run takes seconds; the policies are the same.
FAST = {
    "SMSBAT_API_KEY": "test-key",
    "POLL_FIRST_DELAY_SECONDS": "1",
    "POLL_MAX_INTERVAL_SECONDS": "4",
    "POLL_SWEEP_INTERVAL_SECONDS": "0.5",
    "DISPATCH_INTERVAL_SECONDS": "0.5",
    "SWEEP_INTERVAL_SECONDS": "1",
    "SEND_LINGER_SECONDS": "0.2",
    "SEND_BACKOFF_BASE_SECONDS": "0.2",
    "SEND_BACKOFF_MAX_SECONDS": "1",
    "SEND_LEASE_SECONDS": "20",
    "CIRCUIT_OPEN_SECONDS": "2",
    "HTTP_READ_TIMEOUT_SECONDS": "2",
    # Checks on the fixed schedule above: a learned plan carries from test to test on a
    # shared stack (tests/test_check_plan.py turns it on).
    "POLL_LEARN_EVERY": "0",
}
SIMULATOR_DEFAULTS = {
    "api_key": "test-key",
    "delay_min": 0.5,
    "delay_max": 3.0,
    "latency_ms": 0.0,
    "error_rate": 0.0,
    "fail_next_sends": 0,
    "throttle_next": 0,
    "retry_after": "1",
    "status_throttle_next": 0,
    "hang_next_sends": 0,
    "reject_phones": [],
    "shuffle": True,
    "drop_answers": 0.0,
}


def claim_redis_db() -> int:
    """A Redis DB index of our own (1–14), so stacks alive at once never share a broker."""
    registry = redis.Redis.from_url(f"{REDIS}/0")
    for index in range(1, 15):
        if registry.set(f"cascade-tests:db:{index}", os.getpid(), nx=True, ex=3600):
            redis.Redis.from_url(f"{REDIS}/{index}").flushdb()
            return index
    raise RuntimeError("no free Redis DB index for tests (1-14 all claimed)")


def release_redis_db(index: int) -> None:
    redis.Redis.from_url(f"{REDIS}/{index}").flushdb()
    redis.Redis.from_url(f"{REDIS}/0").delete(f"cascade-tests:db:{index}")


@pytest.fixture
def redis_db() -> Iterator[str]:
    index = claim_redis_db()
    yield f"{REDIS}/{index}"
    release_redis_db(index)


def create_postgres_database() -> str:
    name = f"cascade_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_postgres_database(name: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """Make a fresh, migrated database of a backend; answers its URL."""
    created: list[str] = []

    def make(backend: str) -> str:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'cascade.db'}"
        else:
            name = create_postgres_database()
            created.append(name)
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        upgrade_database(url)
        return url

    yield make
    for name in created:
        drop_postgres_database(name)


@dataclass
class Stack:
    """One deployment in miniature: a database, a Redis DB, a simulator, workers with beat."""

    backend: str
    settings: Settings
    simulator: Simulator
    workers: Workers

    @property
    def engine(self) -> Any:
        return get_engine(self.settings.database_url)

    def enqueue(self, messages: list[dict[str, Any]], campaign: str) -> list[EnqueueResult]:
        return enqueue(messages, campaign, settings=self.settings)

    def wait_final(self, campaign: str, total: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        report: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            report = campaign_summary(self.engine, campaign)
            if report and report["final"] >= total:
                return report
            time.sleep(0.3)
        raise AssertionError(f"campaign {campaign} not final in {timeout}s: {report}")

    def flush_redis(self) -> None:
        redis.Redis.from_url(self.settings.broker_url).flushdb()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.workers.logdir.glob("*.log"))
        )


@contextmanager
def make_stack(
    database_url: str, backend: str, env: dict[str, str] | None = None, processes: int = 1
) -> Iterator[Stack]:
    index = claim_redis_db()
    broker = f"{REDIS}/{index}"
    worker_env = {**FAST, **(env or {}), "DATABASE_URL": database_url, "BROKER_URL": broker}
    with workers({}) as group:
        simulator = start_simulator(group.logdir)
        try:
            simulator.configure(**SIMULATOR_DEFAULTS)
            worker_env["SMSBAT_BASE_URL"] = simulator.url
            group.env |= worker_env
            for i in range(processes):
                group.start(f"w{i}", beat=i == 0)
            settings = Settings(**worker_env)  # type: ignore[arg-type]
            yield Stack(backend, settings, simulator, group)
        finally:
            simulator.process.stop()
            release_redis_db(index)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, database_factory: Callable[[str], str]
) -> Iterator[Stack]:
    """The shared stack of a backend; each test resets the simulator and uses its own campaign."""
    with make_stack(database_factory(request.param), request.param) as built:
        yield built


@pytest.fixture
def sim(stack: Stack) -> Simulator:
    stack.simulator.configure(**SIMULATOR_DEFAULTS)
    stack.simulator.admin("/_sim/reset", {})
    return stack.simulator


@pytest.fixture
def campaign() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def make_messages(
    count: int, prefix: str, *, start: int = 0, **overrides: Any
) -> list[dict[str, Any]]:
    """Valid, distinct messages; ids `<prefix>-<n>`, phones +38067…"""
    return [
        {
            "id": f"{prefix}-{i}",
            "fromName": "Tests",
            "toPhone": f"+38067{i:07d}",
            "messageType": "transaction",
            "text": f"message {i}",
            **overrides,
        }
        for i in range(start, start + count)
    ]
