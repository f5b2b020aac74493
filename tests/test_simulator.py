"""The provider simulator, exercised over a real loopback socket as the worker will use it."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from tests.helpers import KEY, SEND, batch, running_simulator, stats
from worker.dev.simulator import SimulatorConfig

SEND_TG_VIBER = "/api/CascadeMessage/send_message/tg-viber/async"


@pytest.fixture(scope="module")
def simulator() -> Iterator[httpx.Client]:
    """One server for the module; tests reconfigure it through the admin endpoints."""
    with running_simulator(SimulatorConfig()) as client:
        yield client


@pytest.fixture
def start(simulator: httpx.Client) -> Callable[..., httpx.Client]:
    """Give the simulator a fresh seeded config with ``overrides``, and clear its records."""

    def _start(**overrides: Any) -> httpx.Client:
        changes = {**asdict(SimulatorConfig(seed=7)), **overrides}
        assert simulator.post("/_sim/config", json=changes).status_code == 200
        assert simulator.post("/_sim/reset").status_code == 200
        return simulator

    return _start


def send_one(client: httpx.Client, **extra: Any) -> str:
    """Send one message and return its messageId."""
    answer = client.post(SEND, json=batch(1, **extra), headers=KEY)
    assert answer.status_code == 200
    return answer.json()[0]["messageId"]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_health(start: Callable[..., httpx.Client]) -> None:
    client = start()
    assert client.get("/_sim/health").json() == {"ok": True}


def test_send_answer_is_shuffled_and_maps_by_tracking_id(
    start: Callable[..., httpx.Client],
) -> None:
    client = start()
    sent = batch(50)
    answer = client.post(SEND, json=sent, headers=KEY)

    assert answer.status_code == 200
    items = answer.json()
    tracking_ids = [item["trackinId"] for item in items]
    assert sorted(tracking_ids) == sorted(m["id"] for m in sent)
    assert tracking_ids != [m["id"] for m in sent], "answer should be shuffled"
    message_ids = [item["messageId"] for item in items]
    assert len(set(message_ids)) == 50
    assert all(uuid.UUID(mid).version == 4 for mid in message_ids)

    recorded = client.get("/_sim/messages").json()
    for item in items:
        entry = recorded[item["trackinId"]]
        assert entry["messageIds"] == [item["messageId"]]
        assert (entry["sends"], entry["route"], entry["polls"]) == (1, "standard", 0)
    counters = stats(client)
    assert counters["messages_accepted"] == 50
    assert counters["max_batch"] == 50
    assert counters["send_status"]["200"] == 1


def test_unshuffled_answer_keeps_order(start: Callable[..., httpx.Client]) -> None:
    client = start(shuffle=False)
    answer = client.post(SEND, json=batch(20), headers=KEY).json()
    assert [item["trackinId"] for item in answer] == [f"m{i}" for i in range(20)]


def test_tg_viber_route_and_auth_headers_seen(start: Callable[..., httpx.Client]) -> None:
    client = start()
    headers = {**KEY, "X-Tg-Bot-Key": "bot", "X-Viber-Auth-Token": "viber"}
    assert client.post(SEND_TG_VIBER, json=batch(1), headers=headers).status_code == 200

    assert client.get("/_sim/messages").json()["m0"]["route"] == "tg-viber"
    assert stats(client)["auth_headers_seen"] == [
        "X-Authorization-Key",
        "X-Tg-Bot-Key",
        "X-Viber-Auth-Token",
    ]


def test_resent_tracking_id_is_accepted_again_and_counted(
    start: Callable[..., httpx.Client],
) -> None:
    client = start()
    first = send_one(client)
    second = send_one(client)

    assert first != second
    entry = client.get("/_sim/messages").json()["m0"]
    assert entry["messageIds"] == [first, second]
    assert entry["sends"] == 2
    counters = stats(client)
    assert counters["unique_tracking_ids"] == 1
    assert counters["duplicate_tracking_ids"] == 1
    assert counters["messages_accepted"] == 2


def test_wrong_key_is_401_on_send_and_status(start: Callable[..., httpx.Client]) -> None:
    client = start()
    refused = client.post(SEND, json=batch(1), headers={"X-Authorization-Key": "wrong"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "UNAUTHORIZED"
    assert client.get("/_sim/messages").json() == {}

    message_id = send_one(client)
    path = f"/bat/message/{message_id}"
    assert client.get(path, headers={"X-Authorization-Key": "wrong"}).status_code == 401
    assert client.get(path).status_code == 401
    assert client.get(path, headers=basic("user", "wrong")).status_code == 401
    counters = stats(client)
    assert counters["send_status"]["401"] == 1
    assert counters["status_by_code"]["401"] == 3


def test_status_accepts_all_three_auth_methods(start: Callable[..., httpx.Client]) -> None:
    client = start(username="alice", password="s3cret", api_key="k-42")
    answer = client.post(SEND, json=batch(1), headers={"X-Authorization-Key": "k-42"})
    path = f"/bat/message/{answer.json()[0]['messageId']}"

    for headers in (
        {"X-Authorization-Key": "k-42"},
        basic("alice", "s3cret"),
        basic("@", "k-42"),
    ):
        assert client.get(path, headers=headers).status_code == 200, headers
    assert client.get(path, headers=basic("@", "test-key")).status_code == 401


def test_unknown_message_is_404(start: Callable[..., httpx.Client]) -> None:
    client = start()
    answer = client.get(f"/bat/message/{uuid.uuid4()}", headers=KEY)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "NOT_FOUND"


def test_status_progresses_to_a_final_answer_with_fallbacks(
    start: Callable[..., httpx.Client],
) -> None:
    client = start(delay_min=0.2, delay_max=0.4, processing_at=0.5, mix={"delivered": 1.0})
    message_id = send_one(client, text="x" * 161)

    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 2
    while not seen or seen[-1]["deliverystatus"] in ("scheduled", "processing"):
        assert time.monotonic() < deadline, seen
        seen.append(client.get(f"/bat/message/{message_id}", headers=KEY).json())
        time.sleep(0.02)

    states = [body["deliverystatus"] for body in seen]
    assert states[0] == "scheduled"
    assert "processing" in states
    assert states.index("processing") > states.index("scheduled")
    for body in seen[:-1]:
        assert set(body) == {"deliverystatus", "partscount"}
    final = seen[-1]
    assert final["deliverystatus"] == "delivered"
    assert final["messageId"] == message_id
    assert isinstance(final["messagelistId"], int)
    assert final["partscount"] == 2
    assert final["cost"] == pytest.approx(0.10)
    assert final["fallbacks"][0]["type"] == "sms"
    assert final["fallbacks"][0]["status"] in ("used", "not_used")
    assert "delivered" in final["extendedStatuses"].values()
    assert (final["rateCurrency"], final["billCurrency"]) == ("UAH", "UAH")
    assert final["billAmount"] == final["cost"]
    assert "rate" in final
    assert "rateAmount" in final
    assert client.get("/_sim/messages").json()["m0"]["final"] == "delivered"


def test_failed_final_costs_nothing_and_fallbacks_can_be_off(
    start: Callable[..., httpx.Client],
) -> None:
    client = start(delay_min=0, delay_max=0, mix={"undeliverable": 1.0}, fallbacks=False)
    first = client.post(SEND, json=batch(2), headers=KEY).json()
    second = client.post(SEND, json=batch(1, prefix="n"), headers=KEY).json()
    bodies = [
        client.get(f"/bat/message/{item['messageId']}", headers=KEY).json()
        for item in first + second
    ]
    assert {b["deliverystatus"] for b in bodies} == {"undeliverable"}
    assert {b["cost"] for b in bodies} == {0.0}
    assert all(
        set(b) == {"messagelistId", "messageId", "deliverystatus", "partscount", "cost"}
        for b in bodies
    )
    assert bodies[0]["messagelistId"] == bodies[1]["messagelistId"]
    assert bodies[2]["messagelistId"] != bodies[0]["messagelistId"]


def test_future_scheduled_sent_stays_scheduled(start: Callable[..., httpx.Client]) -> None:
    client = start(delay_min=0, delay_max=0)
    when = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    message_id = send_one(client, scheduledSent=when)
    body = client.get(f"/bat/message/{message_id}", headers=KEY).json()
    assert body["deliverystatus"] == "scheduled"


def test_rejected_phone_refuses_the_whole_batch(start: Callable[..., httpx.Client]) -> None:
    client = start(reject_phones=["+380670000002"])
    answer = client.post(SEND, json=batch(5), headers=KEY)

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("INVALID_PHONE", "toPhone")
    assert "+380670000002" in error["message"]
    assert client.get("/_sim/messages").json() == {}
    counters = stats(client)
    assert counters["messages_accepted"] == 0
    assert counters["send_status"]["400"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b'{"id": "m0"}', "body"),
        (b"[]", "body"),
        (b'[{"id": "m0", "fromName": "Shop", "messageType": "promo"}]', "toPhone"),
        (b'[{"id": "m0", "toPhone": "+380670000000"}]', "messageType"),
    ],
)
def test_invalid_body_is_400_naming_the_field(
    start: Callable[..., httpx.Client], body: bytes, field: str
) -> None:
    client = start()
    answer = client.post(SEND, content=body, headers={**KEY, "Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["field"] == field
    assert stats(client)["messages_accepted"] == 0


def test_429_sets_retry_after_and_early_retries_are_counted(
    start: Callable[..., httpx.Client],
) -> None:
    client = start(throttle_next=1, retry_after="1")
    throttled = client.post(SEND, json=batch(1), headers=KEY)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"

    assert client.post(SEND, json=batch(1), headers=KEY).status_code == 200
    assert stats(client)["early_after_429"] == 0  # within the in-flight grace
    time.sleep(0.2)
    assert client.post(SEND, json=batch(1), headers=KEY).status_code == 200
    assert stats(client)["early_after_429"] == 1
    time.sleep(1.05)
    assert client.post(SEND, json=batch(1), headers=KEY).status_code == 200
    counters = stats(client)
    assert counters["early_after_429"] == 1
    assert counters["send_status"]["429"] == 1
    assert counters["messages_accepted"] == 3


def test_retry_after_as_http_date(start: Callable[..., httpx.Client]) -> None:
    client = start()
    later = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    assert client.post("/_sim/config", json={"throttle_next": 1, "retry_after": later}).is_success

    throttled = client.post(SEND, json=batch(1), headers=KEY)
    assert throttled.headers["Retry-After"] == later
    time.sleep(0.2)
    client.post(SEND, json=batch(1), headers=KEY)
    assert stats(client)["early_after_429"] == 1


def test_status_throttle_answers_429(start: Callable[..., httpx.Client]) -> None:
    client = start(status_throttle_next=1)
    path = f"/bat/message/{send_one(client)}"
    throttled = client.get(path, headers=KEY)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"
    assert client.get(path, headers=KEY).status_code == 200
    counters = stats(client)
    assert counters["status_by_code"]["429"] == 1
    assert counters["status_early_after_429"] == 1


def test_fail_next_sends_answers_500_and_records_nothing(
    start: Callable[..., httpx.Client],
) -> None:
    client = start(fail_next_sends=2)
    codes = [client.post(SEND, json=batch(3), headers=KEY).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    counters = stats(client)
    assert counters["messages_accepted"] == 3
    assert counters["duplicate_tracking_ids"] == 0
    assert counters["send_status"]["500"] == 2


def test_error_rate_fails_sends_and_status(start: Callable[..., httpx.Client]) -> None:
    client = start()
    message_id = send_one(client)
    client.post("/_sim/config", json={"error_rate": 1.0})
    assert client.post(SEND, json=batch(1, prefix="x"), headers=KEY).status_code == 500
    assert client.get(f"/bat/message/{message_id}", headers=KEY).status_code == 500
    assert "x0" not in client.get("/_sim/messages").json()


def test_hung_send_is_recorded_but_answered_late(start: Callable[..., httpx.Client]) -> None:
    client = start(hang_next_sends=2, hang_seconds=0.5)
    with pytest.raises(httpx.ReadTimeout):
        client.post(SEND, json=batch(2), headers=KEY, timeout=0.2)
    assert set(client.get("/_sim/messages").json()) == {"m0", "m1"}

    began = time.monotonic()
    late = client.post(SEND, json=batch(1, prefix="n"), headers=KEY)
    assert late.status_code == 200
    assert time.monotonic() - began >= 0.5

    began = time.monotonic()
    client.post(SEND, json=batch(1, prefix="o"), headers=KEY)
    assert time.monotonic() - began < 0.4


def test_latency_delays_answers(start: Callable[..., httpx.Client]) -> None:
    client = start(latency_ms=200)
    began = time.monotonic()
    message_id = send_one(client)
    client.get(f"/bat/message/{message_id}", headers=KEY)
    assert time.monotonic() - began >= 0.4


def test_dropped_answers_are_not_recorded(start: Callable[..., httpx.Client]) -> None:
    client = start(drop_answers=1.0)
    answer = client.post(SEND, json=batch(4), headers=KEY)
    assert (answer.status_code, answer.json()) == (200, [])
    counters = stats(client)
    assert (counters["messages_accepted"], counters["messages_dropped"]) == (0, 4)


def test_poll_counters(start: Callable[..., httpx.Client]) -> None:
    client = start(delay_min=0, delay_max=0)
    path = f"/bat/message/{send_one(client)}"
    assert client.get(path, headers=KEY).json()["deliverystatus"] == "delivered"
    counters = stats(client)
    assert (counters["polls_after_final"], counters["polls_within_1s"]) == (0, 0)
    assert counters["min_poll_gap"] is None

    client.get(path, headers=KEY)
    counters = stats(client)
    assert counters["polls_after_final"] == 1
    assert counters["polls_within_1s"] == 1
    assert 0 <= counters["min_poll_gap"] < 1
    assert client.get("/_sim/messages").json()["m0"]["polls"] == 2


def test_request_log(start: Callable[..., httpx.Client]) -> None:
    client = start()
    before = time.time()
    message_id = send_one(client)
    client.get(f"/bat/message/{message_id}", headers={"X-Authorization-Key": "bad"})
    log = client.get("/_sim/requests").json()
    assert [(r["kind"], r["code"], r["size"]) for r in log] == [
        ("send", 200, 1),
        ("status", 401, 1),
    ]
    assert before <= log[0]["t"] <= log[1]["t"] <= time.time()


def test_config_update(start: Callable[..., httpx.Client]) -> None:
    client = start()
    unknown = client.post("/_sim/config", json={"delay_mn": 1})
    assert unknown.status_code == 400
    assert "delay_mn" in unknown.json()["error"]["message"]
    wrong_type = client.post("/_sim/config", json={"shuffle": "yes", "delay_min": 0})
    assert wrong_type.status_code == 400
    assert "shuffle" in wrong_type.json()["error"]["message"]

    applied = client.post("/_sim/config", json={"reject_phones": ["+380670000000"]})
    assert applied.status_code == 200
    assert applied.json()["reject_phones"] == ["+380670000000"]
    assert applied.json()["delay_min"] == 5.0, "a refused change must not be half-applied"
    assert client.post(SEND, json=batch(1), headers=KEY).status_code == 400


def test_config_update_is_all_or_nothing() -> None:
    config = SimulatorConfig()
    with pytest.raises(ValueError, match="delay_max"):
        config.update({"delay_min": 1, "delay_max": 0.5})
    with pytest.raises(ValueError, match="retry_after"):
        config.update({"retry_after": "soon"})
    assert (config.delay_min, config.delay_max, config.retry_after) == (5.0, 30.0, "1")


def test_reset_clears_records_but_keeps_config(start: Callable[..., httpx.Client]) -> None:
    client = start(api_key="k-1")
    client.post(SEND, json=batch(3), headers={"X-Authorization-Key": "k-1"})
    client.post(SEND, json=batch(1), headers=KEY)
    assert stats(client)["send_requests"] == 2

    assert client.post("/_sim/reset").status_code == 200
    counters = stats(client)
    assert counters["send_requests"] == 0
    assert counters["messages_accepted"] == 0
    assert counters["send_status"]["401"] == 0
    assert counters["max_batch"] == 0
    assert counters["auth_headers_seen"] == []
    assert client.get("/_sim/messages").json() == {}
    assert client.get("/_sim/requests").json() == []
    again = client.post(SEND, json=batch(1), headers={"X-Authorization-Key": "k-1"})
    assert again.status_code == 200


def test_latency_spike_holds_the_answer_and_is_counted(start: Callable[..., httpx.Client]) -> None:
    client = start(spike_rate=1.0, spike_seconds=0.5)
    began = time.monotonic()
    answer = client.post(SEND, json=batch(2), headers=KEY)
    assert answer.status_code == 200 and len(answer.json()) == 2
    assert time.monotonic() - began >= 0.5
    client.post("/_sim/config", json={"spike_rate": 0.0})
    began = time.monotonic()
    client.post(SEND, json=batch(1, prefix="n"), headers=KEY)
    assert time.monotonic() - began < 0.4
    assert stats(client)["latency_spikes"] == 1


def test_connection_reset_on_send_is_an_accepted_but_lost_answer(
    start: Callable[..., httpx.Client],
) -> None:
    client = start(reset_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(SEND, json=batch(3), headers=KEY)
    client.post("/_sim/config", json={"reset_rate": 0.0})
    counters = stats(client)
    assert counters["connection_resets"] == 1
    assert (counters["messages_accepted"], counters["answers_lost"]) == (3, 3)
    assert client.get("/_sim/duplicates").json()["answer_lost"] == ["m0", "m1", "m2"]

    again = client.post(SEND, json=batch(3), headers=KEY)  # the client resends the unknowns
    assert again.status_code == 200
    assert client.get("/_sim/duplicates").json()["duplicated"] == {"m0": 2, "m1": 2, "m2": 2}


def test_reset_status_answer_does_not_count_as_a_seen_final(
    start: Callable[..., httpx.Client],
) -> None:
    client = start(delay_min=0, delay_max=0)
    path = f"/bat/message/{send_one(client)}"
    client.post("/_sim/config", json={"reset_rate": 1.0})
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(path, headers=KEY)
    client.post("/_sim/config", json={"reset_rate": 0.0})
    time.sleep(1.0)
    assert client.get(path, headers=KEY).json()["deliverystatus"] == "delivered"
    counters = stats(client)
    assert (counters["connection_resets"], counters["polls_after_final"]) == (1, 0)


def test_malformed_answer_is_a_cut_off_200(start: Callable[..., httpx.Client]) -> None:
    client = start(malformed_rate=1.0, delay_min=0, delay_max=0)
    answer = client.post(SEND, json=batch(2), headers=KEY)
    assert answer.status_code == 200
    with pytest.raises(ValueError):
        answer.json()
    message_id = client.get("/_sim/messages").json()["m0"]["messageIds"][0]
    status = client.get(f"/bat/message/{message_id}", headers=KEY)
    assert status.status_code == 200
    with pytest.raises(ValueError):
        status.json()
    client.post("/_sim/config", json={"malformed_rate": 0.0})
    time.sleep(1.0)
    assert client.get(f"/bat/message/{message_id}", headers=KEY).json()["deliverystatus"]
    counters = stats(client)
    assert counters["malformed_answers"] == 2
    assert counters["answers_lost"] == 2 and counters["polls_after_final"] == 0


def test_poll_anomalies_name_the_tracking_id(start: Callable[..., httpx.Client]) -> None:
    client = start(delay_min=0, delay_max=0)
    path = f"/bat/message/{send_one(client)}"
    client.get(path, headers=KEY)
    client.get(path, headers=KEY)
    anomalies = client.get("/_sim/poll_anomalies").json()
    assert {(a["kind"], a["trackinId"]) for a in anomalies} == {
        ("after_final", "m0"),
        ("within_1s", "m0"),
    }
    after = next(a for a in anomalies if a["kind"] == "after_final")
    assert after["final_seen_at"] <= after["at"]


@pytest.mark.parametrize("name", ["spike_rate", "reset_rate", "malformed_rate"])
def test_fault_rates_must_be_shares(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SimulatorConfig(**{name: 1.5})
