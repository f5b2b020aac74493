"""Apps that share only the broker call `cascade.enqueue` by name."""

from __future__ import annotations

from celery import Celery

from tests.conftest import Stack, make_messages


def test_enqueue_task_by_name_answers_per_message(stack: Stack, sim, campaign: str) -> None:
    other_app = Celery("producer", broker=stack.settings.broker_url)
    other_app.conf.result_backend = stack.settings.broker_url
    batch = make_messages(3, campaign)
    batch[2]["messageType"] = "sms"

    result = other_app.send_task(
        "cascade.enqueue",
        kwargs={"messages": batch, "campaign": campaign},
        queue="cascade-intake",
    ).get(timeout=60)

    assert [r["status"] for r in result] == ["accepted", "accepted", "rejected"]
    assert result[0] == {"id": f"{campaign}-0", "status": "accepted", "state": "queued"}
    assert result[2]["errors"][0]["field"] == "messageType"
    report = stack.wait_final(campaign, 2)
    assert report["total"] == 2

    again = other_app.send_task(
        "cascade.enqueue", kwargs={"messages": batch[:1]}, queue="cascade-intake"
    ).get(timeout=60)
    assert again[0]["status"] == "duplicate"
    assert again[0]["state"] in {"delivered", "undeliverable", "permanenterror"}
