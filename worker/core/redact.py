"""Log-safety helpers: what may be written to logs and reports about phones and URLs."""

from __future__ import annotations

import re

_PHONE_HEAD, _PHONE_TAIL = 3, 2
_MIN_PARTLY_SHOWN = 8  # below this many digits, head and tail together would say too much

# Userinfo password: from the ':' after the user name to the LAST '@'. Libraries disagree on
# unencoded '/' or '@' in a password (SQLAlchemy accepts '/', urllib splits at the last '@'),
# so the widest reading is masked: a leak is worse than an over-masked log line.
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*:)(?P<password>.*)(?P<tail>@[^@]*)",
    re.DOTALL,
)


def mask_phone(phone: str) -> str:
    """Mask a phone for logs; the country prefix and last two digits still tell messages apart.

    Only digits are kept (anything else in odd input is dropped), and a short number is
    masked whole, so the result never gives the complete number away.
    """
    plus = "+" if phone.lstrip().startswith("+") else ""
    digits = "".join(char for char in phone if char.isdigit())
    if len(digits) < _MIN_PARTLY_SHOWN:
        return plus + "*" * len(digits)
    hidden = len(digits) - _PHONE_HEAD - _PHONE_TAIL
    return f"{plus}{digits[:_PHONE_HEAD]}{'*' * hidden}{digits[-_PHONE_TAIL:]}"


def mask_url(url: str) -> str:
    """Replace the password of a URL's userinfo with '***', so settings can be logged."""
    match = _URL_PASSWORD.fullmatch(url)
    return url if match is None else f"{match['head']}***{match['tail']}"
