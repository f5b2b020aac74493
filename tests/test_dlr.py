"""Parsing pushed reports (worker/provider/dlr.py) and the forward-only rule they feed: pure."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.helpers import SEED_PAYLOAD
from worker.core.states import FINAL, PROVIDER_STATES, State, rank
from worker.core.statuses import SOURCES, Report, apply
from worker.provider.dlr import (
    BULKGATE_STATES,
    PRAGUE,
    Inbound,
    ParseError,
    normalise_sender,
    parse_bulkgate,
    parse_bulkgate_query,
    parse_smsbat_report,
    parse_smsbat_webhook,
    prague_pair,
)

pytestmark = pytest.mark.unit


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _one(results: list[Any]) -> Any:
    assert len(results) == 1
    return results[0]


# --- SMSBAT webhook ----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "state"), sorted(PROVIDER_STATES.items()))
def test_every_smsbat_status_maps_to_its_state(status: str, state: State) -> None:
    report = parse_smsbat_report({"messageId": "m-1", "deliverystatus": status.upper()})

    assert report == Report("m-1", state, "webhook", {"deliverystatus": status}, report.detail)
    assert report.detail == f"deliverystatus {status}"


def test_smsbat_cost_and_provider_time_are_kept() -> None:
    report = parse_smsbat_report(
        {
            "messageId": "m-1",
            "deliverystatus": "delivered",
            "timestamp": "2025-01-25T12:00:05+02:00",
            "cost": "0.05",
        }
    )

    assert report.fields == {"deliverystatus": "delivered", "cost": 0.05}
    assert report.detail == "deliverystatus delivered at 2025-01-25T10:00:05Z (provider time)"


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ({"deliverystatus": "delivered"}, "messageId: required"),
        ({"messageId": "", "deliverystatus": "delivered"}, "messageId: required"),
        ({"messageId": {"a": 1}, "deliverystatus": "delivered"}, "messageId: required"),
        ({"messageId": "x" * 65, "deliverystatus": "delivered"}, "messageId: longer than 64"),
        ({"messageId": "m", "deliverystatus": "sent"}, "deliverystatus: unknown status 'sent'"),
        ({"messageId": "m", "deliverystatus": 1}, "deliverystatus: unknown status 1"),
        ({"messageId": "m"}, "deliverystatus: unknown status None"),
        ({"messageId": "m", "deliverystatus": "delivered", "cost": True}, "cost: must be a number"),
        ({"messageId": "m", "deliverystatus": "delivered", "cost": "x"}, "cost: must be a number"),
        ({"messageId": "m", "deliverystatus": "delivered", "cost": -1}, "cost: must be a finite"),
        (
            {"messageId": "m", "deliverystatus": "delivered", "cost": "nan"},
            "cost: must be a finite",
        ),
        ({"messageId": "m", "deliverystatus": "delivered", "cost": 10**400}, "cost: must be a"),
        (
            {"messageId": "m", "deliverystatus": "delivered", "timestamp": "2025-01-25T10:00:05"},
            "timestamp: needs a zone",
        ),
        (
            {"messageId": "m", "deliverystatus": "delivered", "timestamp": "yesterday"},
            "timestamp: not an ISO 8601",
        ),
        (
            {"messageId": "m", "deliverystatus": "delivered", "timestamp": 1737799205},
            "timestamp: must be an ISO 8601 string",
        ),
        (["not", "an", "object"], "report must be a JSON object, got array"),
    ],
)
def test_smsbat_errors_name_the_field(item: Any, error: str) -> None:
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(")):
        parse_smsbat_report(item)


def test_smsbat_single_object_and_arrays_give_per_element_results() -> None:
    good = {"messageId": "m-1", "deliverystatus": "delivered"}
    assert isinstance(_one(parse_smsbat_webhook(good)), Report)
    assert parse_smsbat_webhook([]) == []

    results = parse_smsbat_webhook([good, {"messageId": "m-2"}, good, "x"])

    assert [type(r) for r in results] == [Report, ParseError, Report, ParseError]
    assert [(r.index, r.error.split(":")[0]) for r in results if isinstance(r, ParseError)] == [
        (1, "deliverystatus"),
        (3, "report must be a JSON object, got string"),
    ]


# --- BulkGate ------------------------------------------------------------------------------------


def test_the_seed_example_parses_to_two_reports_and_an_inbound_sms() -> None:
    delivered, buffered, inbound = parse_bulkgate(SEED_PAYLOAD)

    assert delivered == Report(
        "3t2563af3ff285",
        State.DELIVERED,
        "dlr",
        {"deliverystatus": "delivered", "cost": 0.71},
        "BulkGate status 1: delivered; sent 2019-04-11T08:07Z, "
        "status at 2019-04-11T08:11Z (provider time, to the minute)",
    )
    assert buffered.state == State.PROCESSING and "not final" in buffered.detail
    assert inbound == Inbound("+420777777777", "text odpovědi", None, SEED_PAYLOAD[2])


@pytest.mark.parametrize(
    ("status", "state", "meaning"),
    [
        ("1", State.DELIVERED, "delivered"),
        ("2", State.PROCESSING, "buffered at the SMSC"),
        ("3", State.UNDELIVERABLE, "not delivered"),
        ("6", State.PROCESSING, "accepted by the SMSC"),
        ("8", State.UNDELIVERABLE, "expired at the SMSC"),
        ("13", State.DELIVERED, "read (Viber)"),
        (13, State.DELIVERED, "read (Viber)"),
        (" 3 ", State.UNDELIVERABLE, "not delivered"),
    ],
)
def test_every_bulkgate_status_maps_to_its_state(status: Any, state: State, meaning: str) -> None:
    report = _one(parse_bulkgate([{"status": status, "smsID": "abc"}]))

    assert isinstance(report, Report)
    assert (report.message_id, report.state, report.source) == ("abc", state, "dlr")
    reason = {}  # a failure carries its status as the reason (issue 13: top errors)
    if state == State.UNDELIVERABLE:
        code = str(status).strip()
        reason = {"error_code": f"BULKGATE_{code}", "error_message": BULKGATE_STATES[code][1]}
    assert report.fields == {"deliverystatus": state.value, **reason}
    assert meaning in report.detail


def test_the_status_table_covers_every_documented_code_but_inbound() -> None:
    assert set(BULKGATE_STATES) == {"1", "2", "3", "6", "8", "13"}


def test_inbound_sms_takes_message_before_text_and_the_send_time() -> None:
    inbound = _one(
        parse_bulkgate(
            [
                {
                    "status": 10,
                    "from": "+420777777777",
                    "message": "ANO",
                    "text": "x",
                    "date": "2501151200",
                }
            ]
        )
    )

    assert inbound.text == "ANO"
    assert inbound.sent_at == _utc(2025, 1, 15, 11, 0)


@pytest.mark.parametrize(
    ("raw", "sender"),
    [
        ("420777777777", "+420777777777"),
        ("+420777777777", "+420777777777"),
        ("00420777777777", "+420777777777"),
        (" 420777777777 ", "+420777777777"),
        ("INFO", "INFO"),
        ("0777777777", "0777777777"),  # national: not ours to guess a country for
    ],
)
def test_senders_in_international_form_become_e164(raw: str, sender: str) -> None:
    assert normalise_sender(raw) == sender


def test_a_numeric_sender_is_accepted_as_a_number() -> None:
    assert _one(parse_bulkgate([{"status": "10", "from": 420777777777}])).sender == "+420777777777"


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ({"smsID": "a"}, "status: required"),
        ({"status": True, "smsID": "a"}, "status: required"),
        ({"status": 1.0, "smsID": "a"}, "status: required"),
        ({"status": "5", "smsID": "a"}, "status: unknown BulkGate status '5'"),
        ({"status": "1"}, "smsID: required"),
        ({"status": "1", "smsID": "a", "price": "free"}, "price: must be a number"),
        ({"status": "1", "smsID": "a", "date": 1904111007}, "date: must be a string"),
        ({"status": "1", "smsID": "a", "date": "19041110"}, "date: '19041110' is not yymmddHHMM"),
        ({"status": "1", "smsID": "a", "date": "1913111007"}, "date: '1913111007' is not a valid"),
        ({"status": "1", "smsID": "a", "date": "1904111007;x"}, "date: 'x' is not yymmddHHMM"),
        ({"status": "1", "smsID": "a", "date": "1;2;3"}, "date: expected yymmddHHMM;yymmddHHMM"),
        ({"status": "1", "smsID": "a", "date": "١٩٠٤١١١٠٠٧"}, "date: '١٩٠٤١١١٠٠٧' is not"),
        ({"status": "10"}, "from: required for an inbound SMS"),
        ({"status": "10", "from": "  "}, "from: required for an inbound SMS"),
        ({"status": "10", "from": "4" * 40}, "from: longer than 32 characters"),
        ({"status": "10", "from": "420777777777", "message": 5}, "message: must be a string"),
        ({"status": "10", "from": "420777777777", "text": []}, "text: must be a string"),
    ],
)
def test_bulkgate_errors_name_the_field(item: dict[str, Any], error: str) -> None:
    result = _one(parse_bulkgate([item]))

    assert isinstance(result, ParseError)
    assert result.index == 0
    assert result.error.startswith(error)


def test_a_sender_is_never_echoed_in_an_error() -> None:
    result = _one(parse_bulkgate([{"status": "10", "from": "4207" + "7" * 40}]))

    assert "4207" not in result.error


def test_empty_optional_fields_count_as_absent() -> None:
    report = _one(parse_bulkgate([{"status": "1", "smsID": "a", "price": "", "date": ""}]))

    assert report.fields == {"deliverystatus": "delivered"}
    assert report.detail == "BulkGate status 1: delivered"


def test_one_bad_element_never_rejects_the_others() -> None:
    results = parse_bulkgate(
        [SEED_PAYLOAD[0], {"status": "99"}, SEED_PAYLOAD[2], None, SEED_PAYLOAD[1]]
    )

    assert [type(r).__name__ for r in results] == [
        "Report",
        "ParseError",
        "Inbound",
        "ParseError",
        "Report",
    ]
    assert [r.index for r in results if isinstance(r, ParseError)] == [1, 3]


def test_the_query_form_is_one_report() -> None:
    report = _one(
        parse_bulkgate_query({"status": "3", "smsID": "q1", "price": "0.5", "date": "2507011200"})
    )

    assert (report.message_id, report.state, report.fields["cost"]) == (
        "q1",
        State.UNDELIVERABLE,
        0.5,
    )
    assert "sent 2025-07-01T10:00Z" in report.detail
    assert _one(parse_bulkgate_query({})) == ParseError(
        0, "status: required, a number as an integer or a string, got None"
    )


# --- Prague time -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "sent", "done"),
    [
        # winter (CET, +01:00): the seed's own example
        ("1812141317;1812141318", _utc(2018, 12, 14, 12, 17), _utc(2018, 12, 14, 12, 18)),
        # summer (CEST, +02:00)
        ("1904111007;1904111011", _utc(2019, 4, 11, 8, 7), _utc(2019, 4, 11, 8, 11)),
        # a send in winter time, delivered after the spring switch (30 March 2025, 02:00→03:00)
        ("2503300159;2503300301", _utc(2025, 3, 30, 0, 59), _utc(2025, 3, 30, 1, 1)),
        # a time in the skipped hour takes the offset before the jump (+01:00)
        ("2503300230;2503300230", _utc(2025, 3, 30, 1, 30), _utc(2025, 3, 30, 1, 30)),
        # the repeated hour in autumn (26 October 2025, 03:00→02:00): first occurrence
        ("2510260230;2510260240", _utc(2025, 10, 26, 0, 30), _utc(2025, 10, 26, 0, 40)),
        # ...unless that would deliver before the send: then its second occurrence
        ("2510260250;2510260210", _utc(2025, 10, 26, 0, 50), _utc(2025, 10, 26, 1, 10)),
        # after the autumn switch: winter time again
        ("2510260300;2510260301", _utc(2025, 10, 26, 2, 0), _utc(2025, 10, 26, 2, 1)),
        # only the send time
        ("2501010000", _utc(2024, 12, 31, 23, 0), None),
        ("2501010000;", _utc(2024, 12, 31, 23, 0), None),
    ],
)
def test_prague_local_times_become_utc(date: str, sent: datetime, done: datetime | None) -> None:
    report = _one(parse_bulkgate([{"status": "1", "smsID": "a", "date": date}]))

    assert f"sent {sent:%Y-%m-%dT%H:%M}Z" in report.detail
    if done is None:
        assert "status at" not in report.detail
    else:
        assert f"status at {done:%Y-%m-%dT%H:%M}Z" in report.detail


_LOCAL = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59)).map(
    lambda d: d.replace(second=0, microsecond=0)
)


def _exists(local: datetime) -> bool:
    back = local.replace(tzinfo=PRAGUE).astimezone(UTC).astimezone(PRAGUE)
    return back.replace(tzinfo=None) == local


@given(_LOCAL)
def test_every_prague_time_reads_back_as_its_wall_clock(local: datetime) -> None:
    sent, _ = prague_pair(local, None)

    shown = sent.astimezone(PRAGUE).replace(tzinfo=None)
    assert sent.tzinfo == UTC
    assert shown == (local if _exists(local) else local + timedelta(hours=1))


@given(_LOCAL, _LOCAL)
def test_a_later_wall_clock_is_never_an_earlier_instant(first: datetime, second: datetime) -> None:
    sent_local, done_local = sorted((first, second))
    assume(_exists(sent_local) and _exists(done_local))
    sent, done = prague_pair(sent_local, done_local)

    assert done is not None and done >= sent


# --- never raise, always per element -------------------------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["1", "2", "3", "6", "8", "10", "13", "delivered", "1904111007;1904111011"])
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_KEYS = [
    "messageId",
    "deliverystatus",
    "timestamp",
    "cost",
    "status",
    "smsID",
    "price",
    "date",
    "from",
    "message",
    "text",
]
_REPORTS = st.dictionaries(st.sampled_from(_KEYS), _SCALARS | _JSON, max_size=len(_KEYS))
_PAYLOADS = _JSON | _REPORTS | st.lists(_REPORTS | _JSON, max_size=6)


def _check_per_element(data: Any, results: list[Any]) -> None:
    assert len(results) == (len(data) if isinstance(data, list) else 1)
    for index, result in enumerate(results):
        if isinstance(result, ParseError):
            assert result.index == index and result.error
        elif isinstance(result, Report):
            assert 0 < len(result.message_id) <= 64
            assert result.state in {*PROVIDER_STATES.values(), State.PROCESSING}
            assert result.source in SOURCES
        else:
            assert isinstance(result, Inbound) and 0 < len(result.sender) <= 32


@given(_PAYLOADS)
def test_smsbat_parser_never_raises(data: Any) -> None:
    results = parse_smsbat_webhook(data)

    _check_per_element(data, results)
    assert not any(isinstance(r, Inbound) for r in results)


@given(_PAYLOADS)
def test_bulkgate_parser_never_raises(data: Any) -> None:
    _check_per_element(data, parse_bulkgate(data))


def _nested(depth: int) -> dict[str, Any]:
    """A report whose `x` is `depth` lists deep, the innermost holding one number."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return {"status": "1", "smsID": "d", "x": value}


