"""End to end on both databases: enqueue → batched send → polling → final states."""

from __future__ import annotations

import time
from collections import Counter

from sqlalchemy import func, select

from tests.conftest import Stack, make_messages
from worker.core.states import FINAL, journal_allows
from worker.store.models import events, messages


def _rows(stack: Stack, campaign: str) -> list:
    with stack.engine.connect() as conn:
        return list(conn.execute(select(messages).where(messages.c.campaign == campaign)))


def test_five_thousand_messages_reach_a_final_state(stack: Stack, sim, campaign: str) -> None:
    batch = make_messages(4000, campaign) + make_messages(
        1000, campaign, start=4000, messageType="promo", route="tg-viber"
    )
    results = stack.enqueue(batch, campaign)
    assert Counter(r.status for r in results) == {"accepted": 5000}

    report = stack.wait_final(campaign, 5000, timeout=240)

    assert report["total"] == 5000
    assert sum(report["states"].values()) == 5000
    assert set(report["states"]) <= {"delivered", "undeliverable", "permanenterror"}
    stats = sim.stats()
    assert stats["unique_tracking_ids"] == 5000
    assert stats["duplicate_tracking_ids"] == 0
    assert stats["polls_after_final"] == 0
    assert stats["polls_within_1s"] == 0
    assert 100 <= stats["max_batch"] <= 1000
    assert stats["send_requests"] <= 5000 / 100 + 10  # batched, not one request per message

    # Answers came back shuffled: every row must carry the messageId of its own trackinId,
    # and end in the final state the simulator planned for it.
    at_provider = sim.admin("/_sim/messages")
    rows = _rows(stack, campaign)
    for row in rows:
        assert row.provider_message_id == at_provider[row.id]["messageIds"][-1]
        assert row.state == at_provider[row.id]["final"]
        assert row.route == ("tg-viber" if int(row.id.rsplit("-", 1)[1]) >= 4000 else "standard")
    assert Counter(r.route for r in rows) == {"standard": 4000, "tg-viber": 1000}
    assert report["delivered"] == sum(r.state == "delivered" for r in rows)
    assert abs(report["cost"] - sum(r.cost or 0 for r in rows)) < 1e-6
    delivered = next(r for r in rows if r.state == "delivered")
    assert delivered.partscount == 1 and delivered.cost > 0
    assert delivered.extended_statuses and delivered.bill_currency

    # The journal holds one submit per message and only moves the state machine allows.
    with stack.engine.connect() as conn:
        moves = conn.execute(
            select(events.c.source, events.c.from_state, events.c.to_state, func.count())
            .join(messages, messages.c.pk == events.c.message_pk)
            .where(messages.c.campaign == campaign)
            .group_by(events.c.source, events.c.from_state, events.c.to_state)
        ).all()
    assert [m for m in moves if not journal_allows(*m[:3])] == []
    assert sum(n for source, _, to, n in moves if (source, to) == ("send", "submitted")) == 5000


def test_re_enqueue_is_a_no_op_that_reports_the_message(stack: Stack, sim, campaign: str) -> None:
    batch = make_messages(50, campaign)
    stack.enqueue(batch, campaign)
    stack.wait_final(campaign, 50)

    again = stack.enqueue(batch, campaign)

    assert {r.status for r in again} == {"duplicate"}
    assert all(r.state in FINAL for r in again)
    time.sleep(1.5)
    assert sim.stats()["unique_tracking_ids"] == 50
    assert sim.stats()["duplicate_tracking_ids"] == 0


def test_invalid_messages_are_refused_and_the_rest_accepted(stack: Stack, sim, campaign) -> None:
    batch = make_messages(3, campaign)
    batch[1]["toPhone"] = "380671234567"
    batch.append({"id": "bad id!", "fromName": "x", "toPhone": "+380671234567"})

    results = stack.enqueue(batch, campaign)

    assert [r.status for r in results] == ["accepted", "rejected", "accepted", "rejected"]
    assert results[1].errors[0].field == "toPhone"
    assert {e.field for e in results[3].errors} >= {"id", "messageType"}
    stack.wait_final(campaign, 2)
    assert sim.stats()["unique_tracking_ids"] == 2


