"""The SMSBAT client (worker/provider/smsbat.py): answers parsed, the HTTP edge (MockTransport)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import orjson
import pytest

from config import Settings
from worker.core.states import State
from worker.provider.smsbat import (
    ROUTE_PATHS,
    BadRequest,
    NotFound,
    OutcomeUnknown,
    ProviderError,
    SendClient,
    StatusClient,
    StatusReport,
    Throttled,
    Unauthorized,
    Unavailable,
    environment_proxy,
    parse_error,
    parse_send_answer,
    parse_status,
)

pytestmark = pytest.mark.unit

API_KEY = "sk-live-0123456789abcdef"
VIBER = "viber-token-secret-42"
TG = "tg-bot-secret-99"
PASSWORD = "pw-hunter2-secret"
SECRETS = (API_KEY, VIBER, TG, PASSWORD)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "SMSBAT_API_KEY": API_KEY,
        "SMSBAT_BASE_URL": "http://sim",
        "DATABASE_URL": "sqlite:///x.db",
    }
    values.update(overrides)
    return Settings(**values)


# --- parse_status --------------------------------------------------------------------


def test_parse_status_basic_answer() -> None:
    report = parse_status(
        {
            "messagelistId": 123456,
            "messageId": "m-1",
            "deliverystatus": "delivered",
            "partscount": 1,
            "cost": 0.05,
        },
        "m-1",
    )
    assert report.message_id == "m-1"
    assert report.state is State.DELIVERED
    assert report.deliverystatus == "delivered"
    assert report.partscount == 1
    assert isinstance(report.partscount, int)
    assert report.cost == 0.05
    assert report.messagelist_id == 123456
    assert isinstance(report.messagelist_id, int)
    assert report.fallbacks is None
    assert report.extended_statuses is None


def test_parse_status_early_answer_has_only_status_and_parts() -> None:
    report = parse_status({"deliverystatus": "scheduled", "partscount": 2}, "m-2")
    assert report.state is State.SCHEDULED
    assert report.partscount == 2
    assert report.cost is None
    assert report.messagelist_id is None
    assert report.fields() == {"deliverystatus": "scheduled", "partscount": 2}


def test_parse_status_full_answer_with_fallbacks() -> None:
    data = {
        "messagelistId": 7,
        "messageId": "m-3",
        "deliverystatus": "delivered",
        "partscount": 1,
        "cost": 0.12,
        "fallbacks": [{"type": "sms", "status": "not_used"}],
        "extendedStatuses": {"viber": "delivered", "sms": "not_used"},
        "rate": 0.1,
        "rateAmount": 0.12,
        "rateCurrency": "UAH",
        "billAmount": 0.12,
        "billCurrency": "UAH",
    }
    report = parse_status(data, "m-3")
    assert report.fallbacks == [{"type": "sms", "status": "not_used"}]
    assert report.extended_statuses == {"viber": "delivered", "sms": "not_used"}
    assert report.rate == 0.1
    assert report.rate_amount == 0.12
    assert report.rate_currency == "UAH"
    assert report.bill_amount == 0.12
    assert report.bill_currency == "UAH"
    assert report.fields() == {
        "deliverystatus": "delivered",
        "partscount": 1,
        "cost": 0.12,
        "messagelist_id": 7,
        "fallbacks": [{"type": "sms", "status": "not_used"}],
        "extended_statuses": {"viber": "delivered", "sms": "not_used"},
        "rate": 0.1,
        "rate_amount": 0.12,
        "rate_currency": "UAH",
        "bill_amount": 0.12,
        "bill_currency": "UAH",
    }


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("scheduled", State.SCHEDULED),
        ("processing", State.PROCESSING),
        ("delivered", State.DELIVERED),
        ("undeliverable", State.UNDELIVERABLE),
        ("permanenterror", State.PERMANENTERROR),
        ("Delivered", State.DELIVERED),
        ("PERMANENTERROR", State.PERMANENTERROR),
        ("PermanentError", State.PERMANENTERROR),
    ],
)
def test_parse_status_every_state_any_case(raw: str, state: State) -> None:
    report = parse_status({"deliverystatus": raw}, "m")
    assert report.state is state
    assert report.deliverystatus == state.value  # stored lower-case


@pytest.mark.parametrize("status", ["sent", "timeout", "queued", "", None, 3, ["delivered"]])
def test_parse_status_unknown_status_names_deliverystatus(status: Any) -> None:
    with pytest.raises(ValueError, match="deliverystatus"):
        parse_status({"deliverystatus": status}, "m")


def test_parse_status_missing_status_names_deliverystatus() -> None:
    with pytest.raises(ValueError, match="deliverystatus"):
        parse_status({"partscount": 1}, "m")


@pytest.mark.parametrize("data", [[], "delivered", None, 5])
def test_parse_status_non_object(data: Any) -> None:
    with pytest.raises(ValueError, match="object"):
        parse_status(data, "m")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partscount", True),
        ("partscount", [1]),
        ("partscount", {"n": 1}),
        ("cost", False),
        ("cost", [0.5]),
        ("messagelistId", {"id": 1}),
        ("rate", [1]),
        ("rateAmount", True),
        ("billAmount", {}),
        ("rateCurrency", 980),
        ("billCurrency", ["UAH"]),
        ("fallbacks", "sms"),
        ("fallbacks", ["sms"]),
        ("fallbacks", {"type": "sms"}),
        ("extendedStatuses", ["viber"]),
        ("extendedStatuses", "delivered"),
    ],
)
def test_parse_status_wrong_type_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        parse_status({"deliverystatus": "delivered", field: value}, "m")


@pytest.mark.parametrize(
    ("field", "value"),
    [("partscount", "abc"), ("cost", "free"), ("messagelistId", "batch-7"), ("rate", "")],
)
def test_parse_status_non_numeric_string_names_the_field(field: str, value: str) -> None:
    """The docstring promises a ValueError naming the bad field for any wrong value."""
    with pytest.raises(ValueError, match=field):
        parse_status({"deliverystatus": "delivered", field: value}, "m")


def test_parse_status_numeric_strings_are_accepted() -> None:
    report = parse_status({"deliverystatus": "delivered", "partscount": "2", "cost": "0.5"}, "m")
    assert report.partscount == 2
    assert report.cost == 0.5


@pytest.mark.parametrize("value", ["inf", "Infinity", "nan"])
def test_parse_status_non_finite_partscount_is_a_value_error(value: str) -> None:
    """Anything but ValueError escapes StatusClient.status and the poll batch with it."""
    with pytest.raises(ValueError, match="partscount"):
        parse_status({"deliverystatus": "delivered", "partscount": value}, "m")


def test_fields_drops_none_values() -> None:
    report = StatusReport(
        message_id="m", state=State.PROCESSING, deliverystatus="processing", cost=0.0
    )
    assert report.fields() == {"deliverystatus": "processing", "cost": 0.0}  # 0.0 is kept
    assert "message_id" not in report.fields()
    assert "state" not in report.fields()


# --- parse_send_answer / parse_error -------------------------------------------------


def test_send_answer_maps_by_tracking_id_whatever_the_order() -> None:
    body = orjson.dumps(
        [
            {"messageId": "uuid-b", "trackinId": "b"},
            {"messageId": "uuid-c", "trackinId": "c"},
            {"messageId": "uuid-a", "trackinId": "a"},
        ]
    )
    assert parse_send_answer(body) == {"a": "uuid-a", "b": "uuid-b", "c": "uuid-c"}


def test_send_answer_ignores_items_without_message_id() -> None:
    body = orjson.dumps(
        [
            {"messageId": "uuid-a", "trackinId": "a"},
            {"trackinId": "b"},
            {"messageId": "", "trackinId": "c"},
            {"messageId": None, "trackinId": "d"},
            {"messageId": 17, "trackinId": "e"},
            {"messageId": "uuid-f"},
            {"messageId": "uuid-g", "trackinId": 7},
        ]
    )
    assert parse_send_answer(body) == {"a": "uuid-a"}


def test_send_answer_empty_array() -> None:
    assert parse_send_answer(b"[]") == {}


@pytest.mark.parametrize("body", [b"{}", b'{"messageId": "x"}', b'"ok"', b"null", b"3"])
def test_send_answer_not_an_array(body: bytes) -> None:
    with pytest.raises(ValueError, match="array"):
        parse_send_answer(body)


def test_send_answer_non_object_items() -> None:
    with pytest.raises(ValueError):
        parse_send_answer(b'["uuid-a"]')


def test_parse_error_reads_code_message_field() -> None:
    err = parse_error(
        orjson.dumps({"error": {"code": "INVALID_PHONE", "message": "bad", "field": "toPhone"}})
    )
    assert isinstance(err, BadRequest)
    assert (err.code, err.message, err.field) == ("INVALID_PHONE", "bad", "toPhone")
    assert "INVALID_PHONE" in str(err)
    assert "toPhone" in str(err)


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"error": "boom"}', b'{"error": null}', b"{}", b'"x"'],
)
def test_parse_error_falls_back_on_unreadable_bodies(body: bytes) -> None:
    err = parse_error(body)
    assert isinstance(err, BadRequest)
    assert err.code == "BAD_REQUEST"
    assert err.message
    assert err.field is None


def test_parse_error_ignores_a_non_string_field() -> None:
    err = parse_error(orjson.dumps({"error": {"code": "X", "message": "m", "field": 3}}))
    assert err.field is None
    assert err.code == "X"


# --- SendClient ----------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]
ONE = [{"id": "a", "fromName": "T", "toPhone": "+380671234567", "messageType": "transaction"}]


def send_client(handler: Handler, **overrides: Any) -> tuple[SendClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return SendClient(settings(**overrides), transport=httpx.MockTransport(record)), seen


def _no_secret_in(exc: BaseException) -> None:
    text = f"{exc!s} {exc!r} {exc.args!r}"
    for secret in SECRETS:
        assert secret not in text


def test_send_200_maps_tracking_ids() -> None:
    client, seen = send_client(
        lambda r: httpx.Response(200, json=[{"messageId": "uuid-a", "trackinId": "a"}])
    )
    assert client.send("standard", ONE) == {"a": "uuid-a"}
    assert len(seen) == 1
    assert seen[0].method == "POST"
    assert orjson.loads(seen[0].content) == ONE
    assert seen[0].headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("route", ["standard", "tg-viber"])
def test_send_goes_to_the_route_path(route: str) -> None:
    client, seen = send_client(lambda r: httpx.Response(200, json=[]))
    client.send(route, ONE)
    assert seen[0].url.path == ROUTE_PATHS[route]
    assert seen[0].url.host == "sim"


def test_route_paths() -> None:
    assert ROUTE_PATHS == {
        "standard": "/api/CascadeMessage/send_message/async",
        "tg-viber": "/api/CascadeMessage/send_message/tg-viber/async",
    }


def test_send_unknown_route_is_refused_before_any_request() -> None:
    client, seen = send_client(lambda r: httpx.Response(200, json=[]))
    with pytest.raises(KeyError):
        client.send("carrier-pigeon", ONE)
    assert seen == []


def test_send_carries_every_configured_credential() -> None:
    client, seen = send_client(
        lambda r: httpx.Response(200, json=[]),
        SMSBAT_VIBER_TOKEN=VIBER,
        SMSBAT_TG_BOT_KEY=TG,
    )
    client.send("tg-viber", ONE)
    headers = seen[0].headers
    assert headers["X-Authorization-Key"] == API_KEY
    assert headers["X-Viber-Auth-Token"] == VIBER
    assert headers["X-Tg-Bot-Key"] == TG


def test_send_omits_credentials_not_configured() -> None:
    client, seen = send_client(lambda r: httpx.Response(200, json=[]))
    client.send("standard", ONE)
    headers = seen[0].headers
    assert headers["X-Authorization-Key"] == API_KEY
    assert "X-Viber-Auth-Token" not in headers
    assert "X-Tg-Bot-Key" not in headers
    assert "Authorization" not in headers


def test_send_400_is_bad_request_with_details() -> None:
    body = {"error": {"code": "INVALID_PHONE", "message": "bad phone", "field": "toPhone"}}
    client, _ = send_client(lambda r: httpx.Response(400, json=body))
    with pytest.raises(BadRequest) as info:
        client.send("standard", ONE)
    assert (info.value.code, info.value.message, info.value.field) == (
        "INVALID_PHONE",
        "bad phone",
        "toPhone",
    )
    _no_secret_in(info.value)


@pytest.mark.parametrize("code", [401, 403])
def test_send_401_is_unauthorized(code: int) -> None:
    client, _ = send_client(lambda r: httpx.Response(code, text=f"bad key {API_KEY}"))
    with pytest.raises(Unauthorized) as info:
        client.send("standard", ONE)
    _no_secret_in(info.value)


def test_send_429_with_delta_retry_after() -> None:
    client, _ = send_client(lambda r: httpx.Response(429, headers={"Retry-After": "3"}))
    with pytest.raises(Throttled) as info:
        client.send("standard", ONE)
    assert info.value.retry_after == 3.0


def test_send_429_with_http_date_retry_after() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    client, _ = send_client(lambda r: httpx.Response(429, headers={"Retry-After": when}))
    with pytest.raises(Throttled) as info:
        client.send("standard", ONE)
    assert 55.0 <= info.value.retry_after <= 60.0


def test_send_429_without_header_uses_the_default_and_cap() -> None:
    client, _ = send_client(
        lambda r: httpx.Response(429), RETRY_AFTER_DEFAULT_SECONDS=7, RETRY_AFTER_MAX_SECONDS=50
    )
    with pytest.raises(Throttled) as info:
        client.send("standard", ONE)
    assert info.value.retry_after == 7.0

    client, _ = send_client(
        lambda r: httpx.Response(429, headers={"Retry-After": "9999"}),
        RETRY_AFTER_MAX_SECONDS=50,
    )
    with pytest.raises(Throttled) as info:
        client.send("standard", ONE)
    assert info.value.retry_after == 50.0


@pytest.mark.parametrize("code", [500, 502, 503, 504, 404])
def test_send_server_errors_are_unavailable(code: int) -> None:
    client, _ = send_client(lambda r: httpx.Response(code))
    with pytest.raises(Unavailable) as info:
        client.send("standard", ONE)
    assert str(code) in str(info.value)
    _no_secret_in(info.value)


def _raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(f"simulated, key {API_KEY}", request=request)

    return handler


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpx.ConnectError, Unavailable),
        (httpx.ConnectTimeout, Unavailable),
        (httpx.PoolTimeout, Unavailable),
        (httpx.WriteTimeout, Unavailable),
        (httpx.WriteError, Unavailable),
        (httpx.ReadTimeout, OutcomeUnknown),
        (httpx.ReadError, OutcomeUnknown),
        (httpx.RemoteProtocolError, OutcomeUnknown),
    ],
)
def test_send_transport_errors(
    raised: type[httpx.TransportError], expected: type[ProviderError]
) -> None:
    client, _ = send_client(_raising(raised))
    with pytest.raises(expected) as info:
        client.send("standard", ONE)
    assert type(info.value) is expected
    assert raised.__name__ in str(info.value)
    _no_secret_in(info.value)
    assert info.value.__suppress_context__  # `from None`: the original (and its text) is dropped


@pytest.mark.parametrize(
    "body", [b"not json", b'{"messageId": "x"}', b"", b'["uuid"]', b"<html>ok</html>"]
)
def test_send_200_unreadable_is_outcome_unknown(body: bytes) -> None:
    client, _ = send_client(lambda r: httpx.Response(200, content=body))
    with pytest.raises(OutcomeUnknown) as info:
        client.send("standard", ONE)
    _no_secret_in(info.value)


def test_send_exceptions_never_mention_secrets_across_the_board() -> None:
    responses = [
        httpx.Response(400, text=f"nope {API_KEY}"),
        httpx.Response(401),
        httpx.Response(403),
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(500),
        httpx.Response(200, content=b"{broken"),
    ]
    for response in responses:
        client, _ = send_client(
            lambda r, resp=response: resp, SMSBAT_VIBER_TOKEN=VIBER, SMSBAT_TG_BOT_KEY=TG
        )
        with pytest.raises(ProviderError) as info:
            client.send("standard", ONE)
        _no_secret_in(info.value)


# --- StatusClient --------------------------------------------------------------------


def status_call(
    handler: Handler, message_id: str = "uuid-1", **overrides: Any
) -> tuple[StatusReport | ProviderError, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = StatusClient(settings(**overrides), transport=httpx.MockTransport(record))
    try:
        return client.status(message_id), seen
    except ProviderError as exc:
        return exc, seen
    finally:
        client.close()


def _delivered(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"deliverystatus": "delivered", "partscount": 1})


def test_status_key_mode_sends_the_key_header() -> None:
    result, seen = status_call(_delivered)
    assert isinstance(result, StatusReport)
    assert result.state is State.DELIVERED
    assert result.message_id == "uuid-1"
    assert seen[0].method == "GET"
    assert seen[0].url.path == "/bat/message/uuid-1"
    assert seen[0].headers["X-Authorization-Key"] == API_KEY
    assert "Authorization" not in seen[0].headers
    assert seen[0].headers["User-Agent"].startswith("python-httpx/")  # as sends have it


def _basic(request: httpx.Request) -> tuple[str, str]:
    scheme, _, encoded = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    return user, password


def test_status_basic_mode_sends_username_and_password() -> None:
    result, seen = status_call(
        _delivered,
        SMSBAT_STATUS_AUTH="basic",
        SMSBAT_USERNAME="acme",
        SMSBAT_PASSWORD=PASSWORD,
    )
    assert isinstance(result, StatusReport)
    assert _basic(seen[0]) == ("acme", PASSWORD)
    assert "X-Authorization-Key" not in seen[0].headers


def test_status_basic_key_mode_sends_at_and_the_key() -> None:
    result, seen = status_call(_delivered, SMSBAT_STATUS_AUTH="basic_key")
    assert isinstance(result, StatusReport)
    assert _basic(seen[0]) == ("@", API_KEY)
    assert "X-Authorization-Key" not in seen[0].headers


def test_status_uses_the_status_base_url_when_set() -> None:
    _, seen = status_call(_delivered, SMSBAT_STATUS_BASE_URL="http://status.example/")
    assert seen[0].url.host == "status.example"
    assert seen[0].url.path == "/bat/message/uuid-1"


def test_status_keeps_the_base_url_path_and_quotes_the_id() -> None:
    _, seen = status_call(_delivered, "a/b?c", SMSBAT_STATUS_BASE_URL="http://status.example/v2")
    assert seen[0].url.raw_path == b"/v2/bat/message/a%2Fb%3Fc"


def test_status_check_carries_the_configured_timeouts() -> None:
    _, seen = status_call(_delivered, HTTP_READ_TIMEOUT_SECONDS=7, HTTP_CONNECT_TIMEOUT_SECONDS=2)
    assert seen[0].extensions["timeout"] == {"connect": 2, "read": 7, "write": 10, "pool": 2}


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself, recording its target."""

    targets: list[str] = []

    def do_GET(self) -> None:
        self.targets.append(self.path)
        body = b'{"deliverystatus": "delivered"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_status_checks_take_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sends take HTTP(S)_PROXY through httpx.Client; checks, which skip the client, too.

    One real server is both the proxy (absolute-form targets) and, under NO_PROXY, the
    provider itself (origin-form targets)."""
    server = HTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    here = f"127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HTTP_PROXY", f"http://{here}")
    reports = []
    try:
        for base_url, no_proxy in (("http://status.example", ""), (f"http://{here}", "127.0.0.1")):
            monkeypatch.setenv("NO_PROXY", no_proxy)
            client = StatusClient(settings(SMSBAT_STATUS_BASE_URL=base_url))
            reports.append(client.status("uuid-1"))
            client.close()
    finally:
        server.shutdown()
    assert all(isinstance(report, StatusReport) for report in reports)
    assert _Proxy.targets == ["http://status.example/bat/message/uuid-1", "/bat/message/uuid-1"]


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({"HTTPS_PROXY": "http://p:1"}, "https://status.example", "http://p:1"),
        ({"HTTP_PROXY": "p:3128"}, "http://status.example", "http://p:3128"),  # no scheme
        ({"ALL_PROXY": "http://all:1"}, "https://status.example", "http://all:1"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": ".example"}, "http://status.example", None),
        (
            {"HTTP_PROXY": "http://p:1", "NO_PROXY": "status.example:8443"},
            "http://status.example:8443",
            None,
        ),
        ({"HTTPS_PROXY": "http://p:1"}, "http://status.example", None),  # other scheme
    ],
)
def test_environment_proxy_reads_the_environment_as_httpx_does(
    env: dict[str, str], url: str, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert environment_proxy(httpx.URL(url)) == expected


def test_status_404_is_not_found() -> None:
    result, _ = status_call(lambda r: httpx.Response(404))
    assert isinstance(result, NotFound)


@pytest.mark.parametrize(
    "body",
    [b"garbage", b"", b"[]", b'{"deliverystatus": "lost"}', b'{"deliverystatus": 1}'],
)
def test_status_garbage_body_is_unavailable(body: bytes) -> None:
    result, _ = status_call(lambda r: httpx.Response(200, content=body))
    assert isinstance(result, Unavailable)
    _no_secret_in(result)


def test_status_429_is_throttled() -> None:
    result, _ = status_call(lambda r: httpx.Response(429, headers={"Retry-After": "2"}))
    assert isinstance(result, Throttled)
    assert result.retry_after == 2.0


@pytest.mark.parametrize(("code", "expected"), [(401, Unauthorized), (500, Unavailable)])
def test_status_http_errors(code: int, expected: type[ProviderError]) -> None:
    result, _ = status_call(lambda r: httpx.Response(code))
    assert type(result) is expected
    _no_secret_in(result)


@pytest.mark.parametrize("raised", [httpx.ConnectError, httpx.ReadTimeout])
def test_status_transport_errors_are_unavailable(raised: type[httpx.TransportError]) -> None:
    result, _ = status_call(_raising(raised))
    assert type(result) is Unavailable
    _no_secret_in(result)


def test_status_non_finite_number_is_a_provider_error() -> None:
    """A status check must answer a report or a ProviderError, never crash the batch."""
    body = b'{"deliverystatus": "delivered", "partscount": "inf"}'
    result, _ = status_call(lambda r: httpx.Response(200, content=body))
    assert isinstance(result, Unavailable)
