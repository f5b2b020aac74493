"""Regression tests for what the chaos runs (scripts/chaos.py) found, each on real parts."""

from __future__ import annotations

import asyncio
from datetime import datetime

import httpx

from config import Settings
from tests.test_simulator import KEY, SEND, batch, running_simulator
from worker.pacing import Pacing
from worker.polling import check_all
from worker.simulator import SimulatorConfig
from worker.smsbat import StatusClient


class SlowStart(httpx.AsyncHTTPTransport):
    """A real transport whose requests leave late, like a slow connect on a loaded host."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return await super().handle_async_request(request)


def test_a_poll_is_timed_no_earlier_than_the_provider_saw_it(redis_db: str) -> None:
    """Found at a 0.92 s gap: the next poll was scheduled from when the request was *started*;
    a request that sat 80 ms before it reached the provider let the next one in under 1 s."""
    with running_simulator(SimulatorConfig(delay_min=0, delay_max=0)) as sim:
        message_id = sim.post(SEND, json=batch(1), headers=KEY).json()[0]["messageId"]
        settings = Settings(
            SMSBAT_API_KEY="test-key",
            SMSBAT_BASE_URL=str(sim.base_url),
            BROKER_URL=redis_db,
            DATABASE_URL="sqlite://",
        )  # type: ignore[call-arg]
        client = StatusClient(settings, transport=SlowStart())
        results = asyncio.run(check_all(client, Pacing(redis_db), settings, [message_id]))
        seen_at = next(r["t"] for r in sim.get("/_sim/requests").json() if r["kind"] == "status")

    polled_at, answer = results[message_id]
    assert getattr(answer, "deliverystatus", None) == "delivered"
    assert polled_at >= datetime.fromtimestamp(seen_at, polled_at.tzinfo)
