"""Apps that share only the broker call `cascade.enqueue` by name."""

from __future__ import annotations

import re
from typing import Any

import pytest
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


HOSTILE_CALLS: list[tuple[dict[str, Any], str]] = [
    ({"messages": "+380671234567"}, "messages: must be an array of message objects"),
    ({"messages": {"id": "x"}}, "messages: must be an array of message objects"),
    ({"messages": None}, "messages: must be an array of message objects"),
    ({"messages": [], "campaign": 5}, "campaign must be a non-empty string"),
    ({"messages": [], "campaign": "a\x00"}, "campaign must not contain control characters"),
    ({"messages": [], "callback_url": 7}, "callback_url must be a string"),
    ({"messages": [], "callback_task": "not a task!"}, "callback_task must be a Celery task"),
    ({"messages": [], "surprise": 1}, "unexpected keyword argument 'surprise'"),
]


def test_the_intake_task_survives_hostile_calls_and_keeps_valid_messages(
    stack: Stack, sim, campaign: str
) -> None:
    """By name, anything can arrive: each call fails alone with a clear error, a hostile
    batch is answered per message, and the same worker still delivers what was valid."""
    producer = Celery("producer", broker=stack.settings.broker_url)
    producer.conf.update(result_backend=stack.settings.broker_url)

    def call(kwargs: dict[str, Any]) -> Any:
        sent = producer.send_task("cascade.enqueue", kwargs=kwargs, queue="cascade-intake")
        return sent.get(timeout=60)

    for kwargs, error in HOSTILE_CALLS:
        with pytest.raises(Exception, match=re.escape(error)):
            call(kwargs)
    valid = make_messages(3, campaign)
    hostile = [
        {**valid[0], "id": f"{campaign}-sur", "text": "a\ud800"},
        {**valid[0], "id": f"{campaign}-nul", "fromName": "a\x00"},
        {**valid[0], "id": f"{campaign}-astral", "text": "\U0010ffff" * 5000},
        [valid[0]],
        None,
    ]
    answers = call({"messages": [valid[0], *hostile, *valid[1:]], "campaign": campaign})
    assert [a["status"] for a in answers] == ["accepted"] + ["rejected"] * 5 + ["accepted"] * 2
    assert answers[1]["errors"][0]["field"] == "text"
    assert stack.wait_final(campaign, 3)["total"] == 3
