"""The pure decisions of consent and quiet hours: keyword matching and send windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config import Settings
from worker.core.keywords import DEFAULT_OPTIN, DEFAULT_OPTOUT, fold, keywords_from, phone_problem
from worker.core.quiet import (
    Window,
    Windows,
    next_window_open,
    parse_by_type,
    parse_window,
    zones_for,
)

pytestmark = pytest.mark.unit

KEYWORDS = keywords_from(None, None)
DETERMINISTIC = hypothesis_settings(derandomize=True, max_examples=300, deadline=None)


# --- keywords ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    ["STOP", "stop", "Stop!", " stop. ", "S T O P", "STOP 🛑", "Opt-out", "opt out",
     "Unsubscribe.", "СТОП", "стоп!", "Відписатися", "ВІДПИСАТИСЯ", "відписатися!!",
     "Отписаться", "odhlásit", "ODHLASIT", "Wypisz", "rezygnuje", "Dezabonare"],
)  # fmt: skip
def test_a_reply_that_is_an_optout_keyword_opts_out(reply: str) -> None:
    assert KEYWORDS.classify(reply) == "optout"


@pytest.mark.parametrize(
    "reply",
    ["stop by the shop tomorrow?", "Please stop", "STOP2", "OK, thanks", "Дякую!",
     "Díky, dorazilo", "Who is this?", "", None, "   ", "!!!", "stopp", "не стоп"],
)  # fmt: skip
def test_a_reply_that_only_contains_a_keyword_does_nothing(reply: str | None) -> None:
    assert KEYWORDS.classify(reply) is None


@pytest.mark.parametrize("reply", ["START", "start!", "Unstop", "Старт", "Підписатися"])
def test_a_start_reply_opts_back_in(reply: str) -> None:
    assert KEYWORDS.classify(reply) == "optin"


def test_fold_drops_case_accents_spaces_and_punctuation() -> None:
    assert fold(" Odhlásiť, prosím! ") == "odhlasitprosim"
    assert fold("ВІДПИСАТИСЯ") == fold("відписатися")
    assert fold("REZYGNUJĘ") == "rezygnuje"


def test_the_defaults_do_not_overlap_and_every_entry_folds_to_something() -> None:
    out = {fold(k) for k in DEFAULT_OPTOUT}
    back = {fold(k) for k in DEFAULT_OPTIN}
    assert not out & back and "" not in out | back


def test_configured_lists_replace_the_defaults() -> None:
    mine = keywords_from("NOMORE, Basta!", "ANCORA")
    assert mine.classify("basta") == "optout" and mine.classify("STOP") is None
    assert mine.classify("Ancora.") == "optin"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OPTOUT_KEYWORDS": "STOP,,"}, "OPTOUT_KEYWORDS: entry 2"),
        ({"OPTIN_KEYWORDS": "START,?"}, "OPTIN_KEYWORDS: entry 2"),
        ({"OPTIN_KEYWORDS": "Stop"}, "OPTOUT_KEYWORDS and OPTIN_KEYWORDS both hold stop"),
        (
            {"SUPPRESS_MESSAGE_TYPES": "promo,sms"},
            "SUPPRESS_MESSAGE_TYPES: unknown message type 'sms'",
        ),
        ({"SEND_WINDOW": "9-20"}, "SEND_WINDOW: '9-20' is not a window"),
        ({"SEND_WINDOW": "20:00-20:00"}, "SEND_WINDOW: '20:00-20:00' is empty"),
        ({"SEND_WINDOW": "09:00-25:00"}, "SEND_WINDOW: '09:00-25:00' has a time"),
        ({"SEND_WINDOW_BY_TYPE": "promo=10:00"}, "SEND_WINDOW_BY_TYPE (promo): '10:00'"),
        ({"SEND_WINDOW_BY_TYPE": "sms=10:00-11:00"}, "SEND_WINDOW_BY_TYPE: 'sms' is not TYPE="),
        ({"SEND_WINDOW_FALLBACK_TIMEZONE": "Mars/Base"}, "SEND_WINDOW_FALLBACK_TIMEZONE"),
    ],
)
def test_bad_lists_and_windows_stop_start_up_naming_the_setting(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        Settings(**env)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given_", "region", "stored"),
    [("+380671234567", None, "+380671234567"), ("067 123 4567", "UA", "+380671234567")],
)
def test_numbers_are_stored_in_e164(given_: str, region: str | None, stored: str) -> None:
    assert phone_problem(given_, region) == (stored, None)


@pytest.mark.parametrize(
    "bad", ["0671234567", "380671234567", "+1555", "hello", "", "+15551234567"]
)
def test_anything_but_a_valid_e164_number_is_refused_with_a_reason(bad: str) -> None:
    phone, reason = phone_problem(bad)
    assert phone is None and reason


# --- windows ----------------------------------------------------------------------------------

KYIV = "+380671234567"
NEW_YORK = "+12125551234"
RUSSIA = "+79161234567"  # mobile: every zone from Europe/Bucharest (sic) to Asia/Anadyr
AUSTRALIA = "+61412345678"
PHONES = [KYIV, NEW_YORK, RUSSIA, AUSTRALIA, "+420777123456", "+919812345678", "+9779841234567"]
NINE_TO_EIGHT = Window(9 * 60, 20 * 60)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_inside_the_window_a_message_goes_now() -> None:
    now = _at("2026-06-10T12:00:00+03:00")
    assert next_window_open(KYIV, now, NINE_TO_EIGHT) == now


def test_at_night_it_waits_for_nine_local_time() -> None:
    now = _at("2026-06-10T23:30:00+03:00")  # Kyiv, summer time
    assert next_window_open(KYIV, now, NINE_TO_EIGHT) == _at("2026-06-11T09:00:00+03:00")
    early = _at("2026-01-10T03:00:00+02:00")  # winter time
    assert next_window_open(KYIV, early, NINE_TO_EIGHT) == _at("2026-01-10T09:00:00+02:00")


def test_the_end_is_excluded_and_the_start_included() -> None:
    assert next_window_open(KYIV, _at("2026-06-10T09:00:00+03:00"), NINE_TO_EIGHT) == _at(
        "2026-06-10T09:00:00+03:00"
    )
    assert next_window_open(KYIV, _at("2026-06-10T20:00:00+03:00"), NINE_TO_EIGHT) == _at(
        "2026-06-11T09:00:00+03:00"
    )


def test_it_is_the_recipients_time_not_ours() -> None:
    now = _at("2026-06-10T15:00:00+03:00")  # afternoon in Kyiv, 08:00 in New York
    assert next_window_open(KYIV, now, NINE_TO_EIGHT) == now
    assert next_window_open(NEW_YORK, now, NINE_TO_EIGHT) == _at("2026-06-10T09:00:00-04:00")


def test_a_number_spanning_zones_goes_when_it_is_day_in_every_one() -> None:
    zones = zones_for(RUSSIA)
    assert len(zones) > 10
    now = _at("2026-01-15T12:00:00+03:00")  # noon in Moscow, 21:00 in Anadyr
    opened = next_window_open(RUSSIA, now, NINE_TO_EIGHT)
    assert opened > now
    for zone in zones:
        assert 9 <= opened.astimezone(zone).hour < 20, zone
    # Anadyr (UTC+12) opens at 09:00; Bucharest (UTC+2) then is 23:00: the last to open
    # is Bucharest, 09:00 local = 19:00 in Anadyr, inside its window still.
    assert opened == _at("2026-01-16T09:00:00+02:00")


def test_daylight_saving_changes_move_the_opening_with_the_clock() -> None:
    # Kyiv springs forward on 2026-03-29 at 03:00: 09:00 is then 06:00 UTC, not 07:00.
    before = _at("2026-03-29T02:00:00+02:00")
    assert next_window_open(KYIV, before, NINE_TO_EIGHT) == datetime(2026, 3, 29, 6, tzinfo=UTC)


def test_a_window_over_midnight_and_a_number_of_unknown_zone() -> None:
    night = Window(22 * 60, 6 * 60)
    noon = _at("2026-06-10T12:00:00+03:00")
    assert next_window_open(KYIV, noon, night) == _at("2026-06-10T22:00:00+03:00")
    assert zones_for("+80012345678", "Europe/Kyiv") == (ZoneInfo("Europe/Kyiv"),)


def test_no_window_means_now() -> None:
    now = _at("2026-06-10T03:00:00+03:00")
    assert next_window_open(KYIV, now, None) == now


def test_windows_by_campaign_over_type_over_the_default() -> None:
    windows = Windows(
        NINE_TO_EIGHT, parse_by_type("viber_survey=10:00-18:00;transaction=12:00-13:00")
    )
    assert windows.for_message("promo") == NINE_TO_EIGHT
    assert windows.for_message("viber_survey") == Window(600, 1080)
    assert windows.for_message("transaction") == Window(720, 780)
    assert windows.for_message("flashcall") is None
    assert windows.for_message("promo", "11:00-12:00") == Window(660, 720)
    assert windows.for_message("promo", "off") is None
    assert windows.for_message("flashcall", "11:00-12:00") is None  # no window applies
    assert Windows().for_message("promo") is None
    assert parse_window("off") is None and parse_window("22:00-24:00") == Window(1320, 1440)


@st.composite
def windows(draw: st.DrawFn) -> Window:
    start = draw(st.integers(0, 95)) * 15
    end = draw(st.integers(1, 96)) * 15
    if end % 1440 == start or (start == 0 and end == 1440):
        end = (start + 15 * draw(st.integers(1, 90))) % 1440 or 1440
    return parse_window(f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}")  # type: ignore[return-value]


moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 12, 31), timezones=st.just(UTC)
)


@DETERMINISTIC
@given(phone=st.sampled_from(PHONES), now=moments, window=windows())
def test_the_opening_is_the_first_quarter_hour_inside_the_window_everywhere(
    phone: str, now: datetime, window: Window
) -> None:
    """Oracle: step quarter hours (every zone's offset and every window edge here is one)."""
    zones = zones_for(phone)
    opened = next_window_open(phone, now, window)
    assert opened >= now

    def everywhere(at: datetime) -> bool:
        return all(window.contains(at.astimezone(zone)) for zone in zones)

    if not everywhere(opened):  # no instant is inside all zones: the first zone decides
        assert window.contains(opened.astimezone(zones[0]))
        return
    step = now.replace(minute=now.minute // 15 * 15, second=0, microsecond=0)
    if step < now:
        step += timedelta(minutes=15)
    if everywhere(now):
        assert opened == now
    while step < opened:
        assert not everywhere(step), (step, opened)
        step += timedelta(minutes=15)
    assert next_window_open(phone, opened, window) == opened  # idempotent
