"""No secret and no whole phone number in any process's log, on a real pipeline.

One small deployment with distinctive secrets everywhere they can be configured: a worker
with beat at DEBUG, the API (webhooks signed) at INFO, Flower behind basic auth and the
simulator pushing signed webhooks. Messages go in by HTTP, by task name and by CSV, some
rejected, some refused calls with wrong credentials; then every log file is scanned.
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from config import Settings
from tests.conftest import FAST, REDIS, SIMULATOR_DEFAULTS, claim_redis_db, release_redis_db
from worker.dev.stack import free_port, spawn, start_api, start_simulator, wait_for, workers
from worker.ops.reports import campaign_summary
from worker.store.db import get_engine

SECRETS = {
    "SMSBAT_API_KEY": "smsbat-key-Xk41",
    "SMSBAT_USERNAME": "smsbat-user",
    "SMSBAT_PASSWORD": "smsbat-pass-Xk42",
    "SMSBAT_VIBER_TOKEN": "viber-token-Xk43",
    "SMSBAT_TG_BOT_KEY": "tg-bot-key-Xk44",
    "API_TOKEN": "api-token-Xk45",
    "WEBHOOK_TOKEN": "webhook-token-Xk46",
    "WEBHOOK_SIGNING_SECRET": "webhook-signing-Xk47",
    "CALLBACK_SIGNING_SECRET": "callback-signing-Xk48",
    "FLOWER_BASIC_AUTH": "ops:flower-pass-Xk49",
}
DB_PASSWORD = "db-pass-Xk50"  # PostgreSQL here trusts local users, so any password connects
PHONES = [f"+38067{n:07d}" for n in range(4100100, 4100106)]


def _messages(prefix: str, phones: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}-{i}",
            "fromName": "Shop",
            "toPhone": phone,
            "messageType": "transaction",
            "text": f"code {i}",
        }
        for i, phone in enumerate(phones)
    ]


def _wait_final(url: str, campaign: str, total: int, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = campaign_summary(get_engine(url), campaign)
        if report and report["final"] >= total:
            return report
        time.sleep(0.3)
    raise AssertionError(f"{campaign} not final within {timeout}s")


def _leaks(text: str, needles: list[str]) -> list[str]:
    """Each needle found, with a little context, so a failure says where it leaked."""
    found = []
    for needle in needles:
        for match in re.finditer(re.escape(needle), text):
            found.append(text[max(0, match.start() - 120) : match.end() + 40])
    return found


@pytest.mark.timeout(240)
def test_no_process_logs_a_secret_or_a_whole_phone_number(
    database_factory: Callable[[str], str], tmp_path: Path
) -> None:
    plain = database_factory("postgresql")
    url = plain.replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
    index = claim_redis_db()
    broker = f"{REDIS}/{index}"
    env = {
        **FAST,
        **SECRETS,
        "DATABASE_URL": url,
        "BROKER_URL": broker,
        "SMSBAT_STATUS_AUTH": "basic",
        "WEBHOOKS_ENABLED": "true",
        "POLL_FIRST_DELAY_WITH_WEBHOOKS_SECONDS": "3",
        "REPORTS_INTERVAL_SECONDS": "0.5",
        "WEBHOOK_MAX_BODY_BYTES": "4096",
    }
    campaign = f"secrets-{uuid.uuid4().hex[:6]}"
    try:
        with workers({}, tmp_path) as group:
            simulator = start_simulator(tmp_path, api_key=SECRETS["SMSBAT_API_KEY"])
            try:
                simulator.configure(
                    **{**SIMULATOR_DEFAULTS, "api_key": SECRETS["SMSBAT_API_KEY"]},
                    username=SECRETS["SMSBAT_USERNAME"],
                    password=SECRETS["SMSBAT_PASSWORD"],
                )
                group.env |= {**env, "SMSBAT_BASE_URL": simulator.url}
                args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-l", "debug"]
                args += ["-c", "2", "-n", "w0@%h", "--without-gossip", "--without-mingle", "-B"]
                args += ["--schedule", str(tmp_path / "beat-schedule")]
                group.processes.append(spawn("worker", args, group.env, tmp_path))
                flower_port = free_port()
                flower_args = [sys.executable, "-m", "celery", "-A", "worker", "flower"]
                flower_args += ["--address=127.0.0.1", f"--port={flower_port}"]
                group.processes.append(spawn("flower", flower_args, group.env, tmp_path))
                api = start_api(tmp_path, group.env)
                group.processes.append(api.process)
                simulator.configure(
                    webhook_url=f"{api.url}/webhooks/smsbat",
                    webhook_token=SECRETS["WEBHOOK_TOKEN"],
                    webhook_secret=SECRETS["WEBHOOK_SIGNING_SECRET"],
                    delay_min=0.3,
                    delay_max=1.0,
                )
                flower = f"http://127.0.0.1:{flower_port}"
                wait_for(
                    lambda: httpx.get(flower + "/healthcheck").status_code == 200, 60, "flower"
                )
                _drive(api.url, flower, broker, campaign, tmp_path)
                report = _wait_final(plain, campaign, 5)
                assert report["finals_by_source"].get("webhook")  # signed pushes got in
            finally:
                simulator.process.stop()
    finally:
        release_redis_db(index)

    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert {"worker.log", "api.log", "flower.log", "simulator.log"} <= set(logs)
    assert "DEBUG" in logs["worker.log"] and "succeeded" in logs["worker.log"]
    needles = [v.split(":")[-1] for v in SECRETS.values() if v != "smsbat-user"]
    needles += [DB_PASSWORD, *PHONES, *(p.removeprefix("+") for p in PHONES)]
    leaks = {name: _leaks(text, needles) for name, text in logs.items()}
    assert {name: found for name, found in leaks.items() if found} == {}


def _drive(api: str, flower: str, broker: str, campaign: str, tmp_path: Path) -> None:
    """Every door, with good and bad input and good and bad credentials."""
    auth = {"Authorization": f"Bearer {SECRETS['API_TOKEN']}"}
    bad = {**_messages(f"{campaign}-bad", PHONES[5:6])[0], "toPhone": PHONES[5].lstrip("+")}
    answer = httpx.post(
        f"{api}/v1/messages",
        params={"campaign": campaign},
        json=[*_messages(f"{campaign}-http", PHONES[:3]), bad],
        headers=auth,
        timeout=30,
    )
    assert [r["status"] for r in answer.json()] == ["accepted"] * 3 + ["rejected"]
    wrong = httpx.post(f"{api}/v1/messages", json=[], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    hook = httpx.post(f"{api}/webhooks/smsbat?token=wrong-Xk99", content=b"{}", timeout=30)
    assert hook.status_code == 401
    unsigned = httpx.post(
        f"{api}/webhooks/smsbat", content=b"{}", headers={"Authorization": "Bearer "
        + SECRETS["WEBHOOK_TOKEN"]}, timeout=30,
    )  # fmt: skip
    assert unsigned.status_code == 401
    chunked = httpx.post(  # no Content-Length: refused while it streams in
        f"{api}/webhooks/smsbat",
        content=(b" " * 1024 for _ in range(10)),
        headers={"Authorization": "Bearer " + SECRETS["WEBHOOK_TOKEN"]},
        timeout=30,
    )
    assert chunked.status_code == 413 and "larger than 4096 bytes" in chunked.text

    producer = Celery("producer", broker=broker)
    producer.conf.update(result_backend=broker)
    by_name = producer.send_task(
        "cascade.enqueue",
        kwargs={"messages": _messages(f"{campaign}-task", PHONES[3:5]), "campaign": campaign},
        queue="cascade-intake",
    ).get(timeout=60)
    assert [r["status"] for r in by_name] == ["accepted", "accepted"]
    not_a_list = producer.send_task(
        "cascade.enqueue", kwargs={"messages": PHONES[0]}, queue="cascade-intake"
    )
    with pytest.raises(ValueError, match="messages: must be an array of message objects"):
        not_a_list.get(timeout=60)

    flower_auth = tuple(SECRETS["FLOWER_BASIC_AUTH"].split(":"))
    assert httpx.get(f"{flower}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{flower}/api/tasks", auth=flower_auth, timeout=10).status_code == 200
    settings_repr = repr(Settings(_env_file=None, DATABASE_URL="sqlite:///x.db", **SECRETS))  # type: ignore[arg-type]
    assert not any(v.split(":")[-1] in settings_repr for v in SECRETS.values() if "user" not in v)
