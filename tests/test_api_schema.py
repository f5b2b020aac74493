"""The OpenAPI document against the app itself: schemathesis generates valid and invalid
requests from it, and every answer must be documented, conform, and never be a 5xx.

It runs in process (ASGI) on a migrated SQLite file and a Redis DB of its own, with one
message stored so the documented examples (`order-1001` in campaign `orders`) reach the
200 answers, not only the 404s.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection

from config import Settings
from worker.core.validation import validate_message
from worker.flows.producer import enqueue
from worker.http.app import MAX_MESSAGES, app_settings, create_app
from worker.store.migrate import upgrade_database

TOKEN = "schema-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POST_MESSAGES = "POST /v1/messages"
EXAMPLE = {
    "id": "order-1001",
    "fromName": "Shop",
    "toPhone": "+380671234567",
    "messageType": "transaction",
    "text": "Your order is on its way",
}


# Built at import for schemathesis (its lazy fixture loader breaks on pytest 9); the
# `database` fixture points it at a fresh database through the settings dependency.
APP = create_app(Settings(API_TOKEN=TOKEN))  # type: ignore[call-arg]
schema = schemathesis.openapi.from_asgi("/openapi.json", APP).include(
    path_regex=r"^/(v1/|healthz$)"  # ours only: the webhooks document and test themselves
)


@pytest.fixture(autouse=True)
def database(tmp_path: Path, redis_db: str) -> Iterator[None]:
    url = f"sqlite:///{tmp_path / 'cascade.db'}"
    upgrade_database(url)
    config = Settings(DATABASE_URL=url, BROKER_URL=redis_db, API_TOKEN=TOKEN)  # type: ignore[call-arg]
    enqueue([EXAMPLE], "orders", settings=config, kick=False)
    APP.dependency_overrides[app_settings] = lambda: config
    yield
    APP.dependency_overrides.clear()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_answers_conform_to_the_document(case: schemathesis.Case) -> None:
    """Every check, except that invalid messages are answered 200: refusing them one by
    one is the contract, so instead each invalid array must come back with a rejection."""
    if case.operation.label != POST_MESSAGES:
        case.call_and_validate(headers=AUTH)
        return
    response = case.call_and_validate(headers=AUTH, excluded_checks=[negative_data_rejection])
    if response.status_code == 200 and invalid_body(case):
        statuses = [result["status"] for result in response.json()]
        assert "rejected" in statuses, f"schema-invalid body accepted: {case.body!r}"


def invalid_body(case: schemathesis.Case) -> bool:
    """Whether schemathesis broke the body's schema on purpose (not a query or header)."""
    body = case.meta.components.get(ParameterLocation.BODY) if case.meta else None
    return body is not None and body.mode.is_negative


def test_the_message_schema_names_every_field_the_worker_takes() -> None:
    """The worker lists its fields when it refuses an unknown one; the document must agree."""
    refused = validate_message({"unknown": 1}, now=datetime.now(UTC))
    assert isinstance(refused, list)
    allowed = refused[0].problem.partition("allowed: ")[2].split(", ")
    body = APP.openapi()["paths"]["/v1/messages"]["post"]["requestBody"]
    array = body["content"]["application/json"]["schema"]
    assert array["type"] == "array" and array["maxItems"] == MAX_MESSAGES
    assert set(array["items"]["properties"]) == set(allowed)
    assert array["items"]["additionalProperties"] is False
    assert set(array["items"]["required"]) == {"id", "fromName", "toPhone", "messageType"}


def test_producer_routes_need_the_bearer_token_and_document_their_errors() -> None:
    doc = APP.openapi()
    assert doc["components"]["securitySchemes"]["ApiToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The API_TOKEN setting, sent as `Authorization: Bearer <API_TOKEN>`.",
    }
    expected = {
        ("post", "/v1/messages"): {"200", "400", "401", "409", "413", "415", "422", "503"},
        ("get", "/v1/messages/{id}"): {"200", "401", "404", "422", "503"},
        ("get", "/v1/campaigns/{campaign}"): {"200", "401", "404", "422", "503"},
        ("get", "/healthz"): {"200", "503"},
    }
    for (method, path), statuses in expected.items():
        operation = doc["paths"][path][method]
        assert set(operation["responses"]) == statuses, (method, path)
        assert ("security" in operation) == path.startswith("/v1/")
    schemas = doc["components"]["schemas"]
    assert set(schemas["CampaignReport"]["required"]) >= {
        *("money", "channels", "latency_seconds", "analytics_as_of", "analytics_age_seconds")
    }
    assert "events" in schemas["MessageDetail"]["required"]
