"""Webhook intake under concurrency, on a real `cascade api` over real sockets and databases:
a 200 means stored (even when the API is killed -9 mid-load), a group that cannot be stored
answers every request non-2xx, a bad request never spoils the others of its group."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, delete, select, text

from worker.core.states import State
from worker.core.statuses import Report
from worker.dev.stack import Api, start_api
from worker.http import intake
from worker.store.db import get_engine, utcnow
from worker.store.models import provider_reports

TOKEN = "intake-token"
BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
CLIENTS = 32  # concurrent connections, as a provider pushing in parallel


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, database_factory: Callable[[str], str]) -> str:
    return database_factory(request.param)


@pytest.fixture
def engine(database: str) -> Engine:
    engine = get_engine(database)
    with engine.begin() as conn:
        conn.execute(delete(provider_reports))
    return engine


def _api(database: str, redis_db: str, logdir: Path, *extra: str) -> Api:
    env = {
        "DATABASE_URL": database,
        "BROKER_URL": redis_db,
        "WEBHOOK_TOKEN": TOKEN,
        "API_TOKEN": "intake-api-token",
    }
    return start_api(logdir, env, extra=extra)


@pytest.fixture
def api(database: str, redis_db: str, tmp_path: Path, engine: Engine) -> Iterator[Api]:
    served = _api(database, redis_db, tmp_path)
    yield served
    served.process.stop()


def _push(message_id: str) -> bytes:
    return orjson.dumps(
        {
            "messageId": message_id,
            "deliverystatus": "delivered",
            "timestamp": "2026-12-07T07:40:00.123Z",
            "cost": 0.05,
        }
    )


def _stored(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(provider_reports.c.provider_message_id)).scalars())


async def _burst(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    """Every body POSTed at once over CLIENTS connections; the answers in order."""
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/webhooks/smsbat", content=b, headers=BEARER) for b in bodies)
        )


# --- a 200 is stored ----------------------------------------------------------------------------


async def _push_until_killed(api: Api, enough: int) -> tuple[set[str], int]:
    """CLIENTS connections pushing new ids until the API is killed -9 (after `enough` 200s);
    answers the ids answered 200 and how many requests had been sent."""
    answered: set[str] = set()
    sent = 0
    killed = asyncio.Event()

    async def client(number: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            for i in range(1_000_000):
                message_id = f"k-{number}-{i}"
                sent += 1
                try:
                    answer = await http.post(
                        "/webhooks/smsbat", content=_push(message_id), headers=BEARER
                    )
                except httpx.HTTPError:
                    return  # killed: what was in flight was never answered
                if answer.status_code == 200:
                    answered.add(message_id)
                    if len(answered) >= enough and not killed.is_set():
                        killed.set()
                        os.kill(api.process.popen.pid, signal.SIGKILL)
                if killed.is_set() and answer.status_code != 200:
                    return

    await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(CLIENTS))), 120)
    return answered, sent


def test_every_push_answered_200_is_stored_though_the_api_is_killed_9(
    api: Api, engine: Engine
) -> None:
    answered, sent = asyncio.run(_push_until_killed(api, enough=600))
    api.process.popen.wait(10)

    stored = set(_stored(engine))
    assert api.process.popen.returncode == -signal.SIGKILL
    assert len(answered) >= 600
    assert answered - stored == set()  # no 200 for a report the crash lost
    assert len(stored) <= sent


# --- a group that fails, a request that is bad ---------------------------------------------------


def test_a_group_that_cannot_be_stored_answers_every_request_non_2xx(
    api: Api, engine: Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE provider_reports RENAME TO provider_reports_away"))
    try:
        failed = asyncio.run(_burst(api.url, [_push(f"f-{i}") for i in range(3 * CLIENTS)]))
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE provider_reports_away RENAME TO provider_reports"))

    assert {a.status_code for a in failed} <= {500, 503}  # the provider retries
    assert _stored(engine) == []
    # The receiver itself is fine: the next burst is stored whole.
    again = asyncio.run(_burst(api.url, [_push(f"g-{i}") for i in range(3 * CLIENTS)]))
    assert {a.status_code for a in again} == {200}
    assert sorted(_stored(engine)) == sorted(f"g-{i}" for i in range(3 * CLIENTS))


BAD: dict[bytes, tuple[int, str]] = {
    b'{"messageId": "bad-1", "deliverystatus": ': (400, "malformed JSON"),
    b'"delivered"': (422, "body must be a JSON object or an array of objects"),
    b'{"deliverystatus": "delivered"}': (200, "messageId"),
    b'{"messageId": "bad-2", "deliverystatus": "lost"}': (200, "deliverystatus: unknown status"),
}


def test_bad_bodies_among_concurrent_pushes_spoil_nothing_else(api: Api, engine: Engine) -> None:
    good = [_push(f"ok-{i}") for i in range(3 * CLIENTS)]
    bad = list(BAD) * 4
    bodies = [body for pair in zip(good, bad + [b""] * len(good), strict=False) for body in pair]
    bodies = [b for b in bodies if b]

    answers = asyncio.run(_burst(api.url, bodies))

    by_body = dict(zip(bodies, answers, strict=True))
    for body, answer in by_body.items():
        if body in BAD:
            status, named = BAD[body]
            assert answer.status_code == status, (body, answer.text)
            assert named in answer.text, (body, answer.text)
        else:
            assert (answer.status_code, answer.json()) == (200, {"accepted": 1, "rejected": []})
    assert sorted(_stored(engine)) == sorted(f"ok-{i}" for i in range(3 * CLIENTS))


def test_several_api_processes_share_the_port(
    database: str, redis_db: str, tmp_path: Path, engine: Engine
) -> None:
    served = _api(database, redis_db, tmp_path, "--workers", "2")
    try:
        answers = asyncio.run(_burst(served.url, [_push(f"w-{i}") for i in range(200)]))
    finally:
        served.process.stop()

    assert {a.status_code for a in answers} == {200}
    assert sorted(_stored(engine)) == sorted(f"w-{i}" for i in range(200))


# --- the committer itself -------------------------------------------------------------------------


def _job(message_id: str) -> intake.Job:
    report = Report(message_id, State.DELIVERED, "webhook", {"deliverystatus": "delivered"}, None)
    return intake.Job([report], utcnow())


async def _store_all(engine: Engine, ids: list[str]) -> tuple[list[Any], int]:
    group_committer = intake.committer(engine)
    outcomes = await asyncio.gather(
        *(group_committer.store(_job(i)) for i in ids), return_exceptions=True
    )
    return outcomes, group_committer.groups


def test_concurrent_requests_share_a_transaction_and_a_bad_one_fails_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = intake.write_reports

    def refusing_poison(conn: Any, jobs: list[intake.Job]) -> None:
        if any(r.message_id == "poison" for job in jobs for r in job.reports):
            raise ValueError("poison")
        write(conn, jobs)

    monkeypatch.setattr(intake, "write_reports", refusing_poison)
    ids = [f"c-{i}" for i in range(100)]
    ids.insert(37, "poison")

    outcomes, groups = asyncio.run(_store_all(engine, ids))

    assert groups < len(ids)  # they shared transactions
    failed = [i for i, outcome in zip(ids, outcomes, strict=True) if outcome is not None]
    assert failed == ["poison"]
    assert sorted(_stored(engine)) == sorted(i for i in ids if i != "poison")


def test_a_caller_that_goes_away_stops_no_write_of_its_group(engine: Engine) -> None:
    """A client that disconnects cancels its own wait: its report and the others of its
    group are still stored, and the others are answered."""

    async def run() -> list[Any]:
        group_committer = intake.committer(engine)
        waits = [asyncio.ensure_future(group_committer.store(_job(f"g-{i}"))) for i in range(20)]
        await asyncio.sleep(0)  # queued, the writer under way
        waits[3].cancel()
        return await asyncio.gather(*waits, return_exceptions=True)

    outcomes = asyncio.run(run())

    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert [o for i, o in enumerate(outcomes) if i != 3] == [None] * 19
    assert sorted(_stored(engine)) == sorted(f"g-{i}" for i in range(20))
