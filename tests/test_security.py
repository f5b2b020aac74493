"""Credentials at the producer API and the webhook receivers, on the real app and database.

Wrong, missing, empty, different-length and non-ASCII tokens and signatures are refused
(401, nothing stored, nothing echoed), and every comparison of a secret in our code is the
constant-time `hmac.compare_digest`.
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select

from config import Settings
from tests.conftest import REDIS, claim_redis_db, release_redis_db
from worker.core.signing import sign
from worker.http.app import create_app
from worker.http.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER
from worker.store.db import get_engine
from worker.store.models import messages, provider_reports

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "api-token-0123456789"
HOOK_TOKEN = "hook-token-0123456789"
SIGNING = "signing-secret-0123"
MESSAGE = {
    "id": "sec-1",
    "fromName": "Shop",
    "toPhone": "+380671234567",
    "messageType": "transaction",
    "text": "hi",
}
REPORT = json.dumps({"messageId": "pm-1", "deliverystatus": "delivered"}).encode()


@pytest.fixture(scope="module")
def app_for(database_factory: Callable[[str], str]) -> Iterator[Callable[..., TestClient]]:
    """A TestClient on the real app over a fresh SQLite file, with the given settings."""
    index = claim_redis_db()
    clients: list[TestClient] = []

    def make(**values: Any) -> TestClient:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            DATABASE_URL=database_factory("sqlite"),
            BROKER_URL=f"{REDIS}/{index}",
            API_TOKEN=API_TOKEN,
            WEBHOOK_TOKEN=HOOK_TOKEN,
            **values,
        )
        client = TestClient(create_app(settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    release_redis_db(index)


def _rows(client: TestClient, table: Any) -> list[Any]:
    url = client.app.state.settings.database_url  # type: ignore[attr-defined]
    with get_engine(url).connect() as conn:
        return list(conn.execute(select(table)))


# Header values as raw bytes: what a client can really put on the wire.
WRONG_BEARERS: list[tuple[str, bytes | None]] = [
    ("missing", None),
    ("scheme only", b"Bearer"),
    ("empty", b"Bearer "),
    ("same length, wrong", b"Bearer " + b"x" * len(API_TOKEN)),
    ("a prefix", b"Bearer " + API_TOKEN[:-1].encode()),
    ("longer", b"Bearer " + API_TOKEN.encode() + b"0"),
    ("other case", b"Bearer " + API_TOKEN.upper().encode()),
    ("UTF-8", "Bearer tökén-ключ-🔑".encode()),
    ("Latin-1 byte", b"Bearer " + API_TOKEN[:-1].encode() + b"\xe9"),
    ("split by a space", b"Bearer " + API_TOKEN[:5].encode() + b" " + API_TOKEN[5:].encode()),
    ("Basic scheme", b"Basic " + API_TOKEN.encode()),
    ("the webhook token", b"Bearer " + HOOK_TOKEN.encode()),
]


@pytest.mark.parametrize(("why", "authorization"), WRONG_BEARERS, ids=[w for w, _ in WRONG_BEARERS])
@pytest.mark.parametrize(
    "route", ["POST /v1/messages", "GET /v1/messages/sec-1", "GET /v1/campaigns/c"]
)
def test_producer_routes_refuse_every_wrong_token(
    app_for: Callable[..., TestClient], why: str, authorization: bytes | None, route: str
) -> None:
    client = app_for()
    method, path = route.split()
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization  # type: ignore[assignment]
    body = json.dumps([MESSAGE]) if method == "POST" else None

    answer = client.request(method, path, content=body, headers=headers)

    assert answer.status_code == 401, (why, answer.text)
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert API_TOKEN not in answer.text and "ток" not in answer.text
    assert _rows(client, messages) == []


def test_the_right_token_is_let_in_with_any_case_of_scheme(
    app_for: Callable[..., TestClient],
) -> None:
    client = app_for()
    for scheme in ("Bearer", "bearer"):
        answer = client.post(
            "/v1/messages",
            json=[{**MESSAGE, "id": f"sec-{scheme}"}],
            headers={"Authorization": f"{scheme} {API_TOKEN}"},
        )
        assert answer.status_code == 200 and answer.json()[0]["status"] == "accepted"


def test_a_refused_query_never_echoes_the_password_it_carried(
    app_for: Callable[..., TestClient],
) -> None:
    answer = app_for().post(
        "/v1/messages",
        params={"callbackUrl": "https://shop:hunter2-pw@h x/"},
        json=[],
        headers={"Authorization": f"Bearer {API_TOKEN}"},
    )
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["query", "callbackUrl"]
    assert "hunter2-pw" not in answer.text


def _signed(body: bytes, stamp: str | None = None, secret: str = SIGNING) -> dict[str, str]:
    stamp = stamp or str(int(time.time()))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret, stamp, body)}


def _bearer(token: str = HOOK_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


WRONG_PUSHES: list[tuple[str, dict[str, Any], str]] = [
    ("no token at all", {}, "a token is required"),
    ("empty query token", {"query": "?token="}, "a token is required"),
    ("empty bearer", {"headers": {"Authorization": "Bearer "}}, "a token is required"),
    ("same length", {"headers": _bearer("y" * len(HOOK_TOKEN))}, "wrong token"),
    ("shorter", {"headers": _bearer(HOOK_TOKEN[:3])}, "wrong token"),
    ("longer", {"query": f"?token={HOOK_TOKEN}{HOOK_TOKEN}"}, "wrong token"),
    ("UTF-8 in the query", {"query": "?token=%C5%BEluv%F0%9F%94%91"}, "wrong token"),
    ("bad UTF-8 in the query", {"query": "?token=%FF%FE"}, "wrong token"),
    ("UTF-8 header", {"headers": {"Authorization": "Bearer žluť".encode()}}, "wrong token"),
    ("the API token", {"headers": _bearer(API_TOKEN)}, "wrong token"),
]


@pytest.mark.parametrize(
    ("why", "request_", "detail"), WRONG_PUSHES, ids=[w[0] for w in WRONG_PUSHES]
)
def test_webhooks_refuse_every_wrong_token(
    app_for: Callable[..., TestClient], why: str, request_: dict[str, Any], detail: str
) -> None:
    client = app_for()
    path = "/webhooks/smsbat" + request_.get("query", "")
    answer = client.post(path, content=REPORT, headers=request_.get("headers", {}))
    assert answer.status_code == 401, (why, answer.text)
    assert answer.json()["detail"].startswith(detail)
    assert HOOK_TOKEN not in answer.text
    assert _rows(client, provider_reports) == []


def _changed_signature(change: Callable[[str], str | bytes]) -> dict[str, Any]:
    headers: dict[str, Any] = _signed(REPORT)
    headers[SIGNATURE_HEADER] = change(headers[SIGNATURE_HEADER])
    return headers


def _at(offset: int) -> dict[str, str]:
    return _signed(REPORT, str(int(time.time()) + offset))


WRONG_SIGNATURES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("none", lambda: {}, "are required"),
    ("empty", lambda: _changed_signature(lambda _: ""), "are required"),
    ("truncated", lambda: _changed_signature(lambda s: s[:-1]), "does not match"),
    ("longer", lambda: _changed_signature(lambda s: s + "0"), "does not match"),
    ("no sha256= prefix", lambda: _changed_signature(lambda s: s[7:]), "does not match"),
    ("non-ASCII", lambda: _changed_signature(lambda _: "sha256=ž".encode()), "does not match"),
    ("another secret", lambda: _signed(REPORT, secret="other-secret"), "does not match"),
    ("another body", lambda: _signed(REPORT + b" "), "does not match"),
    ("replayed late", lambda: _at(-310), "is outside the tolerance window"),  # clear of 300 s
    ("from the future", lambda: _at(310), "is outside the tolerance window"),  # int() floors
    (
        "Arabic-Indic digits",
        lambda: {TIMESTAMP_HEADER: "١٧٠٠٠٠٠٠٠٠".encode(), SIGNATURE_HEADER: "sha256=00"},
        "must be unix seconds",
    ),
    ("negative", lambda: _signed(REPORT, "-1"), "must be unix seconds"),
    ("13 digits", lambda: _signed(REPORT, "1" * 13), "must be unix seconds"),
]


@pytest.mark.parametrize(
    ("why", "headers", "detail"), WRONG_SIGNATURES, ids=[w[0] for w in WRONG_SIGNATURES]
)
def test_signed_webhooks_refuse_every_wrong_signature_and_stale_timestamp(
    app_for: Callable[..., TestClient],
    why: str,
    headers: Callable[[], dict[str, Any]],
    detail: str,
) -> None:
    client = app_for(WEBHOOK_SIGNING_SECRET=SIGNING)
    answer = client.post("/webhooks/smsbat", content=REPORT, headers={**_bearer(), **headers()})
    assert answer.status_code == 401, (why, answer.text)
    assert detail in answer.json()["detail"]
    assert SIGNING not in answer.text
    assert _rows(client, provider_reports) == []


def test_a_signed_push_inside_the_window_is_accepted(app_for: Callable[..., TestClient]) -> None:
    """The refusals above are refusals of the credentials, not of every request."""
    client = app_for(WEBHOOK_SIGNING_SECRET=SIGNING)
    stamp = str(int(time.time()) - 290)  # well inside 300 s, even on a loaded machine
    answer = client.post(
        "/webhooks/smsbat", content=REPORT, headers={**_bearer(), **_signed(REPORT, stamp)}
    )
    assert answer.status_code == 200 and answer.json()["accepted"] == 1


@pytest.mark.parametrize("name", ["API_TOKEN", "WEBHOOK_TOKEN"])
@pytest.mark.parametrize("token", ["tökén-ключ", "two words", "tab\there", 'quote"d'])
def test_tokens_no_client_could_send_are_refused_at_start(name: str, token: str) -> None:
    """A non-ASCII token arrives Latin-1-decoded and never matches: every caller got 401."""
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, **{name: token})  # type: ignore[arg-type]
    assert name in str(info.value) and "no spaces" in str(info.value)
    assert token not in str(info.value)


def test_chunked_bodies_over_the_limit_are_refused_without_content_length(
    app_for: Callable[..., TestClient],
) -> None:
    client = app_for(WEBHOOK_MAX_BODY_BYTES="2048")
    chunks = (b" " * 512 for _ in range(8))
    answer = client.post("/webhooks/bulkgate", content=chunks, headers=_bearer())
    assert answer.status_code == 413
    assert "content-length" not in answer.request.headers
    assert answer.request.headers["transfer-encoding"] == "chunked"


# --- the code: every secret compared in constant time ------------------------------------------

SECRET_WORDS = re.compile(r"token|secret|signature|password|api_?key|credential|basic_auth", re.I)
# claim_token is a lease id in our own database, not a credential. The simulator stands in
# for the provider in tests and demos; it is not an authentication boundary of ours.
NOT_SECRETS = re.compile(r"claim_token")
AUTH_FUNCTIONS = {
    "worker/http/app.py": ["require_token"],
    "worker/http/webhooks.py": ["_check_token", "_check_signature"],
    "worker/core/signing.py": ["verify_signature"],
}


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted([*ROOT.glob("worker/**/*.py"), *ROOT.glob("config/*.py")]):
        relative = str(path.relative_to(ROOT))
        if relative != "worker/dev/simulator.py":
            yield relative, ast.parse(path.read_text())


@pytest.mark.unit
def test_no_secret_is_compared_with_equality() -> None:
    """`==`, `!=` and `in` stop at the first differing byte: timing tells the prefix."""
    found = []
    for name, module in _sources():
        for node in ast.walk(module):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops
            ):
                parts = [node.left, *node.comparators]
                shown = ast.unparse(node)
                secretive = [  # a literal like "token" is a name, not a secret
                    p for p in parts if not isinstance(p, ast.Constant)
                    and SECRET_WORDS.search(ast.unparse(p))
                ]  # fmt: skip
                if secretive and not NOT_SECRETS.search(shown):
                    found.append(f"{name}:{node.lineno}: {shown}")
    assert found == []


@pytest.mark.unit
def test_every_credential_check_uses_compare_digest_and_nothing_else() -> None:
    for name, module in _sources():
        for node in ast.walk(module):
            if isinstance(node, ast.FunctionDef) and node.name in AUTH_FUNCTIONS.get(name, []):
                calls = {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
                assert "hmac.compare_digest" in calls, (name, node.name)
                equalities = [
                    ast.unparse(c)
                    for c in ast.walk(node)
                    if isinstance(c, ast.Compare)
                    and any(isinstance(op, ast.Eq | ast.NotEq) for op in c.ops)
                    and not any(isinstance(part, ast.Constant) for part in c.comparators)
                ]
                assert equalities == [], (name, node.name, equalities)
    names = {n for functions in AUTH_FUNCTIONS.values() for n in functions}
    defined = {
        node.name
        for _, module in _sources()
        for node in ast.walk(module)
        if isinstance(node, ast.FunctionDef)
    }
    assert names <= defined  # a renamed check must not silently leave this test
