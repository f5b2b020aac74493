"""Pushed reports end to end: the simulator pushes to our API, the worker applies them.

Webhooks are the first source of truth here and polling only reconciles what they miss:
duplicates, reordering, pushes that arrive before our send answer is committed, and lost
pushes must all end in the same, correct final states.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select

from tests.conftest import Stack, make_messages, make_stack
from worker.dev.stack import Api, start_api, wait_for
from worker.flows.inbox import list_inbound
from worker.store.models import messages

TOKEN = "hook-token"


@pytest.fixture(scope="module")
def pushed(
    database_factory: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Api]]:
    env = {
        # The workers count in multiprocess mode; the API's /metrics sums what they counted.
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus-push")),
        "WEBHOOK_TOKEN": TOKEN,
        "API_TOKEN": "api-token",
        "WEBHOOKS_ENABLED": "true",
        "POLL_FIRST_DELAY_WITH_WEBHOOKS_SECONDS": "20",  # slack for a loaded machine
        "REPORTS_INTERVAL_SECONDS": "0.5",
        "BULKGATE_PRICE_CURRENCY": "UAH",
    }
    with make_stack(database_factory("postgresql"), "postgresql", env) as stack:
        api = start_api(stack.workers.logdir, stack.workers.env)
        try:
            yield stack, api
        finally:
            api.process.stop()


def _finals_observed(api: Api) -> float:
    """cascade_submit_to_final_seconds_count as the API's /metrics serves it."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    answer = httpx.get(
        api.url + "/metrics", headers={"Authorization": "Bearer api-token"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == "cascade_submit_to_final_seconds_count"
    )


def _final_states(stack: Stack, campaign: str) -> dict[str, str]:
    """Our final states; BulkGate has no permanent-error code (3 is "not delivered")."""
    with stack.engine.connect() as conn:
        rows = conn.execute(select(messages).where(messages.c.campaign == campaign))
        return {r.id: r.state for r in rows}


def _as_bulkgate(state: str | None) -> str | None:
    return "undeliverable" if state == "permanenterror" else state


def test_status_webhooks_deliver_every_final_without_polling(pushed, campaign: str) -> None:
    stack, api = pushed
    sim = stack.simulator
    sim.admin("/_sim/reset", {})
    sim.configure(
        delay_min=0.3,
        delay_max=1.5,
        webhook_url=f"{api.url}/webhooks/smsbat",
        webhook_token=TOKEN,
        dlr_url=None,
        push_duplicates=0.3,
        push_reorder=True,
        push_early=True,
        push_drop=0.0,
    )

    before = _finals_observed(api)
    stack.enqueue(make_messages(200, campaign), campaign)
    report = stack.wait_final(campaign, 200, timeout=60)

    assert report["finals_by_source"] == {"webhook": 200}
    # Finished by webhooks, not polls: each still counts in the submit → final histogram.
    wait_for(lambda: _finals_observed(api) - before >= 200, 30, "the latency histogram")
    assert _finals_observed(api) - before == 200
    at_provider = sim.admin("/_sim/messages")
    assert _final_states(stack, campaign) == {k: v["final"] for k, v in at_provider.items()}
    stats = sim.stats()
    assert stats["pushes_duplicated"] > 0 and stats["pushes_failed"] == 0
    assert stats["status_requests"] == 0  # no poll was due yet: webhooks did it all


def test_bulkgate_reports_with_losses_are_reconciled_by_polling(pushed, campaign: str) -> None:
    stack, api = pushed
    sim = stack.simulator
    sim.admin("/_sim/reset", {})
    sim.configure(
        delay_min=0.3,
        delay_max=1.0,
        webhook_url=None,
        dlr_url=f"{api.url}/webhooks/bulkgate?token={TOKEN}",
        dlr_form="json",
        push_duplicates=0.2,
        push_reorder=True,
        push_early=False,
        push_drop=0.25,
        inbound_rate=0.2,
    )

    stack.enqueue(make_messages(300, campaign), campaign)
    report = stack.wait_final(campaign, 300, timeout=90)

    sources = report["finals_by_source"]
    assert set(sources) == {"dlr", "poll"} and sum(sources.values()) == 300
    at_provider = sim.admin("/_sim/messages")
    ours = {k: _as_bulkgate(v) for k, v in _final_states(stack, campaign).items()}
    assert ours == {k: _as_bulkgate(v["final"]) for k, v in at_provider.items()}
    assert sim.stats()["status_requests"] < 300  # only what the reports missed was polled
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not list_inbound(stack.engine, 5):
        time.sleep(0.2)
    replies = list_inbound(stack.engine, 1000)
    assert replies and all(r["replyTo"] and r["replyTo"].startswith(campaign) for r in replies)


def test_a_refused_push_changes_nothing(pushed, campaign: str) -> None:
    import httpx

    stack, api = pushed
    stack.simulator.admin("/_sim/reset", {})
    bad = httpx.post(
        f"{api.url}/webhooks/smsbat",
        json={"messageId": "x", "deliverystatus": "delivered"},
        headers={"Authorization": "Bearer wrong"},
    )
    assert bad.status_code == 401
    from sqlalchemy import func

    from worker.store.models import provider_reports

    with stack.engine.connect() as conn:
        stored = conn.execute(
            select(func.count())
            .select_from(provider_reports)
            .where(provider_reports.c.provider_message_id == "x")
        ).scalar_one()
    assert stored == 0


def test_a_report_from_bulkgate_pushes_stays_true(pushed, campaign: str) -> None:
    """Issue 13: with BulkGate DLRs, no amounts added across currencies, no channel called
    "none" that the source never reported, and a reason beside every failure."""
    from worker.ops.html_report import render_html
    from worker.ops.reports import campaign_report, deliveries_over_time

    stack, api = pushed
    sim = stack.simulator
    sim.admin("/_sim/reset", {})
    sim.configure(
        delay_min=0.3,
        delay_max=1.0,
        webhook_url=None,
        dlr_url=f"{api.url}/webhooks/bulkgate?token={TOKEN}",
        dlr_form="json",
        push_duplicates=0.0,
        push_reorder=False,
        push_early=False,
        push_drop=0.0,
        inbound_rate=0.0,
        mix={"delivered": 1, "undeliverable": 1},
        seed=13,
    )

    stack.enqueue(make_messages(100, campaign), campaign)
    stack.wait_final(campaign, 100, timeout=60)

    report = campaign_report(stack.engine, campaign)
    assert report is not None and report["finals_by_source"] == {"dlr": 100}
    failed = report["states"].get("undeliverable", 0)
    assert 0 < failed < 100
    assert list(report["money"]) == ["UAH"] and report["cost_currency"] == "UAH"
    assert report["cost"] == report["money"]["UAH"]["cost"]
    assert report["channels"] == {"not reported": 100}
    assert report["top_errors"] == [{"code": "BULKGATE_3", "count": failed}]
    page = render_html(report, deliveries_over_time(stack.engine, campaign))
    assert "No error codes recorded" not in page and ">none<" not in page
    assert "Cost UAH" in page and "Cost unknown" not in page
    sim.configure(mix={"delivered": 0.9, "undeliverable": 0.07, "permanenterror": 0.03})
