"""The send policy model-checked: generated interleavings of provider answers, on both
databases, against the real dispatcher, client and sweeper.

A hypothesis state machine drives `dispatcher.send_batch` (its claims, decisions and
database writes) and the sweeper with an injected clock. The provider is a model behind
the real `SendClient` (an httpx transport): each request's answer is drawn from 200
(shuffled, some trackinIds missing), 400 for a batch holding a refused number (with a
right, a wrong or no hint), 401, 429 (Retry-After in seconds or as an HTTP date), 500,
502, 503, a reset before the request was written, a read timeout after it was written
(accepted or not), and a worker that dies between the answer and its commit; outages
of any length are runs of faults and clock jumps.

After every step: no refused number was accepted; only refused numbers are `rejected`;
`failed` only past the send deadline or after too many lost answers; no tracking id
accepted twice unless its message records an unknown outcome; isolation parts are never
mixed with other rows; every message is final, queued, or in a live claim; the campaign's
tallies sum to a recount of its messages. At the end the
provider calms down and every message must be final within `request_bound` requests.

Pacing is an in-memory stand-in on the injected clock: Redis keeps time by its own clock.
The Redis pacing itself runs for real in tests/test_circuit.py and the pipeline tests.
"""

from __future__ import annotations

import contextlib
import json
import random
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, select

from config import Settings
from tests.conftest import make_messages
from tests.helpers import Clock, MemoryPacing, assert_tallies_match
from worker.core.sendpolicy import request_bound
from worker.core.states import FINAL, State
from worker.core.validation import validate_message
from worker.flows import dispatcher
from worker.flows.producer import row_for, store
from worker.flows.sweeper import give_up, recover_stale_claims
from worker.provider.smsbat import SendClient
from worker.store.db import get_engine
from worker.store.models import campaign_tallies, campaigns, events, messages

BATCH = 16
START = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
ENV = {
    "SMSBAT_API_KEY": "model-key",
    "SMSBAT_BASE_URL": "http://provider.model",
    "SEND_BATCH_MAX": str(BATCH),
    "SEND_BATCH_MIN": "1",
    "SEND_LINGER_SECONDS": "0",
    "SEND_LEASE_SECONDS": "60",
    "SEND_BACKOFF_BASE_SECONDS": "1",
    "SEND_BACKOFF_MAX_SECONDS": "30",
    "CIRCUIT_OPEN_SECONDS": "10",
    "SEND_CIRCUIT_FAILURES": "3",
    "SEND_PROBE_SIZE": "2",
    "SEND_RETRY_FOR_SECONDS": "3600",
    "SEND_MAX_UNKNOWN_OUTCOMES": "3",
}
FAULTS = (
    "ok",
    "missing",
    "401",
    "429-seconds",
    "429-date",
    "500",
    "502",
    "503",
    "reset",
    "timeout-accepted",
    "timeout-lost",
)
HINTS = ("index", "none", "wrong")
# The send path is done with a message once the provider has it (polling takes it on).
DONE = FINAL | {State.SUBMITTED}


class WorkerDied(BaseException):
    """A SIGKILL between the provider's answer and the commit: nothing after it runs."""


