"""The quick yes of worker/core/phones.py never says yes where phonenumbers would say no."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worker.core.phones import _country, surely_valid

pytestmark = pytest.mark.unit

CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def phonenumbers_accepts(value: str) -> bool:
    """What worker/core/validation.py asks of phonenumbers: valid, and canonical as given."""
    try:
        number = phonenumbers.parse(value)
    except phonenumbers.NumberParseException:
        return False
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return phonenumbers.is_valid_number(number) and e164 == value


def example_numbers() -> list[str]:
    """Every region's example number of every type phonenumbers knows."""
    found = set()
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in range(11):
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None:
                found.add(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    return sorted(found)


def test_every_example_number_gets_the_same_answer_and_most_get_it_quickly() -> None:
    numbers = example_numbers()
    quick = [n for n in numbers if surely_valid(n)]
    assert all(phonenumbers_accepts(n) for n in quick)
    assert len(quick) >= 0.75 * len(numbers), (len(quick), len(numbers))


@settings(max_examples=3000, deadline=None)
@given(code=st.sampled_from(CODES), rest=st.text("0123456789", min_size=1, max_size=14))
@example(code=380, rest="671234567")
@example(code=380, rest="0671234567")  # a trunk 0: phonenumbers rewrites it
@example(code=39, rest="0612345678")  # Italy keeps its leading 0
@example(code=1, rest="2015550123")  # +1 is shared by many regions
def test_a_quick_yes_is_always_phonenumbers_yes(code: int, rest: str) -> None:
    value = f"+{code}{rest}"[:16]
    if surely_valid(value):
        assert phonenumbers_accepts(value), value


@settings(max_examples=1000, deadline=None)
@given(region=st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS)), data=st.data())
def test_near_misses_of_real_numbers_get_the_same_answer(region: str, data: st.DataObject) -> None:
    """A valid number with one digit changed, one added or one dropped: where the patterns
    differ in detail, these are the numbers that would show it."""
    example_number = phonenumbers.example_number(region)
    if example_number is None:
        return
    value = phonenumbers.format_number(example_number, phonenumbers.PhoneNumberFormat.E164)
    at = data.draw(st.integers(2, len(value) - 1))
    digit = data.draw(st.sampled_from("0123456789"))
    edit = data.draw(st.sampled_from(["change", "add", "drop"]))
    if edit == "change":
        value = value[:at] + digit + value[at + 1 :]
    elif edit == "add":
        value = value[:at] + digit + value[at:]
    else:
        value = value[:at] + value[at + 1 :]
    if surely_valid(value):
        assert phonenumbers_accepts(value), value


def test_the_ukrainian_mobile_numbers_of_a_campaign_are_decided_quickly() -> None:
    assert surely_valid("+380671234567")
    assert not surely_valid("+3806712345678")  # too long: phonenumbers says why
    assert not surely_valid("+1201555012")  # +1: several regions, phonenumbers decides


def plan_says(value: str) -> bool:
    """The plan read the long way: the general description and then each type in turn, as
    `_by_length` folds them into one regex per length."""
    found = _country(value[1:4])
    if found is None or found[1] is None:
        return False
    size, plan = found
    national = value[1 + size :]
    if not 2 <= len(national) <= 17 or national[0] == "0":
        return False
    if plan.national_prefix is not None and plan.national_prefix.match(national):
        return False
    return plan.general.matches(national) and any(t.matches(national) for t in plan.types)


@settings(max_examples=3000, deadline=None)
@given(code=st.sampled_from(CODES), rest=st.text("0123456789", min_size=1, max_size=14))
def test_the_folded_patterns_answer_as_the_plan_read_type_by_type(code: int, rest: str) -> None:
    value = f"+{code}{rest}"[:16]
    assert surely_valid(value) == plan_says(value), value


def test_every_example_number_is_answered_as_the_plan_reads_it() -> None:
    for value in example_numbers():
        assert surely_valid(value) == plan_says(value), value