_MIXED_TEXT = st.lists(st.sampled_from(["\x00", "[", "{", "é", "1", "a", '"', "\\"])).map("".join)


@given(
    _PAYLOADS
    | st.lists(st.dictionaries(st.sampled_from(_KEYS) | _MIXED_TEXT, _MIXED_TEXT), max_size=4)
    | st.lists(st.builds(_nested, st.integers(28, 36)) | _REPORTS, max_size=4),
    st.booleans(),
)
@example([{"status": "1", "smsID": "a\x00"}], True)
@example([{"status": "1", "smsID": "a", "x\x00": 1}], False)
def test_judging_a_push_from_its_body_changes_no_result(data: Any, ascii_only: bool) -> None:
    """The bytes' shortcut (`_plain`) may only skip the per-report search where it finds
    nothing: every result, the NUL and depth refusals included, is the same either way."""
    body = json.dumps(data, ensure_ascii=ascii_only).encode()
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:  # NaN, infinities: not JSON, refused before parsing
        assume(False)

    assert parse_bulkgate(decoded, body=body) == parse_bulkgate(decoded)
    assert parse_smsbat_webhook(decoded, body=body) == parse_smsbat_webhook(decoded)


@pytest.mark.parametrize("depth", [30, 31, 32, 33])
def test_a_field_nested_past_the_limit_is_refused_with_the_body_given(depth: int) -> None:
    items = [_nested(depth), {"status": "1", "smsID": "ok"}]
    body = orjson.dumps(items)

    results = parse_bulkgate(orjson.loads(body), body=body)

    assert isinstance(results[1], Report)
    if depth >= 32:
        assert isinstance(results[0], ParseError) and "x: nested deeper than 32" in results[0].error
    else:
        assert isinstance(results[0], Report)


