"""The tests and the demo keep to themselves on a developer's machine."""

from __future__ import annotations

import os

import pytest
import redis

from tests.conftest import REDIS, REDIS_SERVER
from worker.stack import workers


def test_tests_run_a_redis_server_of_their_own() -> None:
    assert REDIS_SERVER.process is not None and REDIS_SERVER.process.popen.poll() is None
    assert REDIS.endswith(f"127.0.0.1:{REDIS_SERVER.port}") and REDIS_SERVER.port != 6379
    client = redis.Redis.from_url(f"{REDIS}/0")
    assert client.info("server")["process_id"] == REDIS_SERVER.process.popen.pid
    assert os.environ["BROKER_URL"] == f"{REDIS}/15"  # the in-process app's, on ours too


def test_a_worker_group_removes_its_temporary_logs() -> None:
    with workers({}) as group:
        (group.logdir / "w.log").write_text("a line")
        logdir = group.logdir
    assert not logdir.exists()


def test_a_worker_group_that_failed_keeps_its_logs() -> None:
    with pytest.raises(RuntimeError), workers({}) as group:
        logdir = group.logdir
        raise RuntimeError("a failed run")
    assert logdir.exists()
    logdir.rmdir()
