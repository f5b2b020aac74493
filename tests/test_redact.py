"""Unit tests for worker.core.redact: log lines must never carry a whole phone or a password."""

from __future__ import annotations

import pytest

from worker.core.redact import mask_phone, mask_url

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("+380671234567", "+380*******67"),
        ("+14155552671", "+141******71"),
        ("+4930123456", "+493*****56"),
        ("380671234567", "380*******67"),
        ("+380 67 123 45 67", "+380*******67"),
        ("+12345678", "+123***78"),
    ],
)
def test_mask_phone(phone: str, expected: str) -> None:
    assert mask_phone(phone) == expected


@pytest.mark.parametrize("phone", ["+1234567", "12345", "+1", "7"])
def test_short_phone_is_masked_whole(phone: str) -> None:
    masked = mask_phone(phone)
    assert set(masked) <= {"+", "*"}
    assert masked.count("*") == sum(char.isdigit() for char in phone)


@pytest.mark.parametrize("phone", ["", "+", "unknown", "tel:"])
def test_phone_without_digits_shows_nothing(phone: str) -> None:
    assert mask_phone(phone).strip("+") == ""


@pytest.mark.parametrize(
    "phone",
    ["+380671234567", "+12345678", "+1234567", "0671234567", "+44 (0) 7911 123456", "12"],
)
def test_masked_phone_never_contains_the_whole_number(phone: str) -> None:
    digits = "".join(char for char in phone if char.isdigit())
    assert digits not in mask_phone(phone)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        (
            "postgresql+psycopg://app:s3cr3t@db.internal:5432/cascade?sslmode=require",
            "postgresql+psycopg://app:***@db.internal:5432/cascade?sslmode=require",
        ),
        ("amqp://guest:guest@localhost//", "amqp://guest:***@localhost//"),
        ("redis://u:@h", "redis://u:***@h"),
    ],
)
def test_mask_url_password(url: str, expected: str) -> None:
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # base64 password with an unencoded '/': SQLAlchemy still reads it as the password
        ("postgresql://u:ab/cd+ef==@h/db", "postgresql://u:***@h/db"),
        # unencoded '@': urllib splits at the last '@'
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("redis://:p?w#x@h:6379/0", "redis://:***@h:6379/0"),
    ],
)
def test_mask_url_hides_unencoded_passwords_whole(url: str, expected: str) -> None:
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "postgresql://u@h/db",
        "sqlite:///./cascade.db",
        "https://restapi.smsbat.com/api/CascadeMessage/send_message/async",
        "not a url",
        "",
    ],
)
def test_mask_url_without_password_is_unchanged(url: str) -> None:
    assert mask_url(url) == url
