"""Consent end to end, as a user meets it: the simulator delivers transactional messages and
pushes the recipients' "Stop!" replies (BulkGate status 10) to our API; a real worker with
beat then never sends them a promo, while transactions still go. Both databases."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Stack, make_stack
from worker.dev.stack import Api, start_api
from worker.flows import consent
from worker.flows.campaigns import approve_campaign, hold_campaign
from worker.flows.inbox import list_inbound
from worker.ops.reports import campaign_summary

HOOK = "hook-token"
TOKEN = "api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def pushed(
    request: pytest.FixtureRequest, database_factory: Callable[[str], str]
) -> Iterator[tuple[Stack, Api]]:
    env = {"WEBHOOK_TOKEN": HOOK, "API_TOKEN": TOKEN, "REPORTS_INTERVAL_SECONDS": "0.5"}
    backend = request.param
    with make_stack(database_factory(backend), backend, env) as stack:
        api = start_api(stack.workers.logdir, stack.workers.env, f"api-consent-{backend}")
        try:
            yield stack, api
        finally:
            api.process.stop()


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **stack.workers.env},
        timeout=120,
    )


def _promo(i: str, phone: str, **extra: Any) -> dict[str, Any]:
    return {"id": i, "fromName": "Shop", "toPhone": phone, "messageType": "promo",
            "text": "Sale!", **extra}  # fmt: skip


def _tx(i: str, phone: str) -> dict[str, Any]:
    return {"id": i, "fromName": "Shop", "toPhone": phone, "messageType": "transaction",
            "text": "Your order"}  # fmt: skip


def test_stop_replies_from_the_simulator_suppress_the_next_promo_but_not_a_transaction(
    pushed: tuple[Stack, Api], tmp_path: Path
) -> None:
    stack, api = pushed
    sim, engine, tag = stack.simulator, stack.engine, stack.backend[:2]
    sim.admin("/_sim/reset", {})
    sim.configure(
        delay_min=0.2,
        delay_max=0.6,
        mix={"delivered": 1},
        webhook_url=None,
        dlr_url=f"{api.url}/webhooks/bulkgate?token={HOOK}",
        dlr_form="json",
        inbound_rate=1.0,
        inbound_texts=["Stop!"],
        push_drop=0.0,
        push_duplicates=0.0,
    )
    phones = [f"+38067{tag == 'po':d}55{i:04d}" for i in range(10)]
    # Queued before the replies: a held campaign's promos, and promos scheduled far ahead
    # (kept in our queue until shortly before their time).
    hold_campaign(engine, f"held-{tag}", create=True)
    stack.enqueue([_promo(f"held-{tag}-{i}", p) for i, p in enumerate(phones)], f"held-{tag}")
    later = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stack.enqueue(
        [_promo(f"later-{tag}-{i}", p, scheduledSent=later) for i, p in enumerate(phones)],
        f"later-{tag}",
    )

    stack.enqueue([_tx(f"tx-{tag}-{i}", p) for i, p in enumerate(phones)], f"tx-{tag}")
    assert stack.wait_final(f"tx-{tag}", 10, timeout=90)["states"] == {"delivered": 10}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and consent.count(engine) < 10:
        time.sleep(0.2)
    assert consent.count(engine) == 10, list_inbound(engine, 20)
    sim.configure(inbound_rate=0.0)  # else the next transaction's "Stop!" lists it again

    held = campaign_summary(engine, f"held-{tag}")
    later_summary = campaign_summary(engine, f"later-{tag}")
    assert held is not None and held["states"] == {"suppressed": 10}
    assert later_summary is not None and later_summary["states"] == {"suppressed": 10}

    # The next promo is refused at the door; a transaction still goes.
    answers = stack.enqueue([_promo(f"next-{tag}", phones[0]), _tx(f"tx2-{tag}", phones[0])],
                            f"next-{tag}")  # fmt: skip
    assert [a.status for a in answers] == ["rejected", "accepted"]
    assert "suppression list" in answers[0].errors[0].problem
    assert stack.wait_final(f"next-{tag}", 1, timeout=60)["states"] == {"delivered": 1}
    approve_campaign(engine, f"held-{tag}", stack.settings.broker_url)
    time.sleep(2)  # beat dispatches every 0.5 s: a send would have happened by now
    at_provider = sim.admin("/_sim/messages")
    assert isinstance(at_provider, dict)
    assert not [k for k in at_provider if k.startswith(("held-", "later-", "next-"))]

    # The operator's view: replies masked and marked, the list, remove, export, import.
    shown = _cli(stack, "inbound", "list", "--campaign", f"tx-{tag}", "--since", "1h", "--json")
    assert shown.returncode == 0, shown.stderr
    replies = orjson.loads(shown.stdout)
    assert len(replies) == 10 and {r["consent"] for r in replies} == {"optout"}
    assert not any(p in shown.stdout for p in phones) and "*" in replies[0]["from"]
    listed = _cli(stack, "optout", "list", "--json")
    assert listed.returncode == 0 and not any(p in listed.stdout for p in phones)
    assert {r["evidence"] for r in orjson.loads(listed.stdout)} == {"Stop!"}
    removed = _cli(stack, "optout", "remove", phones[0], "--note", "called us")
    assert removed.returncode == 0 and phones[0] not in removed.stdout
    assert stack.enqueue([_promo(f"back-{tag}", phones[0])], f"back-{tag}")[0].status == (
        "accepted"
    )
    exported = _cli(stack, "optout", "export")
    assert exported.stdout.splitlines()[0] == "phone,added_at,source,evidence"
    assert sorted(line.split(",")[0] for line in exported.stdout.splitlines()[1:]) == phones[1:]
    file = tmp_path / "optouts.csv"
    file.write_text("phone,evidence\n+380679990001,paper form\n067 999 0002,\nnot a phone,\n")
    imported = _cli(stack, "optout", "import", str(file))
    assert imported.returncode == 0, imported.stderr
    assert "1 added, 0 already on the list, 2 refused" in imported.stdout
    assert "line 3: refused: phone is a national number" in imported.stderr
    assert "line 4: refused: phone" in imported.stderr

    # The same over HTTP.
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30) as http:
        added = http.post("/v1/optouts/import", json=[{"phone": phones[0]}, {"phone": "12"}])
        assert added.status_code == 200
        assert [r["status"] for r in added.json()] == ["added", "refused"]
        assert http.get("/v1/optouts").status_code == 200
        assert http.delete(f"/v1/optouts/numbers/{phones[0]}").json() == {
            "phone": phones[0],
            "removed": True,
        }
        assert http.delete(f"/v1/optouts/numbers/{phones[0]}").status_code == 404
        assert http.get("/v1/optouts", headers={"Authorization": "Bearer no"}).status_code == 401
        exported = http.get("/v1/optouts/export")
        assert exported.headers["content-type"].startswith("text/csv")
        assert "+380679990001" in exported.text
