"""Unit tests for worker.core.validation: the cascade API's message rules, accept and refuse."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import JSON_VALUES, NOW, PHONE, valid_messages
from worker.core.validation import (
    MESSAGE_TYPES,
    ROUTES,
    URGENT_TYPES,
    FieldError,
    OutgoingMessage,
    ValidationRules,
    _checked_message,
    _plain_message,
    validate_message,
)

pytestmark = pytest.mark.unit

ABSENT = object()


def message(**fields: Any) -> dict[str, Any]:
    """A valid transaction message; keyword arguments replace fields, ABSENT removes one."""
    raw: dict[str, Any] = {
        "id": "order-12345",
        "fromName": "YourStore",
        "toPhone": PHONE,
        "messageType": "transaction",
        "text": "Your order #12345 has been confirmed",
    }
    raw.update(fields)
    return {key: value for key, value in raw.items() if value is not ABSENT}


def survey(**fields: Any) -> dict[str, Any]:
    """A valid viber_survey message, changed the same way as message()."""
    defaults: dict[str, Any] = {
        "messageType": "viber_survey",
        "text": "How satisfied are you with our service?",
        "surveyOptions": ["Yes", "No"],
    }
    return message(**{**defaults, **fields})


def accepted(raw: object, **kwargs: Any) -> OutgoingMessage:
    result = validate_message(raw, now=NOW, **kwargs)
    assert isinstance(result, OutgoingMessage), result
    return result


def refused(raw: object, **kwargs: Any) -> dict[str, str]:
    """The problems of a refused message, by field."""
    result = validate_message(raw, now=NOW, **kwargs)
    assert isinstance(result, list), result
    assert result
    return {error.field: error.problem for error in result}


def problem(raw: object, field: str, **kwargs: Any) -> str:
    """The one problem a message has, which must be on `field`."""
    problems = refused(raw, **kwargs)
    assert list(problems) == [field], problems
    return problems[field]


# --- the whole message -------------------------------------------------------------------


def test_valid_transaction_is_normalised() -> None:
    result = accepted(message())
    assert result == OutgoingMessage(
        id="order-12345",
        from_name="YourStore",
        to_phone=PHONE,
        message_type="transaction",
        text="Your order #12345 has been confirmed",
        ttl=None,
        scheduled_sent=None,
        survey_options=None,
        route="standard",
    )


def test_to_provider_minimal_has_only_required_keys() -> None:
    assert accepted(message()).to_provider() == {
        "id": "order-12345",
        "fromName": "YourStore",
        "toPhone": PHONE,
        "messageType": "transaction",
        "text": "Your order #12345 has been confirmed",
    }


def test_to_provider_full_shape() -> None:
    raw = survey(ttl=604800, scheduledSent="2025-01-25T12:00:00+02:00", route="tg-viber")
    body = accepted(raw).to_provider()
    assert body == {
        "id": "order-12345",
        "fromName": "YourStore",
        "toPhone": PHONE,
        "messageType": "viber_survey",
        "text": "How satisfied are you with our service?",
        "ttl": 604800,
        "scheduledSent": "2025-01-25T10:00:00Z",
        "surveyOptions": ["Yes", "No"],
    }
    assert list(body) == [
        "id",
        "fromName",
        "toPhone",
        "messageType",
        "text",
        "ttl",
        "scheduledSent",
        "surveyOptions",
    ]
    assert json.loads(json.dumps(body)) == body


def test_flashcall_without_text_omits_text_key() -> None:
    result = accepted(message(messageType="flashcall", text=ABSENT, ttl=300))
    assert result.text is None
    assert result.to_provider() == {
        "id": "order-12345",
        "fromName": "YourStore",
        "toPhone": PHONE,
        "messageType": "flashcall",
        "ttl": 300,
    }


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_priority_puts_urgent_types_first(message_type: str) -> None:
    raw = survey() if message_type == "viber_survey" else message(messageType=message_type)
    expected = 0 if message_type in URGENT_TYPES else 1
    assert accepted(raw).priority == expected


def test_urgent_types_are_transaction_and_flashcall() -> None:
    assert frozenset({"transaction", "flashcall"}) == URGENT_TYPES
    assert ROUTES == ("standard", "tg-viber")


@pytest.mark.parametrize("raw", [None, [], "message", 42, [message()]])
def test_non_mapping_is_one_message_error(raw: object) -> None:
    result = validate_message(raw, now=NOW)
    assert isinstance(result, list)
    assert len(result) == 1
    assert result[0].field == "message"
    assert "must be an object" in result[0].problem


def test_unknown_key_is_named_with_a_hint() -> None:
    problems = refused(message(toPhone=ABSENT, to_phone=PHONE))
    assert problems["toPhone"] == "is required"
    assert "unknown field" in problems["to_phone"]
    assert "did you mean 'toPhone'?" in problems["to_phone"]
    assert "allowed: id, fromName, toPhone" in problems["to_phone"]


def test_unknown_key_without_a_near_match_has_no_hint() -> None:
    found = problem(message(priority=1), "priority")
    assert found.startswith("unknown field; allowed:")


def test_unknown_empty_key_is_quoted() -> None:
    assert "unknown field" in problem(message(**{"": 1}), "''")


def test_unknown_long_key_is_truncated() -> None:
    key = "x" * 500
    [(field, found)] = refused(message(**{key: 1})).items()
    assert len(field) < 100
    assert "unknown field" in found


def test_all_errors_are_collected() -> None:
    raw = message(
        id="bad id",
        fromName="",
        toPhone="380671234567",
        messageType="sms",
        ttl=0,
        scheduledSent="2025-01-25T10:00:00",
        route="fast",
        extra=True,
    )
    problems = refused(raw)
    assert set(problems) == {
        "extra",
        "id",
        "fromName",
        "toPhone",
        "messageType",
        "ttl",
        "scheduledSent",
        "route",
    }


def test_field_error_as_dict() -> None:
    error = FieldError("toPhone", "is required")
    assert error.as_dict() == {"field": "toPhone", "problem": "is required"}


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_message(message(), now=datetime(2025, 1, 20, 12, 0))


# --- id ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "x" * 254, "order-12345", "promo.summer_2025", "A-9"])
def test_id_accepted(value: str) -> None:
    assert accepted(message(id=value)).id == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("x" * 255, "at most 254 characters, got 255"),
        ("", "must not be empty"),
        ("order 12345", "only letters, digits"),
        ("order/12345", "only letters, digits"),
        ("order#1", "only letters, digits"),
        ("zamówienie-1", "only letters, digits"),
        ("order-1\n", "only letters, digits"),
        (12345, "must be a string, got integer"),
        (True, "must be a string, got boolean"),
        (None, "is required"),
        (ABSENT, "is required"),
    ],
)
def test_id_refused(value: object, fragment: str) -> None:
    assert fragment in problem(message(id=value), "id")


def test_long_bad_id_is_truncated_in_the_problem() -> None:
    found = problem(message(id="bad id " * 30), "id")
    assert "... (210 characters)" in found
    assert len(found) < 150


# --- fromName ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["YourBrand", "Ваш Магазин", "x" * 64])
def test_from_name_accepted(value: str) -> None:
    assert accepted(message(fromName=value)).from_name == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        ("   ", "only whitespace"),
        ("x" * 65, "at most 64 characters, got 65"),
        ("Your\nBrand", "control characters"),
        ("Your\tBrand", "control characters"),
        ("Brand\x85", "control characters"),
        (["YourBrand"], "must be a string, got array"),
        (None, "is required"),
    ],
)
def test_from_name_refused(value: object, fragment: str) -> None:
    assert fragment in problem(message(fromName=value), "fromName")


def test_control_characters_are_escaped_in_the_problem() -> None:
    found = problem(message(fromName="Your\nBrand"), "fromName")
    assert "\n" not in found
    assert "'Your\\nBrand'" in found


# --- toPhone -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [PHONE, "+14155552671", "+447911123456", "+390612345678"])
def test_phone_accepted(value: str) -> None:
    assert accepted(message(toPhone=value)).to_phone == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("380671234567", "missing leading '+'; use E.164 like +380671234567"),
        ("0671234567", "national number (leading '0')"),
        ("00380671234567", "'00' dialling prefix"),
        ("+380 67 123 45 67", "digits 0-9 only"),
        ("+380-67-123-45-67", "digits 0-9 only"),
        (" +380671234567", "digits 0-9 only"),
        ("+٣٨٠٦٧١٢٣٤٥٦٧", "digits 0-9 only"),
        ("+", "digits 0-9 only"),
        ("+0671234567", "never start with 0"),
        ("+3806712345678901", "has 16 digits; E.164 allows at most 15"),
        ("+3", "too short"),
        ("+380111111111", "not a valid phone number"),
        ("+999123456789", "not a valid phone number"),
        ("+4407911123456", "did you mean '+447911123456'?"),
        ("", "must not be empty"),
        (380671234567, "must be a string, got integer"),
        (None, "is required"),
    ],
)
def test_phone_refused(value: object, fragment: str) -> None:
    assert fragment in problem(message(toPhone=value), "toPhone")


def test_phone_problem_echoes_the_value() -> None:
    found = problem(message(toPhone="380671234567"), "toPhone")
    assert found.endswith("got '380671234567'")


# --- messageType -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("sms", "must be one of transaction, promo, viber_survey, flashcall, got 'sms'"),
        ("Transaction", "got 'Transaction'"),
        (1, "got integer"),
        (["promo"], "got array"),
        (None, "is required"),
    ],
)
def test_message_type_refused(value: object, fragment: str) -> None:
    assert fragment in problem(message(messageType=value), "messageType")


def test_unknown_type_does_not_add_text_or_survey_noise() -> None:
    assert list(refused(message(messageType="sms", text=ABSENT))) == ["messageType"]


# --- text ----------------------------------------------------------------------------------


@pytest.mark.parametrize("message_type", ["transaction", "promo"])
def test_text_required(message_type: str) -> None:
    found = problem(message(messageType=message_type, text=ABSENT), "text")
    assert found == f"is required for messageType '{message_type}'"


def test_survey_text_required() -> None:
    assert "is required" in problem(survey(text=None), "text")


def test_flashcall_may_carry_text() -> None:
    assert accepted(message(messageType="flashcall", text="1234")).text == "1234"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        (" \n", "only whitespace"),
        ("x" * 4097, "at most 4096 characters, got 4097"),
        (42, "must be a string, got integer"),
    ],
)
def test_text_refused(value: object, fragment: str) -> None:
    assert fragment in problem(message(text=value), "text")


def test_text_at_limit_accepted() -> None:
    assert accepted(message(text="x" * 4096)).text == "x" * 4096


def test_text_is_never_echoed() -> None:
    secret = "Your code is 918273. " * 200
    assert "918273" not in problem(message(text=secret), "text")


def test_survey_text_limit_85() -> None:
    assert accepted(survey(text="q" * 85)).text == "q" * 85
    found = problem(survey(text="q" * 86), "text")
    assert found == "must be at most 85 characters for viber_survey, got 86"


# --- surveyOptions -----------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 5])
def test_survey_option_counts_accepted(count: int) -> None:
    options = [f"Option {i}" for i in range(count)]
    assert accepted(survey(surveyOptions=options)).survey_options == tuple(options)


@pytest.mark.parametrize("count", [0, 1, 6])
def test_survey_option_counts_refused(count: int) -> None:
    options = [f"Option {i}" for i in range(count)]
    found = problem(survey(surveyOptions=options), "surveyOptions")
    assert found == f"must have 2 to 5 options, got {count}"


def test_survey_options_required_for_survey() -> None:
    found = problem(survey(surveyOptions=ABSENT), "surveyOptions")
    assert found == "is required for messageType 'viber_survey'"


@pytest.mark.parametrize("message_type", ["transaction", "promo", "flashcall"])
def test_survey_options_refused_on_other_types(message_type: str) -> None:
    raw = message(messageType=message_type, surveyOptions=["Yes", "No"])
    assert "only allowed for viber_survey" in problem(raw, "surveyOptions")


@pytest.mark.parametrize("value", ["Yes,No", {"a": "Yes"}, 2])
def test_survey_options_must_be_an_array(value: object) -> None:
    assert "must be an array of strings" in problem(survey(surveyOptions=value), "surveyOptions")


def test_each_bad_option_is_named_by_index() -> None:
    options = ["Yes", 2, " ", "x" * 101, "Yes"]
    problems = refused(survey(surveyOptions=options))
    assert problems == {
        "surveyOptions[1]": "must be a string, got integer",
        "surveyOptions[2]": "must not be empty or only whitespace",
        "surveyOptions[3]": "must be at most 100 characters, got 101",
        "surveyOptions[4]": "repeats surveyOptions[0]",
    }


def test_option_of_100_characters_accepted() -> None:
    accepted(survey(surveyOptions=["x" * 100, "No"]))


# --- ttl -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 300, 604800, 2_678_400])
def test_ttl_accepted(value: int) -> None:
    assert accepted(message(ttl=value)).ttl == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0, "must be a positive number of seconds, got 0"),
        (-5, "positive number of seconds, got -5"),
        (2_678_401, "at most 2678400 seconds (31 days), got 2678401"),
        pytest.param(10**5000, "(31 days), got a 16610-bit integer", id="huge"),
        (True, "must be an integer number of seconds, got boolean"),
        ("3600", "must be an integer number of seconds, got string"),
        (3600.0, "must be an integer number of seconds, got number"),
    ],
)
def test_ttl_refused(value: object, fragment: str) -> None:
    assert fragment in problem(message(ttl=value), "ttl")


# --- scheduledSent -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-01-25T10:00:00Z", datetime(2025, 1, 25, 10, 0, tzinfo=UTC)),
        ("2025-01-25T12:00:00+02:00", datetime(2025, 1, 25, 10, 0, tzinfo=UTC)),
        ("2025-01-25T05:00:00-05:00", datetime(2025, 1, 25, 10, 0, tzinfo=UTC)),
        ("2025-01-25T15:30:00+0530", datetime(2025, 1, 25, 10, 0, tzinfo=UTC)),
        ("2025-01-25T10:00Z", datetime(2025, 1, 25, 10, 0, tzinfo=UTC)),
        ("2025-01-25T10:00:00.987654Z", datetime(2025, 1, 25, 10, 0, tzinfo=UTC)),
        ("2025-01-21T00:30:00+01:00", datetime(2025, 1, 20, 23, 30, tzinfo=UTC)),
    ],
)
def test_schedule_normalised_to_utc(value: str, expected: datetime) -> None:
    result = accepted(message(scheduledSent=value))
    assert result.scheduled_sent == expected
    assert result.scheduled_sent.utcoffset() == timedelta(0)
    assert result.to_provider()["scheduledSent"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_schedule_output_uses_z() -> None:
    result = accepted(message(scheduledSent="2025-01-21T00:30:00+01:00"))
    assert result.to_provider()["scheduledSent"] == "2025-01-20T23:30:00Z"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("2025-01-25T10:00:00", "must include a time zone"),
        ("2025-01-25", "must be an ISO 8601 date-time"),
        ("25.01.2025 10:00", "must be an ISO 8601 date-time"),
        ("2025-01-25 10:00:00Z", "must be an ISO 8601 date-time"),
        ("tomorrow", "must be an ISO 8601 date-time"),
        ("2025-02-30T10:00:00Z", "is not a real date and time"),
        ("2025-01-25T25:00:00Z", "is not a real date and time"),
        ("9999-12-31T23:59:59-01:00", "is not a real date and time"),
        ("2025-01-20T11:58:59Z", "is in the past"),
        ("2024-12-25T10:00:00Z", "is in the past"),
        ("2025-02-19T12:00:01Z", "is more than 30 days ahead"),
        (1737799200, "must be an ISO 8601 string, got integer"),
    ],
)
def test_schedule_refused(value: object, fragment: str) -> None:
    assert fragment in problem(message(scheduledSent=value), "scheduledSent")


@pytest.mark.parametrize("value", ["2025-01-20T11:59:00Z", "2025-02-19T12:00:00Z"])
def test_schedule_window_edges_accepted(value: str) -> None:
    accepted(message(scheduledSent=value))


def test_schedule_window_follows_rules() -> None:
    rules = ValidationRules(max_schedule_ahead=timedelta(days=1), past_skew=timedelta(0))
    raw = message(scheduledSent="2025-01-21T12:00:01Z")
    assert "more than 1 day ahead" in problem(raw, "scheduledSent", rules=rules)
    assert "in the past" in problem(
        message(scheduledSent="2025-01-20T11:59:59Z"), "scheduledSent", rules=rules
    )


def test_now_in_another_zone_is_the_same_instant() -> None:
    kyiv_now = NOW.astimezone(timezone(timedelta(hours=2)))
    result = validate_message(message(scheduledSent="2025-01-20T12:30:00Z"), now=kyiv_now)
    assert isinstance(result, OutgoingMessage)


# --- route ---------------------------------------------------------------------------------


def test_route_defaults_from_rules() -> None:
    assert accepted(message()).route == "standard"
    assert accepted(message(route=None)).route == "standard"
    rules = ValidationRules(default_route="tg-viber")
    assert accepted(message(), rules=rules).route == "tg-viber"


def test_route_is_kept_and_never_sent() -> None:
    result = accepted(message(route="tg-viber"))
    assert result.route == "tg-viber"
    assert "route" not in result.to_provider()


@pytest.mark.parametrize(("value", "fragment"), [("fast", "got 'fast'"), (1, "got integer")])
def test_route_refused(value: object, fragment: str) -> None:
    found = problem(message(route=value), "route")
    assert found.startswith("must be one of standard, tg-viber")
    assert fragment in found


def test_rules_refuse_an_unknown_default_route() -> None:
    with pytest.raises(ValueError, match="default_route"):
        ValidationRules(default_route="fast")


# --- null means absent -------------------------------------------------------------------


def test_null_optional_fields_are_absent() -> None:
    raw = message(ttl=None, scheduledSent=None, surveyOptions=None, route=None)
    assert accepted(raw).to_provider() == accepted(message()).to_provider()
    flash = accepted(message(messageType="flashcall", text=None))
    assert "text" not in flash.to_provider()


# --- property: never raises ----------------------------------------------------------------

FIELDS = (
    "id",
    "fromName",
    "toPhone",
    "messageType",
    "text",
    "ttl",
    "scheduledSent",
    "surveyOptions",
    "route",
    "phoneRegion",
)
ANY_INPUT = (
    JSON_VALUES
    | valid_messages()
    | st.tuples(valid_messages(), st.sampled_from([*FIELDS, "to_phone"]), JSON_VALUES).map(
        lambda changed: {**changed[0], changed[1]: changed[2]}
    )
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), JSON_VALUES)
)


@settings(max_examples=500, deadline=None)
@given(ANY_INPUT)
def test_never_raises_and_always_answers(raw: object) -> None:
    result = validate_message(raw, now=NOW)
    if isinstance(result, OutgoingMessage):
        body = result.to_provider()
        assert json.loads(json.dumps(body)) == body
        again = validate_message({**body, "route": result.route}, now=NOW)
        assert again == result
    else:
        assert isinstance(result, list)
        assert result
        for error in result:
            assert isinstance(error, FieldError)
            assert error.field
            assert error.problem


# --- phone numbers as operators have them (a default region) ---------------------------------


@pytest.mark.parametrize(
    "written",
    ["067 123 4567", "0671234567", "(067) 123-45-67", "380671234567", "00380671234567", PHONE],
)
def test_a_default_region_reads_national_and_plus_less_numbers(written: str) -> None:
    rules = ValidationRules(default_region="UA")
    assert accepted(message(toPhone=written), rules=rules).to_phone == "+380671234567"
    assert accepted(message(toPhone=written, phoneRegion="ua")).to_phone == "+380671234567"


def test_without_a_region_only_e164_passes_and_the_error_says_how_to_fix_it() -> None:
    errors = validate_message(message(toPhone="067 123 4567"), now=NOW)
    assert isinstance(errors, list) and [e.field for e in errors] == ["toPhone"]
    assert "give its country (phoneRegion, --default-region)" in errors[0].problem


def test_a_region_never_turns_a_wrong_number_into_a_right_one() -> None:
    for written in ("067 123", "0000000000", "+380 67 123 4567 8", "3.80671E+11"):
        errors = validate_message(message(toPhone=written, phoneRegion="UA"), now=NOW)
        assert isinstance(errors, list) and errors[0].field == "toPhone", written
    excel = validate_message(message(toPhone="3.80671E+11", phoneRegion="UA"), now=NOW)
    assert isinstance(excel, list) and "scientific notation" in excel[0].problem
    # E.164 of another country stays as it is: the region only reads national numbers.
    other = accepted(message(toPhone="+447911123456", phoneRegion="UA"))
    assert other.to_phone == "+447911123456"


def test_a_region_that_does_not_exist_is_named() -> None:
    errors = validate_message(message(toPhone="0671234567", phoneRegion="XX"), now=NOW)
    assert isinstance(errors, list)
    assert errors[0] == FieldError(
        "phoneRegion", "must be a two-letter country code such as 'UA' or 'PL', got 'XX'"
    )
    with pytest.raises(ValueError, match="default_region must be a two-letter"):
        ValidationRules(default_region="Ukraine")


# --- the quick yes for plain messages ------------------------------------------------------

EDGE_TEXT = st.text(
    st.sampled_from(["a", " ", "\t", "\n", "\x00", "\x1f", "\x7f", "\x9f", "\xa0", "\ud800", "é"]),
    max_size=6,
)
EDGE_VALUES = (
    JSON_VALUES
    | EDGE_TEXT
    | st.sampled_from(["", " ", "a" * 64, "a" * 65, "a" * 254, "a" * 255, "x" * 4097, True, 0])
    | st.sampled_from([-1, 2_678_400, 2_678_401, "+380671234567", "+3806712345", "promo"])
    | st.sampled_from(["standard", "tg-viber", "flashcall", "viber_survey", "+0671234567"])
)
PLAIN_FIELDS = ("id", "fromName", "toPhone", "messageType", "text", "ttl", "route")


@st.composite
def plain_messages(draw: st.DrawFn) -> dict[str, Any]:
    """Plain messages, one or two fields replaced by an edge value or taken out."""
    raw = message(
        id=draw(st.from_regex(r"[A-Za-z0-9._-]{1,254}", fullmatch=True)),
        messageType=draw(st.sampled_from(["transaction", "promo"])),
        toPhone=draw(st.sampled_from([PHONE, "+14155552671", "+447911123456", "+380441234567"])),
    )
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from([*PLAIN_FIELDS, "scheduledSent", "phoneRegion"]))
        raw[field] = draw(EDGE_VALUES | st.just(ABSENT))
    return {key: value for key, value in raw.items() if value is not ABSENT}


@settings(max_examples=2000, deadline=None)
@given(plain_messages() | ANY_INPUT, st.sampled_from([None, "UA"]))
def test_the_quick_yes_for_plain_messages_is_the_full_checks_answer(
    raw: Any, region: str | None
) -> None:
    rules = ValidationRules(default_region=region)
    if not isinstance(raw, Mapping):
        return
    quick = _plain_message(raw, rules)
    if quick is not None:
        assert quick == _checked_message(raw, NOW, rules)


def test_the_quick_yes_answers_the_messages_campaigns_are_made_of() -> None:
    for raw in (message(), message(messageType="promo", ttl=3600, route="tg-viber")):
        assert _plain_message(raw, ValidationRules()) == _checked_message(
            raw, NOW, ValidationRules()
        )