class ModelProvider:
    """The provider's side of every request, behind the real client's transport."""

    def __init__(self, rng: random.Random, parts_of: Callable[[list[str]], set[str | None]]):
        self.rng = rng
        self.parts_of = parts_of
        self.refused: set[str] = set()
        self.fault = "ok"
        self.hint = "index"
        self.accepted: Counter[str] = Counter()
        self.message_ids: dict[str, list[str]] = {}
        self.requests = 0
        self.mixed: list[set[str | None]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        batch = json.loads(request.content)
        # Claimed and committed before the request: a part is sent alone, never mixed.
        # Noted, not raised: the dispatcher turns an error inside a request into an unknown
        # outcome, as it must.
        parts = self.parts_of([m["id"] for m in batch])
        if len(parts) != 1:
            self.mixed.append(parts)
        fault = self.fault
        if fault == "reset":
            raise httpx.ConnectError("connection reset before the request was written")
        if fault == "401":
            return httpx.Response(401, json={"error": {"code": "UNAUTHORIZED"}})
        if fault == "429-seconds":
            return httpx.Response(429, headers={"Retry-After": "5"})
        if fault == "429-date":
            when = datetime.now(UTC) + timedelta(seconds=8)
            return httpx.Response(429, headers={"Retry-After": format_datetime(when, usegmt=True)})
        if fault in ("500", "502", "503"):
            return httpx.Response(int(fault), text="unavailable")
        bad = [i for i, m in enumerate(batch) if m["toPhone"] in self.refused]
        if bad:
            return httpx.Response(400, json={"error": self._refusal(batch, bad)})
        taken = batch
        if fault == "missing":
            taken = [m for m in batch if self.rng.random() < 0.7]
        if fault == "timeout-lost":
            raise httpx.ReadTimeout("no answer after the request was written")
        answer = [{"messageId": self._accept(m["id"]), "trackinId": m["id"]} for m in taken]
        self.rng.shuffle(answer)
        if fault == "timeout-accepted":
            raise httpx.ReadTimeout("accepted, but the answer never came")
        if fault == "die":
            raise WorkerDied
        return httpx.Response(200, json=answer)

    def _refusal(self, batch: list[dict[str, Any]], bad: list[int]) -> dict[str, Any]:
        error = {"code": "INVALID_PHONE", "field": "toPhone"}
        if self.hint == "index":
            return error | {"message": f"messages[{bad[0]}].toPhone is not a valid phone number"}
        if self.hint == "wrong":
            return error | {"message": f"messages[{self.rng.randrange(len(batch))}] is invalid"}
        return error | {"message": "Invalid phone number format"}

    def _accept(self, tracking: str) -> str:
        self.accepted[tracking] += 1
        message_id = uuid.uuid4().hex
        self.message_ids.setdefault(tracking, []).append(message_id)
        return message_id


WATCHED = [
    messages.c[name]
    for name in (
        "pk",
        "id",
        "to_phone",
        "state",
        "error_code",
        "send_deadline",
        "unknown_outcomes",
        "lease_until",
        "claim_token",
        "provider_message_id",
        "isolation",
    )
]


def send_machine(url: str) -> type[RuleBasedStateMachine]:
    settings = Settings(**ENV, DATABASE_URL=url)  # type: ignore[arg-type]
    engine = get_engine(url)

    def parts_of(ids: list[str]) -> set[str | None]:
        with engine.begin() as conn:
            found = conn.execute(
                select(messages.c.isolation).where(messages.c.id.in_(ids))
            ).scalars()
            return set(found)

    class SendModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            with engine.begin() as conn:
                for table in (events, messages, campaigns, campaign_tallies):
                    conn.execute(delete(table))
            self.clock = Clock(START)
            self.pacing = MemoryPacing(self.clock)
            self.provider = ModelProvider(random.Random(0), parts_of)
            self.client = SendClient(settings, transport=self.provider.transport())
            self.created = 0

        @initialize(seed=st.integers(0, 2**32 - 1))
        def seed(self, seed: int) -> None:
            self.provider.rng.seed(seed)
            self.rng = random.Random(seed)

        @rule(count=st.integers(1, 24), refused=st.integers(0, 2))
        def enqueue(self, count: int, refused: int) -> None:
            now = self.clock()
            raws = make_messages(count, "model", start=self.created)
            self.created += count
            for raw in self.rng.sample(raws, min(refused, count)):
                self.provider.refused.add(raw["toPhone"])
            rows = []
            for raw in raws:
                checked = validate_message(raw, now=now)
                assert not isinstance(checked, list), checked
                rows.append(row_for(checked, "model", now, settings))
            store(engine, rows, "model")

        @rule(fault=st.sampled_from(FAULTS), hint=st.sampled_from(HINTS), due=st.booleans())
        def send(self, fault: str, hint: str, due: bool) -> None:
            self.provider.fault, self.provider.hint = fault, hint
            self._send(due)

        @rule()
        def worker_dies_before_its_commit(self) -> None:
            self.provider.fault = "die"
            with contextlib.suppress(WorkerDied):  # nothing to send: nothing to die in
                self._send()

        @rule(seconds=st.one_of(st.floats(0, 90), st.floats(90, 3 * 3600)))
        def time_passes(self, seconds: float) -> None:
            self.clock.now += timedelta(seconds=seconds)
            recover_stale_claims(engine, settings, self.clock())
            give_up(engine, self.clock())

        def _send(self, due: bool = False) -> dispatcher.BatchReport:
            try:
                return dispatcher.send_batch(
                    engine,
                    self.client,
                    self.pacing,
                    settings,
                    "standard",
                    clock=self.clock,
                    rng=self.rng,
                    due=due,
                )
            finally:
                self.clock.now += timedelta(milliseconds=10)

        # --- safety, after every step ---------------------------------------------------

        def _rows(self) -> list[Any]:
            with engine.begin() as conn:
                return list(conn.execute(select(*WATCHED).order_by(messages.c.pk)))

        @invariant()
        def tallies_sum_to_a_recount(self) -> None:
            assert_tallies_match(engine, ("model",))

        @invariant()
        def parts_are_never_mixed(self) -> None:
            assert not self.provider.mixed, f"requests mixed isolation parts: {self.provider.mixed}"

        @invariant()
        def nothing_is_lost_or_blamed_wrongly(self) -> None:
            now = self.clock()
            refused = self.provider.refused
            for row in self._rows():
                phone_refused = row.to_phone in refused
                assert not (phone_refused and self.provider.accepted[row.id]), row.id
                if row.state == State.REJECTED:
                    assert phone_refused and row.error_code == "INVALID_PHONE", row
                if row.state == State.FAILED:
                    assert (row.error_code == "SEND_DEADLINE" and row.send_deadline <= now) or (
                        row.error_code == "UNKNOWN_OUTCOME"
                        and row.unknown_outcomes >= settings.send_max_unknown_outcomes
                    ), row
                if self.provider.accepted[row.id] > 1:
                    assert row.unknown_outcomes >= 1, row  # a resend, counted
                # record() finds a claim's rows by its token alone
                assert (row.claim_token is not None) == (row.state == State.SENDING), row
                if row.state == State.SENDING:
                    assert row.lease_until > now, row  # in a live claim
                elif row.state not in FINAL:
                    assert row.state in (State.QUEUED, State.SUBMITTED), row
                if row.state == State.SUBMITTED:
                    assert row.provider_message_id in self.provider.message_ids[row.id]

        # --- liveness, at the end -------------------------------------------------------

        def teardown(self) -> None:
            try:
                self._finish()
            finally:
                self.client.close()

        def _finish(self) -> None:
            self.provider.fault = "ok"
            # Past every backoff, pause, lease and probe lease, then count requests.
            self.clock.now += timedelta(seconds=60 + 30 + 10 + 60)
            recover_stale_claims(engine, settings, self.clock())
            self.clock.now += timedelta(seconds=31)  # and past the backoff that set
            give_up(engine, self.clock())
            rows = [r for r in self._rows() if r.state not in DONE]
            queued = sum(1 for r in rows if r.isolation is None)
            parts = len({r.isolation for r in rows if r.isolation is not None})
            refused = sum(1 for r in rows if r.to_phone in self.provider.refused)
            probe = 1 if self.pacing.half_open(dispatcher.CIRCUIT) else 0
            bound = request_bound(queued, parts, refused, BATCH) + probe
            before = self.provider.requests
            for _ in range(bound + 5):
                if self._send().claimed == 0 and not self._open():
                    break
            left = [r for r in self._rows() if r.state not in DONE]
            assert not left, f"not final once the provider behaved: {left[:3]}"
            used = self.provider.requests - before
            assert used <= bound, f"{used} requests, bound {bound}"

        def _open(self) -> bool:
            return any(r.state not in DONE for r in self._rows())

    return SendModel


MODEL_SETTINGS = hypothesis_settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_send_policy_holds_under_any_interleaving(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    if backend == "postgresql":  # a commit per step: this database need not survive a crash
        with get_engine(url).connect() as conn:
            conn.exec_driver_sql("SET synchronous_commit = off")
            name = conn.exec_driver_sql("SELECT current_database()").scalar_one()
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        get_engine(url).dispose()
    run_state_machine_as_test(send_machine(url), settings=MODEL_SETTINGS)


def test_a_batch_chained_after_a_full_one_goes_without_waiting_to_fill(
    database_factory: Callable[[str], str],
) -> None:
    """Three messages, a batch minimum of 10 and a minute's linger: a batch counted first
    waits; one chained after a full batch (`due`) takes them now."""
    url = database_factory("postgresql")
    env = ENV | {"SEND_BATCH_MIN": "10", "SEND_LINGER_SECONDS": "60"}
    settings = Settings(**env, DATABASE_URL=url)  # type: ignore[arg-type]
    engine = get_engine(url)
    clock = Clock(START)
    now = clock()
    rows = []
    for raw in make_messages(3, "due"):
        checked = validate_message(raw, now=now)
        assert not isinstance(checked, list), checked
        rows.append(row_for(checked, "due", now, settings))
    store(engine, rows, "due")
    provider = ModelProvider(random.Random(0), lambda ids: {None})
    client = SendClient(settings, transport=provider.transport())
    pacing = MemoryPacing(clock)

    def send(due: bool) -> dispatcher.BatchReport:
        return dispatcher.send_batch(
            engine, client, pacing, settings, "standard", clock=clock, due=due
        )

    assert send(due=False).claimed == 0
    report = send(due=True)
    assert report.claimed == 3
    assert report.counts == {"submitted": 3}
    client.close()
