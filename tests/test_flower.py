"""Flower out of the box: `celery -A worker flower` on a real stack, behind basic auth.

The monitor is only useful if it shows our tasks by name and queue (task events on) and
only to operators (FLOWER_BASIC_AUTH applied without `--basic-auth`, never logged).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from pydantic import ValidationError

from config import Settings
from tests.conftest import Stack, make_messages, make_stack
from worker.celery import app, flower_environment
from worker.dev.stack import Process, free_port, spawn, wait_for
from worker.observe.ticks import tick_tasks

USER, PASSWORD = "ops", "secret"
MESSAGES = 5


@dataclass
class Flower:
    url: str
    process: Process
    log: Path
    stack: Stack

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> httpx.Response:
        return httpx.get(self.url + path, auth=auth, timeout=10)

    def heard_from(self, prefix: str) -> bool:
        """Flower's worker list built from events (not from a broadcast inspect)."""
        workers = self.get("/workers?json=1").json()["data"]
        return any(w["hostname"].startswith(prefix) and w["status"] for w in workers)

    def tasks(self, name: str) -> dict[str, dict[str, Any]]:
        answer = self.get(f"/api/tasks?taskname={name}")
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first truthy answer of `check`, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def flower(database_factory: Callable[[str], str]) -> Iterator[Flower]:
    """A stack with Flower watching it from before the first message, then a small campaign."""
    with make_stack(database_factory("sqlite"), "sqlite") as stack:
        port = free_port()
        args = [sys.executable, "-m", "celery", "-A", "worker", "flower"]
        args += ["--address=127.0.0.1", f"--port={port}"]
        env = {**stack.workers.env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
        process = spawn("flower", args, env, stack.workers.logdir)
        log = stack.workers.logdir / "flower.log"
        running = Flower(f"http://127.0.0.1:{port}", process, log, stack)
        try:
            wait_for(lambda: running.get("/healthcheck", None).status_code == 200, 60, "flower")
            # Events only reach a Flower that is listening: wait for the worker's heartbeats
            # to show (ticks send no task events, so they cannot tell).
            poll(lambda: running.heard_from("w0@"), 60, "flower heard no worker heartbeat")
            campaign = f"flower-{time.monotonic_ns()}"
            stack.enqueue(make_messages(MESSAGES, campaign), campaign)
            stack.wait_final(campaign, MESSAGES)
            yield running
        finally:
            process.stop()


def test_healthcheck_needs_no_credentials(flower: Flower) -> None:
    answer = flower.get("/healthcheck", auth=None)
    assert answer.status_code == 200
    assert answer.text == "OK"


WRONG_CREDENTIALS = {
    "none": None,
    "bad-password": (USER, "wrong"),
    "user": ("intruder", PASSWORD),
    "empty": ("", ""),
    "prefix": (USER, PASSWORD[:-1]),
    "longer": (USER, PASSWORD + "0"),
    "swapped": (PASSWORD, USER),
}


@pytest.mark.parametrize("path", ["/api/workers", "/tasks"])
@pytest.mark.parametrize("auth", WRONG_CREDENTIALS.values(), ids=WRONG_CREDENTIALS.keys())
def test_refused_without_the_right_credentials(
    flower: Flower, path: str, auth: tuple[str, str] | None
) -> None:
    """The pages too: Flower 2.2 closes its API without auth, but serves its pages to all."""
    assert flower.get(path, auth=auth).status_code == 401
    assert flower.get(path).status_code == 200


def test_non_ascii_credentials_are_never_let_in(flower: Flower) -> None:
    """Flower compares str with hmac.compare_digest, which raises on non-ASCII: a 500 from
    Flower itself (upstream), but never a way in."""
    for auth in ((USER, "sécret"), ("öps", PASSWORD), (USER, PASSWORD + "🔑")):
        assert flower.get("/api/workers", auth=auth).status_code in (401, 500)


def test_api_lists_the_stack_worker(flower: Flower) -> None:
    name = f"w0@{socket.gethostname()}"

    def listed() -> bool:
        answer = flower.get("/api/workers?refresh=1")
        assert answer.status_code == 200
        return name in answer.json()

    poll(listed, 60, f"{name} not listed by /api/workers")


@pytest.mark.parametrize(
    ("task", "queue"),
    [("cascade.send_batch", "cascade-send"), ("cascade.poll_batch", "cascade-poll")],
)
def test_tasks_show_name_state_and_queue(flower: Flower, task: str, queue: str) -> None:
    """The sent event carries the routing key, so every finished task shows its queue."""

    def succeeded() -> list[dict[str, Any]]:
        return [t for t in flower.tasks(task).values() if t["state"] == "SUCCESS"]

    # Flower listened before the first message, so it saw every one of these being sent.
    done = poll(succeeded, 90, f"no successful {task} in /api/tasks")
    assert {t["name"] for t in done} == {task}
    assert {t["routing_key"] for t in done} == {queue}
    assert all(t["worker"].startswith("w0@") for t in done)


def test_ticks_stay_out_of_flowers_task_list(flower: Flower) -> None:
    """Beat sent ticks all along (every 0.5 s here), yet Flower lists only the work."""
    assert flower.tasks("cascade.send_batch")
    for tick in tick_tasks(app):
        assert flower.tasks(tick) == {}, tick
    listed = flower.get("/api/tasks").json().values()
    assert {t["name"] for t in listed} <= {
        "cascade.send_batch",
        "cascade.poll_batch",
        "cascade.enqueue",
    }


def test_intake_tasks_show_counts_and_ids_never_phones_or_texts(flower: Flower) -> None:
    """A producer sending by name puts the whole kwargs in argsrepr/kwargsrepr; the worker
    replaces them, so Flower's task view (from task-received) shows only a summary."""
    producer = Celery("producer", broker=flower.stack.settings.broker_url)
    producer.conf.update(result_backend=flower.stack.settings.broker_url)
    campaign = f"flower-intake-{time.monotonic_ns()}"
    batch = make_messages(3, campaign, text="your code is 7731-secret")
    batch[2]["toPhone"] = "380671234599"  # rejected
    sent = producer.send_task(
        "cascade.enqueue",
        kwargs={
            "messages": batch,
            "campaign": campaign,
            "callback_url": "https://u:pw1@h.example/x",
        },
        queue="cascade-intake",
    )
    assert [r["status"] for r in sent.get(timeout=60)] == ["accepted", "accepted", "rejected"]

    def finished() -> dict[str, Any]:
        answer = flower.get(f"/api/task/info/{sent.id}")
        return answer.json() if answer.status_code == 200 and answer.json().get("result") else {}

    shown = poll(finished, 30, f"flower never showed the result of {sent.id}")
    assert shown["name"] == "cascade.enqueue" and shown["state"] == "SUCCESS"
    assert f"<3 messages: {campaign}-0, {campaign}-1, {campaign}-2>" in shown["kwargs"]
    assert f"'campaign': '{campaign}'" in shown["kwargs"]
    assert "https://u:***@h.example/x" in shown["kwargs"]
    page = flower.get(f"/task/{sent.id}").text
    for leaked in [*(m["toPhone"] for m in batch), "7731-secret", "pw1"]:
        assert leaked not in json.dumps(shown) and leaked not in page
        assert leaked not in flower.stack.logs()


def test_password_is_never_logged(flower: Flower) -> None:
    poll(lambda: "Visit me at" in flower.log.read_text(errors="replace"), 10, "no banner")
    assert PASSWORD not in flower.log.read_text(errors="replace")
    assert f"{USER}:{PASSWORD}" not in flower.stack.logs()  # workers and simulator too


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port`, from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # host order
                found.add(str(ipaddress.ip_address(b"".join(words))))
    return found


def test_basic_auth_and_address_come_from_dotenv_without_flags(
    flower: Flower, tmp_path: Path
) -> None:
    """Flower reads only its environment; `-A worker` fills it from our settings, `.env` too.
    Without --address it binds FLOWER_ADDRESS (127.0.0.1), which its banner then shows."""
    (tmp_path / ".env").write_text("FLOWER_BASIC_AUTH=dotenv:from-dotenv\n")
    env = {k: v for k, v in flower.stack.workers.env.items() if not k.startswith("FLOWER_")}
    port = free_port()
    args = [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}"]
    log = (tmp_path / "flower.log").open("ab")
    popen = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    process = Process("flower-dotenv", popen, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/healthcheck").status_code == 200, 60, "flower")
        # The tasks page answers from Flower's memory, and is open when Flower has no auth.
        assert httpx.get(url + "/tasks", timeout=10).status_code == 401
        answer = httpx.get(url + "/tasks", auth=("dotenv", "from-dotenv"), timeout=10)
        assert answer.status_code == 200
        assert listening_addresses(port) == {"127.0.0.1"}
        banner = f"Visit me at http://127.0.0.1:{port}"
        assert banner in (tmp_path / "flower.log").read_text(errors="replace")
    finally:
        process.stop()
    assert "from-dotenv" not in (tmp_path / "flower.log").read_text(errors="replace")


def test_celery_sends_the_events_flower_needs() -> None:
    assert app.conf.worker_send_task_events is True
    assert app.conf.task_send_sent_event is True


def settings(**values: str) -> Settings:
    return Settings(_env_file=None, DATABASE_URL="sqlite:///x.db", **values)  # type: ignore[call-arg]


def test_flower_environment_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("FLOWER_MAX_TASKS", raising=False)
    defaults = {"FLOWER_MAX_TASKS": "10000", "FLOWER_ADDRESS": "127.0.0.1"}
    assert flower_environment(settings()) == defaults
    configured = settings(
        FLOWER_BASIC_AUTH="a:b,c:d:e", FLOWER_MAX_TASKS="500", FLOWER_ADDRESS="0.0.0.0"
    )
    assert flower_environment(configured) == {
        "FLOWER_MAX_TASKS": "500",
        "FLOWER_ADDRESS": "0.0.0.0",
        "FLOWER_BASIC_AUTH": "a:b,c:d:e",
    }
    assert "a:b" not in repr(configured)
    assert flower_environment(settings(FLOWER_BASIC_AUTH="")) == defaults


def test_a_flower_address_that_is_not_an_ip_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError) as info:
        settings(FLOWER_ADDRESS="every-interface")
    assert "FLOWER_ADDRESS" in str(info.value) and "IP address" in str(info.value)


@pytest.mark.parametrize("value", ["hunter2", "ops:hunter2,hunter2", ":hunter2", "ops:"])
def test_malformed_basic_auth_is_refused_without_echoing_it(value: str) -> None:
    with pytest.raises(ValidationError) as info:
        settings(FLOWER_BASIC_AUTH=value)
    assert "FLOWER_BASIC_AUTH" in str(info.value)
    assert "user:password" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_settings_errors_never_echo_secrets() -> None:
    """A model-level error would otherwise print every value it was given, keys included."""
    with pytest.raises(ValidationError) as info:
        settings(SMSBAT_API_KEY="key-hunter2", SEND_BATCH_MIN="500", SEND_BATCH_MAX="10")
    assert "SEND_BATCH_MIN" in str(info.value)
    assert "hunter2" not in str(info.value)
