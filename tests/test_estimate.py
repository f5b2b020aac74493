"""Estimates before a launch: SMS parts (GSM 03.38) and a cost from the rate card."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config import Settings
from config.rates import parse_rate_card
from worker.core.estimate import rate_for, sms_parts
from worker.flows.launch import Defaults, launch


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a" * 160, ("GSM-7", 160, 1)),
        ("a" * 161, ("GSM-7", 161, 2)),
        ("a" * 306, ("GSM-7", 306, 2)),  # 2 × 153
        ("a" * 307, ("GSM-7", 307, 3)),
        ("€" * 80, ("GSM-7", 160, 1)),  # the extension table counts twice
        ("a" * 159 + "[", ("GSM-7", 161, 2)),
        ("ä@£ñ" * 40, ("GSM-7", 160, 1)),  # the basic table's accents are one each
        ("ї" * 70, ("UCS-2", 70, 1)),
        ("ї" * 71, ("UCS-2", 71, 2)),
        ("ї" * 134, ("UCS-2", 134, 2)),  # 2 × 67
        ("ї" * 135, ("UCS-2", 135, 3)),
        ("a" * 68 + "😀", ("UCS-2", 70, 1)),  # an emoji is two UTF-16 units
        ("a" * 69 + "😀", ("UCS-2", 71, 2)),
        (None, ("GSM-7", 0, 1)),
    ],
)
def test_sms_parts_follow_gsm_03_38(text: str | None, expected: tuple[str, int, int]) -> None:
    assert sms_parts(text) == expected


@pytest.mark.unit
def test_the_longest_prefix_with_the_channel_wins_then_the_catch_all() -> None:
    card = parse_rate_card("380:sms=0.95,viber=0.45; 38067:sms=0.8; *:sms=1.5; +48:sms=0.2")
    assert card["48"] == {"sms": 0.2}
    assert rate_for(card, "+380671234567", "sms") == 0.8
    assert rate_for(card, "+380671234567", "viber") == 0.45  # 38067 has no viber rate
    assert rate_for(card, "+380501234567", "sms") == 0.95
    assert rate_for(card, "+14155552671", "sms") == 1.5
    assert rate_for(card, "+14155552671", "flashcall") is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("card", "problem"),
    [
        ("38x:sms=1", "the prefix must be a country code"),
        ("038:sms=1", "the prefix must be a country code"),
        ("380:fax=1", "unknown channel 'fax'"),
        ("380:sms=-1", "sms needs a price >= 0, got '-1'"),
        ("380:sms=nan", "sms needs a price >= 0"),
        ("380 sms=1", "must be PREFIX:channel=price"),
        ("380:sms=1;380:viber=1", "a prefix is given twice"),
        (" ; ", "is empty"),
    ],
)
def test_a_bad_rate_card_is_refused_naming_the_entry(card: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        parse_rate_card(card)
    with pytest.raises(ValueError, match="RATE_CARD"):
        Settings(RATE_CARD=card, RATE_CARD_CURRENCY="UAH")  # type: ignore[call-arg]


@pytest.mark.unit
def test_a_rate_card_needs_its_currency() -> None:
    with pytest.raises(ValueError, match="RATE_CARD needs RATE_CARD_CURRENCY"):
        Settings(RATE_CARD="380:sms=1")  # type: ignore[call-arg]


def test_a_dry_run_estimates_parts_and_cost(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
        RATE_CARD="380:sms=0.95,viber=0.45,flashcall=0.1",
        RATE_CARD_CURRENCY="UAH",
    )
    path = tmp_path / "c.csv"
    path.write_text(
        "toPhone,text,route,messageType\n"
        "+380671234567,short,,\n"  # 1 part: 0.95
        f"+380671234568,{'ї' * 71},,\n"  # 2 parts: 1.90
        "+380671234569,hi,tg-viber,\n"  # viber: 0.45
        "+380671234560,,,flashcall\n"  # flash call: 0.10
        "+14155552671,hi,,\n"  # no rate
        "bad,hi,,\n"
    )

    defaults = Defaults(from_name="Shop", message_type="promo")

    stats = launch(path, "est", defaults, settings, dry_run=True)

    assert (stats.accepted, stats.rejected) == (5, 1)
    assert stats.estimate.as_dict("UAH") == {
        "messages": 5,
        "sms_parts": 5,
        "encodings": {"GSM-7": 3, "UCS-2": 1},
        "parts_per_message": {"1": 3, "2": 1},
        "cost": 3.4,
        "currency": "UAH",
        "priced_messages": 4,
        "without_rate": {"+141…/sms": 1},
    }


def _parts_char_by_char(text: str) -> tuple[str, int, int]:
    """sms_parts as GSM 03.38 reads, one character at a time (what set operations replace)."""
    from worker.core.estimate import GSM_BASIC, GSM_EXTENSION, SINGLE, SPLIT

    if not text:
        return "GSM-7", 0, 1
    if all(c in GSM_BASIC or c in GSM_EXTENSION for c in text):
        encoding, length = "GSM-7", sum(2 if c in GSM_EXTENSION else 1 for c in text)
    else:
        encoding, length = "UCS-2", len(text.encode("utf-16-le")) // 2
    if length <= SINGLE[encoding]:
        return encoding, length, 1
    return encoding, length, -(-length // SPLIT[encoding])


@pytest.mark.unit
@given(st.text(st.sampled_from("aZ09 @€[]{}^~|\\\f\nñΔé😀ї"), max_size=400) | st.text(max_size=200))
def test_sms_parts_counts_as_character_by_character(text: str) -> None:
    assert sms_parts(text) == _parts_char_by_char(text)