@given(st.dictionaries(st.sampled_from([*_KEYS, "x"]) | st.text(max_size=5), st.text(max_size=15)))
def test_bulkgate_query_parser_never_raises(params: dict[str, str]) -> None:
    _check_per_element(params, parse_bulkgate_query(params))


# --- the state machine, through statuses.apply --------------------------------------------------

_REPORTED = sorted({*PROVIDER_STATES.values(), *(state for state, _ in BULKGATE_STATES.values())})
_ANY_REPORT = st.builds(
    lambda state, source, cost: Report("m", state, source, {"cost": cost}, None),
    st.sampled_from(_REPORTED),
    st.sampled_from(SOURCES),
    st.none() | st.floats(0, 1),
)


@given(st.sampled_from(list(State)), st.lists(_ANY_REPORT, max_size=12))
def test_no_sequence_of_reports_moves_a_message_backwards(
    start: State, reports: list[Report]
) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    state: str = start
    finals = 0
    for report in reports:
        change = apply(state, report, now)
        if state in FINAL or rank(state) < rank(State.SUBMITTED):
            assert change == {}  # a final state never changes; unsent messages wait
            continue
        new = change.get("state", state)
        assert rank(new) >= rank(state)
        if new != state and new in FINAL:
            finals += 1
            assert change["final_source"] == report.source and change["next_poll_at"] is None
        state = new
    assert finals <= 1


@given(st.lists(_ANY_REPORT, min_size=1, max_size=8))
def test_repeating_every_report_changes_nothing(reports: list[Report]) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)

    def fold(sequence: list[Report]) -> str:
        state: str = State.SUBMITTED
        for report in sequence:
            state = apply(state, report, now).get("state", state)
        return state

    assert fold(reports) == fold([r for r in reports for _ in range(2)])


@pytest.mark.parametrize(("status", "reason"), [("3", "unknown or unreachable"), ("8", "expired")])
def test_a_bulkgate_failure_carries_its_status_as_the_reason(status: str, reason: str) -> None:
    report = _one(parse_bulkgate([{"status": status, "smsID": "f1"}]))

    assert isinstance(report, Report) and report.fields["error_code"] == f"BULKGATE_{status}"
    assert reason in report.fields["error_message"]
    delivered = _one(parse_bulkgate([{"status": "1", "smsID": "d1"}]))
    assert isinstance(delivered, Report) and "error_code" not in delivered.fields
