"""The HTTP API as producers use it: `cascade api` in its own process, over real sockets,
in front of a real worker and the simulator, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis

from tests.conftest import REDIS, Stack, make_messages
from worker.dev.stack import Api, Simulator, free_port, start_api
from worker.flows.campaigns import cancel_campaign
from worker.http.app import MAX_BODY_BYTES, MAX_MESSAGES, dry_intake, estimate_headers

TOKEN = "api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPTED = "+380679990123"  # put on the suppression list (and off again) by a dry-run test


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Api]:
    started = start_api(
        stack.workers.logdir, {**stack.workers.env, "API_TOKEN": TOKEN}, f"api-{stack.backend}"
    )
    yield started
    started.process.stop()


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=60) as http:
        yield http


def cli_json(*args: str, database_url: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": database_url},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_mixed_batch_gets_a_result_per_message_and_is_delivered(
    stack: Stack, sim: Simulator, client: httpx.Client, api: Api, campaign: str
) -> None:
    valid = make_messages(3, campaign)
    bad = {**valid[0], "id": f"{campaign}-bad", "toPhone": "0671234567", "to_phone": "x"}
    batch = [*valid, bad, valid[0], 42]

    answer = client.post("/v1/messages", params={"campaign": campaign}, json=batch)

    assert answer.status_code == 200, answer.text
    results = answer.json()
    accepted = {"status": "accepted", "state": "queued"}
    assert results[:3] == [{"id": m["id"], **accepted} for m in valid]
    assert results[3]["id"] == bad["id"] and results[3]["status"] == "rejected"
    assert results[3]["state"] is None
    assert [e["field"] for e in results[3]["errors"]] == ["to_phone", "toPhone"]
    assert "did you mean 'toPhone'" in results[3]["errors"][0]["problem"]
    assert results[4] == {"id": valid[0]["id"], "status": "duplicate", "state": "queued"}
    assert results[5]["id"] is None and results[5]["status"] == "rejected"
    assert results[5]["errors"][0]["field"] == "message"

    stack.wait_final(campaign, len(valid))
    detail = client.get(f"/v1/messages/{valid[1]['id']}")
    report = client.get(f"/v1/campaigns/{campaign}")
    again = client.post("/v1/messages", params={"campaign": campaign}, json=valid[1:2])

    url = stack.settings.database_url
    assert detail.json() == cli_json("message", "show", valid[1]["id"], database_url=url)
    # The same report; the API's analytics may be kept a while (tests/test_report_cache.py).
    cli_report = cli_json("campaign", "report", campaign, database_url=url)
    assert cli_report["analytics_age_seconds"] == 0.0 <= report.json()["analytics_age_seconds"]
    assert _without_age(report.json()) == _without_age(cli_report)
    assert detail.json()["final"] and detail.json()["events"]
    assert report.json()["total"] == len(valid) and report.json()["all_final"]
    assert again.json() == [
        {"id": valid[1]["id"], "status": "duplicate", "state": detail.json()["state"]}
    ]
    document = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    document["/v1/messages/{id}"]["GET"].validate_response(detail)
    document["/v1/campaigns/{campaign}"]["GET"].validate_response(report)
    document["/v1/messages"]["POST"].validate_response(answer)


def _without_age(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("analytics_a")}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/messages"), ("GET", "/v1/messages/m-1"), ("GET", "/v1/campaigns/c-1")],
)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
def test_producer_routes_refuse_a_missing_or_wrong_token(
    api: Api, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    body = make_messages(1, "unauthorised") if method == "POST" else None
    answer = httpx.request(method, api.url + path, headers=headers, json=body, timeout=30)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert "API_TOKEN" in answer.json()["detail"]
    assert TOKEN not in answer.text and "wrong-token" not in answer.text
    stored = httpx.get(f"{api.url}/v1/messages/unauthorised-0", headers=AUTH, timeout=30)
    assert stored.status_code == 404


def test_unknown_messages_and_campaigns_are_404(client: httpx.Client) -> None:
    message = client.get("/v1/messages/no-such-message")
    campaign = client.get("/v1/campaigns/no such/campaign")
    assert message.status_code == 404
    assert message.json() == {"detail": "no message with id 'no-such-message'"}
    assert campaign.status_code == 404
    assert campaign.json() == {"detail": "no campaign named 'no such/campaign'"}
    assert client.get("/v1/messages/not a possible id").status_code == 422


def test_bodies_that_are_not_a_json_array_of_messages(client: httpx.Client) -> None:
    not_json = client.post(
        "/v1/messages", content=b"[{", headers={"Content-Type": "application/json"}
    )
    an_object = client.post("/v1/messages", json={"id": "x"})
    as_text = client.post("/v1/messages", content=b"[]", headers={"Content-Type": "text/plain"})
    too_many = client.post("/v1/messages", json=[{}] * (MAX_MESSAGES + 1))
    at_the_limit = client.post("/v1/messages", json=[{}] * MAX_MESSAGES)
    empty = client.post("/v1/messages", json=[])

    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["detail"]
    assert an_object.status_code == 422
    assert an_object.json()["detail"][0]["loc"] == ["body"]
    assert "JSON array" in an_object.json()["detail"][0]["msg"]
    assert as_text.status_code == 415 and "application/json" in as_text.json()["detail"]
    assert too_many.status_code == 413 and "10,000 messages" in too_many.json()["detail"]
    assert at_the_limit.status_code == 200
    assert {r["status"] for r in at_the_limit.json()} == {"rejected"}
    assert empty.status_code == 200 and empty.json() == []


def test_a_body_over_the_byte_limit_is_refused_before_it_is_read(api: Api) -> None:
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
        )
        answer = conn.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413"), answer


def test_streamed_body_over_the_byte_limit_is_refused(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"["
        for _ in range(MAX_BODY_BYTES // 2**20):
            yield b" " * 2**20
        yield b"]"

    answer = client.post(
        "/v1/messages", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413


def test_campaign_names_follow_the_producers_rules(client: httpx.Client) -> None:
    for name in ("   ", "x" * 201):
        answer = client.post("/v1/messages", params={"campaign": name}, json=[])
        assert answer.status_code == 422
        assert answer.json()["detail"][0]["loc"] == ["query", "campaign"]


def test_a_cancelled_campaign_takes_no_new_messages(
    stack: Stack, client: httpx.Client, campaign: str
) -> None:
    first, second = make_messages(2, campaign)
    assert client.post("/v1/messages", params={"campaign": campaign}, json=[first]).is_success
    assert cancel_campaign(stack.engine, campaign) is not None

    refused = client.post("/v1/messages", params={"campaign": campaign}, json=[second])

    assert refused.status_code == 409
    assert refused.json() == {"detail": f"campaign {campaign!r} was cancelled; use a new name"}
    assert client.get(f"/v1/messages/{second['id']}").status_code == 404


def test_healthz_needs_no_token_and_names_a_broker_that_is_down(stack: Stack, api: Api) -> None:
    healthy = httpx.get(f"{api.url}/healthz", timeout=30)
    assert healthy.status_code == 200
    body = healthy.json()
    assert (body["database"], body["broker"], body["queue"]) == ("ok", "ok", "ok")
    assert body["beat"] in ("ok", "unknown")  # a stack just started may not have ticked yet

    closed = f"redis://127.0.0.1:{free_port()}/0"
    env = {**stack.workers.env, "API_TOKEN": TOKEN, "BROKER_URL": closed}
    no_broker = start_api(stack.workers.logdir, env, f"api-{stack.backend}-no-broker")
    try:
        sick = httpx.get(f"{no_broker.url}/healthz", timeout=30)
    finally:
        no_broker.process.stop()
    assert sick.status_code == 503
    assert sick.json()["database"] == "ok" and sick.json()["broker"] == "unavailable"
    assert sick.json()["beat"] == "unknown"  # its tick is in the broker


def test_a_database_outage_is_503_for_producers_and_healthz(tmp_path: Path, redis_db: str) -> None:
    env = {
        "API_TOKEN": TOKEN,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/cascade",
        "BROKER_URL": redis_db,
    }
    api = start_api(tmp_path, env)
    try:
        health = httpx.get(f"{api.url}/healthz", timeout=30)
        post = httpx.post(
            f"{api.url}/v1/messages", json=make_messages(1, "outage"), headers=AUTH, timeout=30
        )
        read = httpx.get(f"{api.url}/v1/messages/outage-0", headers=AUTH, timeout=30)
    finally:
        api.process.stop()
    assert health.status_code == 503
    assert health.json()["database"] == "unavailable" and health.json()["broker"] == "ok"
    assert health.json()["queue"] == "unknown"  # its age is in the database
    for answer in (post, read):
        assert answer.status_code == 503
        assert answer.json() == {"detail": "the database is unavailable; retry later"}


def test_the_api_refuses_to_start_without_api_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "API_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "api", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env={**env, "BROKER_URL": f"{REDIS}/15"},
        cwd=tmp_path,  # no .env here to supply a token
        timeout=60,
    )
    assert done.returncode != 0
    assert "API_TOKEN is not set" in done.stderr


def test_the_api_warns_when_webhook_token_is_unset(stack: Stack, api: Api) -> None:
    log = (stack.workers.logdir / f"api-{stack.backend}.log").read_text()
    assert "WEBHOOK_TOKEN is not set" in log


@pytest.mark.parametrize(
    ("page", "script", "defines"),
    [
        ("/docs", "swagger-ui-bundle.js", "SwaggerUIBundle"),
        ("/redoc", "redoc.standalone.js", "Redoc"),
    ],
)
def test_documentation_pages_load_everything_from_the_app(
    api: Api, page: str, script: str, defines: str
) -> None:
    """Offline-proof: every script, stylesheet and icon the page names is served by us."""
    html = httpx.get(api.url + page, timeout=30)
    assert html.status_code == 200 and "/openapi.json" in html.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert assets and any(a.endswith(script) for a in assets)
    assert "://" not in html.text.replace("http://www.w3.org", "")  # no CDN, no web fonts
    for asset in assets:
        served = httpx.get(api.url + asset, timeout=30)
        assert served.status_code == 200, asset
        if asset.endswith(".js"):
            assert "javascript" in served.headers["content-type"]
            assert defines in served.text


def test_hold_approve_pause_resume_and_a_phone_region_over_http(
    stack: Stack, sim: Simulator, client: httpx.Client, campaign: str
) -> None:
    batch = make_messages(3, campaign)
    batch[0] |= {"toPhone": "067 123 4567", "phoneRegion": "UA"}
    batch[1] |= {"toPhone": "0671234568", "phoneRegion": "Ukraine"}

    answer = client.post("/v1/messages", params={"campaign": campaign, "hold": "true"}, json=batch)

    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert [r["status"] for r in results] == ["accepted", "rejected", "accepted"]
    assert [r.get("state") for r in results] == ["held", None, "held"]
    assert results[1]["errors"][0]["field"] == "phoneRegion"
    report = client.get(f"/v1/campaigns/{campaign}").json()
    assert report["states"] == {"held": 2} and report["control"]["status"] == "held"
    assert client.post(f"/v1/campaign-actions/resume/{campaign}").status_code == 409
    assert client.post("/v1/campaign-actions/pause/no-such-campaign").status_code == 404
    assert client.post(f"/v1/campaign-actions/explode/{campaign}").status_code == 422
    refused = client.post("/v1/messages", params={"hold": "true"}, json=batch[2:])
    assert refused.status_code == 200 and refused.json()[0]["status"] == "rejected"
    assert refused.json()[0]["errors"][0]["problem"].startswith("needs ?campaign=NAME")

    approved = client.post(f"/v1/campaign-actions/approve/{campaign}")

    assert approved.status_code == 200, approved.text
    assert approved.json()["released_now"] == 2 and approved.json()["status"] == "running"
    stack.wait_final(campaign, 2)
    with stack.engine.connect() as conn:
        from sqlalchemy import select

        from worker.store.models import messages

        phones = set(
            conn.execute(
                select(messages.c.to_phone).where(messages.c.campaign == campaign)
            ).scalars()
        )
    assert "+380671234567" in phones
    assert client.post(f"/v1/campaign-actions/pause/{campaign}").json()["held_now"] == 0
    assert client.post(f"/v1/campaign-actions/resume/{campaign}").json()["status"] == "running"


def test_a_dry_run_answers_valid_with_sms_parts_and_stores_nothing(
    stack: Stack, client: httpx.Client, campaign: str
) -> None:
    batch = make_messages(3, campaign)
    batch[1]["text"] = "ї" * 71  # UCS-2: two parts
    batch[2]["toPhone"] = "067 123 4567"  # no region: rejected
    params = {"campaign": campaign, "dryRun": "true"}

    answer = client.post("/v1/messages", params=params, json=batch)

    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert [(r["status"], r.get("smsParts"), r.get("encoding")) for r in results] == [
        ("valid", 1, "GSM-7"),
        ("valid", 2, "UCS-2"),
        ("rejected", None, None),
    ]
    assert results[2]["errors"][0]["field"] == "toPhone"
    assert client.get(f"/v1/campaigns/{campaign}").status_code == 404  # nothing stored
    assert answer.headers["X-Estimate-Messages"] == "2"
    assert answer.headers["X-Estimate-SMS-Parts"] == "3"
    assert "X-Estimate-Cost" not in answer.headers  # no RATE_CARD here

    # It answers what the real POST would: a stored id is a duplicate, a repeat in the body
    # too, and a promo to a number on the suppression list is refused (it said `valid`).
    stored = client.post("/v1/messages", params={"campaign": campaign}, json=batch[:1])
    assert stored.json()[0]["status"] == "accepted"
    promo = {**batch[1], "id": f"{campaign}-promo", "messageType": "promo", "toPhone": OPTED}
    added = client.post("/v1/optouts/import", json=[{"phone": OPTED, "evidence": "test"}])
    assert added.status_code == 200, added.text
    again = client.post(
        "/v1/messages", params=params, json=[batch[0], batch[1], batch[1], promo]
    ).json()
    assert [r["status"] for r in again] == ["duplicate", "valid", "duplicate", "rejected"]
    assert "suppression list" in again[3]["errors"][0]["problem"]
    assert again[3]["errors"][0]["field"] == "toPhone"
    client.delete(f"/v1/optouts/numbers/{OPTED}")


def test_a_dry_run_prices_each_message_and_totals_them_by_the_rate_card(
    stack: Stack, campaign: str
) -> None:
    card = {"rate_card": "380:sms=0.95,viber=0.45;*:sms=1.5", "rate_card_currency": "UAH"}
    settings = stack.settings.model_copy(update=card)
    batch = make_messages(3, campaign)
    batch[1]["text"] = "ї" * 71  # UCS-2: two parts
    batch[2] |= {"toPhone": "+48601234567", "route": "tg-viber"}  # Poland: no viber rate

    results, estimate = dry_intake(orjson.dumps(batch), settings)

    assert [r.get("cost") for r in results] == [0.95, 1.9, None]
    assert estimate_headers(estimate, settings) == {
        "X-Estimate-Messages": "3",
        "X-Estimate-SMS-Parts": "4",
        "X-Estimate-Unpriced": "1",
        "X-Estimate-Cost": "2.8500",
        "X-Estimate-Currency": "UAH",
    }