def test_400_isolates_the_offending_message(stack: Stack, sim, campaign: str) -> None:
    batch = make_messages(300, campaign)
    bad = batch[137]["toPhone"]
    sim.configure(reject_phones=[bad])

    stack.enqueue(batch, campaign)
    report = stack.wait_final(campaign, 300)

    assert report["states"].get("rejected") == 1
    rejected = next(r for r in _rows(stack, campaign) if r.state == "rejected")
    assert rejected.id == batch[137]["id"]
    assert rejected.error_code == "INVALID_PHONE"
    assert sim.stats()["unique_tracking_ids"] == 299


def test_429_retry_after_is_honoured_by_every_worker(stack: Stack, sim, campaign: str) -> None:
    sim.configure(throttle_next=3, retry_after="2")

    stack.enqueue(make_messages(300, campaign), campaign)
    stack.wait_final(campaign, 300)

    stats = sim.stats()
    assert stats["send_status"]["429"] == 3
    assert stats["early_after_429"] == 0
    assert stats["unique_tracking_ids"] == 300
    assert all(r.attempts == 0 for r in _rows(stack, campaign))  # 429 is not a failed attempt


def test_500s_then_success(stack: Stack, sim, campaign: str) -> None:
    sim.configure(fail_next_sends=2)

    stack.enqueue(make_messages(200, campaign), campaign)
    report = stack.wait_final(campaign, 200)

    assert report["sent"] == 200
    assert sim.stats()["send_status"]["500"] == 2
    assert sim.stats()["duplicate_tracking_ids"] == 0
    rows = _rows(stack, campaign)
    assert max(r.attempts for r in rows) >= 1


def test_401_keeps_messages_queued_until_credentials_work(stack: Stack, sim, campaign) -> None:
    sim.configure(api_key="rotated-key")

    stack.enqueue(make_messages(100, campaign), campaign)
    time.sleep(4)

    assert {r.state for r in _rows(stack, campaign)} == {"queued"}
    refused = sim.stats()["send_status"]["401"]
    assert 1 <= refused <= 6  # the circuit stops the hammering: about one probe per 2 s
    sim.configure(api_key="test-key")
    report = stack.wait_final(campaign, 100)
    assert report["sent"] == 100
    assert all(r.attempts == 0 for r in _rows(stack, campaign))


def test_ttl_running_out_before_sending_expires(stack: Stack, sim, campaign: str) -> None:
    sim.configure(api_key="rotated-key")
    stack.enqueue(make_messages(5, campaign, ttl=1), campaign)
    time.sleep(2.5)
    sim.configure(api_key="test-key")

    report = stack.wait_final(campaign, 5)

    assert report["states"] == {"expired": 5}
    assert sim.stats()["unique_tracking_ids"] == 0


def test_timeout_after_the_request_was_written_is_counted(stack: Stack, sim, campaign) -> None:
    sim.configure(hang_next_sends=1, hang_seconds=3.5)  # above HTTP_READ_TIMEOUT_SECONDS

    stack.enqueue(make_messages(150, campaign), campaign)
    report = stack.wait_final(campaign, 150)

    assert report["sent"] == 150
    at_provider = sim.admin("/_sim/messages")
    rows = _rows(stack, campaign)
    # Two send tasks claiming at the same moment split the 150 (SKIP LOCKED): only the
    # messages of the hung request have an unknown outcome, and each was resent once.
    hung = [r for r in rows if r.unknown_outcomes == 1]
    assert hung and report["unknown_outcomes"] == len(hung)
    assert all(r.unknown_outcomes in (0, 1) for r in rows)
    assert all(at_provider[r.id]["sends"] == 1 + r.unknown_outcomes for r in rows)
    assert all(r.provider_message_id == at_provider[r.id]["messageIds"][-1] for r in rows)


def test_a_redis_flush_mid_run_loses_nothing(stack: Stack, sim, campaign: str) -> None:
    sim.configure(delay_min=2.0, delay_max=4.0)
    stack.enqueue(make_messages(2000, campaign), campaign)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sim.stats()["messages_accepted"] >= 500:
            break
        time.sleep(0.05)

    stack.flush_redis()
    report = stack.wait_final(campaign, 2000, timeout=180)

    assert report["total"] == 2000
    stats = sim.stats()
    assert stats["unique_tracking_ids"] == 2000
    assert stats["duplicate_tracking_ids"] == report["unknown_outcomes"]
    assert stats["polls_after_final"] == 0
    assert stats["polls_within_1s"] == 0
