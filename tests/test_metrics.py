"""Monitoring: /metrics against the database and the simulator, health, alerts, JSON logs.

A real worker (prefork, multiprocess metrics) and a real API on PostgreSQL run a campaign
against the simulator with 429s and 500s; what a scrape says must match what the database
holds and what the simulator counted.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from config import Settings
from tests.conftest import Stack, make_messages, make_stack
from worker.dev.stack import Api, free_port, start_api, wait_for
from worker.flows.producer import enqueue
from worker.observe.gauges import SEND_PAUSES, Totals
from worker.observe.health import record_tick
from worker.store.models import messages
from worker.store.pacing import get_pacing

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "api-token-for-metrics"
METRICS_TOKEN = "metrics-token-xyz"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(api: Api, token: str = METRICS_TOKEN) -> Samples:
    response = httpx.get(
        api.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of `name` that has `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def monitored(
    database_factory: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Api]]:
    """A worker with beat and an API sharing a multiprocess directory, JSON logs on."""
    directory = tmp_path_factory.mktemp("prometheus")
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "LOG_FORMAT": "json",
        "METRICS_TOTALS_SECONDS": "0",  # every scrape counts the totals afresh
        "API_TOKEN": API_TOKEN,
        "METRICS_TOKEN": METRICS_TOKEN,
        "WEBHOOK_TOKEN": "webhook-token",
    }
    with make_stack(database_factory("postgresql"), "postgresql", env) as stack:
        api_env = {
            **env,
            "DATABASE_URL": stack.settings.database_url,
            "BROKER_URL": stack.settings.broker_url,
        }
        api = start_api(stack.workers.logdir, api_env, "api-metrics")
        try:
            yield stack, api
        finally:
            api.process.stop()


def test_a_campaign_with_faults_is_counted_as_the_database_and_the_simulator_saw_it(
    monitored: tuple[Stack, Api], campaign: str
) -> None:
    stack, api = monitored
    sim = stack.simulator
    sim.admin("/_sim/reset", {})
    before = scrape(api)
    sim.configure(throttle_next=2, retry_after="1", fail_next_sends=1, delay_min=0.2, delay_max=1)
    results = stack.enqueue(make_messages(300, campaign), campaign)
    assert {r.status for r in results} == {"accepted"}
    stack.wait_final(campaign, 300)
    stats = sim.stats()

    latest: dict[str, Samples] = {}

    def delta(name: str, **labels: str) -> float:
        return total(latest["after"], name, **labels) - total(before, name, **labels)

    def counted() -> bool:  # the last task counts just after its rows are written
        latest["after"] = scrape(api)
        return bool(
            delta("cascade_send_requests_total") == stats["send_requests"]
            and delta("cascade_status_checks_total") == sim.stats()["status_requests"]
        )

    wait_for(counted, 30, "the workers' counters to catch up")
    after = latest["after"]
    sends = stats["send_status"]
    assert sends.get("429") == 2 and sends.get("500") == 1
    assert delta("cascade_send_requests_total", outcome="429") == 2
    assert delta("cascade_send_requests_total", outcome="5xx") == 1
    assert delta("cascade_send_requests_total", outcome="200") == sends["200"]
    assert delta("cascade_messages_submitted_total") == stats["messages_accepted"] == 300
    assert delta("cascade_send_results_total", state="submitted") == 300
    assert delta("cascade_provider_request_seconds_count", kind="send") == stats["send_requests"]
    checks = sim.stats()["status_requests"]
    assert delta("cascade_provider_request_seconds_count", kind="status") == checks
    assert delta("cascade_status_checks_total", outcome="200") == checks

    with stack.engine.connect() as conn:
        by_state = dict(
            conn.execute(select(messages.c.state, func.count()).group_by(messages.c.state)).all()
        )
        mine = dict(
            conn.execute(
                select(messages.c.state, func.count())
                .where(messages.c.campaign == campaign)
                .group_by(messages.c.state)
            ).all()
        )
        by_poll = conn.execute(
            select(func.count()).where(
                messages.c.campaign == campaign, messages.c.final_source == "poll"
            )
        ).scalar_one()
    for state, n in by_state.items():
        assert value(after, "cascade_messages", state=state) == n, state
    for state, n in mine.items():
        assert value(after, "cascade_campaign_messages", campaign=campaign, state=state) == n
    assert value(after, "cascade_oldest_queued_age_seconds") == 0
    assert delta("cascade_submit_to_final_seconds_count") == by_poll == 300
    assert value(after, "cascade_beat_last_tick_timestamp_seconds") > time.time() - 30


def test_the_send_pause_shows_with_its_reason(monitored: tuple[Stack, Api]) -> None:
    stack, api = monitored
    pacing = get_pacing(stack.settings.broker_url)
    pacing.pause(SEND_PAUSES["circuit"], 30)
    try:
        samples = scrape(api)
    finally:
        redis.Redis.from_url(stack.settings.broker_url).delete(
            "cascade:pause:" + SEND_PAUSES["circuit"]
        )
    assert 25 < value(samples, "cascade_send_paused_seconds", reason="circuit") <= 30
    assert value(samples, "cascade_send_paused_seconds", reason="throttle") == 0


def test_webhook_pushes_are_counted_by_outcome(monitored: tuple[Stack, Api]) -> None:
    _, api = monitored
    before = scrape(api)
    refused = httpx.post(api.url + "/webhooks/smsbat?token=wrong", json={}, timeout=10)
    accepted = httpx.post(
        api.url + "/webhooks/smsbat?token=webhook-token",
        json={"messageId": "nobody-knows", "deliverystatus": "delivered"},
        timeout=10,
    )
    assert (refused.status_code, accepted.status_code) == (401, 200)
    after = scrape(api)
    for outcome in ("401", "accepted"):
        labels = {"source": "smsbat", "outcome": outcome}
        assert (
            value(after, "cascade_webhook_pushes_total", **labels)
            - value(before, "cascade_webhook_pushes_total", **labels)
            == 1
        )


def test_a_wrong_or_missing_token_is_refused(monitored: tuple[Stack, Api]) -> None:
    _, api = monitored
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {API_TOKEN}"}):
        response = httpx.get(api.url + "/metrics", headers=headers, timeout=10)
        assert response.status_code == 401, headers  # METRICS_TOKEN is set: API_TOKEN is not it
        assert "cascade_" not in response.text


def test_healthz_reports_beat_and_the_queue(monitored: tuple[Stack, Api]) -> None:
    _, api = monitored
    # Beat's first tick comes a moment after the stack starts; this test may be the first
    # the module runs (a pytest-xdist worker of its own): wait for the tick, do not race it.
    wait_for(
        lambda: httpx.get(api.url + "/healthz", timeout=10).json()["beat"] == "ok",
        30,
        "beat's first tick on /healthz",
    )
    response = httpx.get(api.url + "/healthz", timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["beat"], body["queue"]) == ("ok", "ok")
    assert body["beat_last_tick"].endswith("Z")
    assert body["oldest_queued_seconds"] == 0


def test_json_logs_carry_fields_and_no_phone_or_secret(
    monitored: tuple[Stack, Api], campaign: str
) -> None:
    stack, _ = monitored
    stack.enqueue(make_messages(5, campaign, start=500), campaign)
    stack.wait_final(campaign, 5)
    logs = stack.logs()
    entries = []
    for line in logs.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    batches = [e for e in entries if e.get("claim_token") and e.get("route") == "standard"]
    assert batches, "no send batch logged with its claim token and route"
    assert {e.get("campaign") for e in batches} >= {campaign}
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e.get("task_name") == "cascade.send_batch" for e in batches)
    assert any(
        e["logger"].startswith("uvicorn") or e["logger"] == "worker.http.app" for e in entries
    )
    assert not re.search(r"\+38067\d{7}", logs), "a full phone number reached the logs"
    for secret in (API_TOKEN, METRICS_TOKEN, "webhook-token", "test-key"):
        assert secret not in logs


# --- without workers: outages, thresholds, the standalone exporter ------------------------------


@pytest.fixture
def lone(
    database_factory: Callable[[str], str], redis_db: str, tmp_path: Path
) -> Iterator[tuple[Settings, Api]]:
    """An API on a fresh SQLite database and a Redis DB of its own, strict thresholds."""
    env = {
        "DATABASE_URL": database_factory("sqlite"),
        "BROKER_URL": redis_db,
        "API_TOKEN": API_TOKEN,
        "HEALTH_QUEUE_MAX_AGE_SECONDS": "1",
        "HEALTH_BEAT_MAX_AGE_SECONDS": "60",
        "METRICS_TOTALS_SECONDS": "0",
    }
    api = start_api(tmp_path, env, "api-lone")
    try:
        yield Settings(**env), api  # type: ignore[arg-type]
    finally:
        api.process.stop()


def test_healthz_answers_503_when_beat_is_stale_or_the_queue_stuck(
    lone: tuple[Settings, Api],
) -> None:
    settings, api = lone
    first = httpx.get(api.url + "/healthz", timeout=10)
    assert first.status_code == 200  # never ticked (no beat yet) and nothing queued
    assert (first.json()["beat"], first.json()["queue"]) == ("unknown", "ok")

    record_tick(settings.broker_url, now=time.time() - 600)
    stale = httpx.get(api.url + "/healthz", timeout=10)
    assert stale.status_code == 503 and stale.json()["beat"] == "stale"
    record_tick(settings.broker_url)
    assert httpx.get(api.url + "/healthz", timeout=10).json()["beat"] == "ok"

    enqueue(make_messages(1, "stuck"), "stuck", settings=settings)  # no worker will send it
    wait_for(
        lambda: httpx.get(api.url + "/healthz", timeout=10).status_code == 503, 10, "stuck queue"
    )
    stuck = httpx.get(api.url + "/healthz", timeout=10).json()
    assert stuck["queue"] == "stuck" and stuck["oldest_queued_seconds"] >= 1
    samples = scrape(api, API_TOKEN)  # no METRICS_TOKEN: the API token opens /metrics
    assert value(samples, "cascade_messages", state="queued") == 1
    assert value(samples, "cascade_oldest_queued_age_seconds") >= 1
    assert value(samples, "cascade_campaign_messages", campaign="stuck", state="queued") == 1


def test_cascade_health_beat_exit_status(redis_db: str) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "BROKER_URL": redis_db, "DATABASE_URL": "sqlite://"}
        command = [sys.executable, "-m", "worker.ops.cli", "health", "beat", "--max-age", "60"]
        return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)

    never = run()
    assert never.returncode == 1 and "beat unknown" in never.stdout
    record_tick(redis_db, now=time.time() - 120)
    assert run().returncode == 1
    record_tick(redis_db)
    fresh = run()
    assert fresh.returncode == 0 and "beat ok" in fresh.stdout


def test_a_scrape_during_a_database_outage_answers_503_quickly(
    redis_db: str, tmp_path: Path
) -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nobody listens there
    env = {"DATABASE_URL": down, "BROKER_URL": redis_db, "METRICS_TOKEN": METRICS_TOKEN}
    port = free_port()
    args = [sys.executable, "-m", "worker.ops.cli", "metrics", "--port", str(port)]
    process = subprocess.Popen(
        args, env={"PATH": "/usr/bin:/bin", **env}, cwd=ROOT, stderr=subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: httpx.get(url, timeout=5).status_code == 401, 20, "cascade metrics")
        started = time.monotonic()
        response = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30)
        assert response.status_code == 503
        assert time.monotonic() - started < 10  # refused connections fail at once
        no_db = subprocess.run(
            [*args[:-2], "--no-db", "--port", str(free_port())],
            env={"PATH": "/usr/bin:/bin", **env, "METRICS_TOKEN": ""},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert no_db.returncode != 0 and "METRICS_TOKEN" in no_db.stderr  # no token: no start
    finally:
        process.terminate()
        process.wait(10)
    assert down.split("@")[1] not in process.stderr.read().decode()  # type: ignore[union-attr]


# --- pure: cardinality, alert rules, the dashboard --------------------------------------------


def test_campaign_labels_are_bounded_and_the_counts_kept() -> None:
    totals = Totals({(f"c{i:02d}", "delivered"): i + 1 for i in range(30)})
    totals.by_campaign[("c00", "queued")] = 5  # moving: shown first, however small
    shown = totals.top_campaigns(5)
    names = {campaign for campaign, _ in shown}
    assert len(names) == 6 and "other" in names and "c00" in names
    assert sum(shown.values()) == sum(totals.by_campaign.values())


EXPORTED_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")


def exported_names() -> set[str]:
    """Every metric family the code can export, from the definitions and the collector."""
    from worker.observe import gauges, metrics

    names = {
        collector._name  # type: ignore[attr-defined]
        for collector in vars(metrics).values()
        if hasattr(collector, "_name") and hasattr(collector, "_type")
    }
    source = Path(gauges.__file__).read_text()
    names |= set(re.findall(r'"(cascade_[a-z_]+)"', source))
    return {name + suffix for name in names for suffix in EXPORTED_SUFFIXES}


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\bcascade_[a-z_]+", text))


@pytest.mark.parametrize("path", ["deploy/prometheus/alerts.yml", "deploy/grafana/cascade.json"])
def test_alerts_and_dashboard_use_only_metrics_the_code_exports(path: str) -> None:
    text = (ROOT / path).read_text()
    used = referenced_names(text)
    assert len(used) >= 5
    assert used <= exported_names(), used - exported_names()


def test_the_dashboard_is_grafana_json_over_prometheus() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/cascade.json").read_text())
    assert dashboard["uid"] == "cascade"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus"
        assert panel["targets"] and all("cascade_" in t["expr"] for t in panel["targets"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("submitted", "state", "latency", "pause", "queued"):
        assert topic in titles, topic


def test_alert_rules_are_well_formed() -> None:
    """The schema test (runs with or without promtool): every rule named, typed, labelled."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "CascadeSendingUnauthorized",
        "CascadeQueueStuck",
        "CascadeStatusChecksBehind",
        "CascadeWebhookRefusing",
        "CascadeCallbacksDying",
        "CascadeBeatNotTicking",
    }
    for name, rule in alerts.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("page", "warn"), name
        assert rule["annotations"]["summary"], name
    assert alerts["CascadeSendingUnauthorized"]["for"] == "1m"
    assert 'reason="circuit"' in alerts["CascadeSendingUnauthorized"]["expr"]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); schema test ran")
    return found


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", "deploy/prometheus/alerts.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_the_rules_fire_for_a_paused_circuit_and_a_stuck_queue() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        cwd=ROOT / "deploy/prometheus",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_fails_a_rule_that_does_not_fire(tmp_path: Path) -> None:
    """The rules test can fail: a rule that never fires is caught."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "CascadeQueueStuck":
            rule["expr"] = "max(cascade_oldest_queued_age_seconds) > 1e9"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(ROOT / "deploy/prometheus/alerts_test.yml", tmp_path)
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
