"""The tests and the demo keep to themselves on a developer's machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS, REDIS_SERVER
from worker.dev.stack import wait_for, workers


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


def test_a_private_redis_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A test run killed outright (no clean-up runs) leaves no redis-server behind."""
    script = (
        "import sys, pathlib; from worker.dev.stack import PrivateRedis; "
        "server = PrivateRedis(pathlib.Path(sys.argv[1]), die_with_parent=True); "
        "server.start(); print(server.port, server.process.popen.pid, flush=True); "
        "import time; time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    port, pid = map(int, parent.stdout.readline().split())  # type: ignore[union-attr]
    assert redis.Redis(port=port).ping()
    parent.kill()
    parent.wait()
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 10, "redis to exit")


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
