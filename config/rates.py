"""The rate card (`RATE_CARD`): prices per country prefix and channel, for estimates.

Written as the operator has it from the price list, in one line:

    RATE_CARD="380:sms=0.95,viber=0.45,flashcall=0.10;48:sms=0.20;*:sms=1.50"
    RATE_CARD_CURRENCY=UAH

`sms` is per SMS part; every other channel per message. The longest prefix of a number
wins; `*` matches every number no other prefix does.
"""

from __future__ import annotations

import math
import re

CHANNELS = ("sms", "viber", "telegram", "rcs", "flashcall")
_PREFIX = re.compile(r"\*|[1-9][0-9]{0,14}")

RateCard = dict[str, dict[str, float]]


def parse_rate_card(text: str, *, echo: bool = True) -> RateCard:
    """The card as {prefix: {channel: price}}; ValueError names the entry and the problem.

    `echo=False` (settings errors, which never repeat a value given) names the entry by its
    position and leaves its text out.
    """
    card: RateCard = {}
    for number, raw in enumerate(text.split(";"), start=1):
        entry = raw.strip()
        if not entry:
            continue
        label = repr(entry) if echo else f"number {number}"
        prefix, colon, prices = (part.strip() for part in entry.partition(":"))
        if not colon:
            raise ValueError(f"entry {label} must be PREFIX:channel=price,…")
        prefix = prefix.lstrip("+")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(
                f"entry {label}: the prefix must be a country code and optionally more "
                "digits (like 380 or 38067), or *" + (f", got {prefix!r}" if echo else "")
            )
        if prefix in card:
            raise ValueError(f"entry {label}: a prefix is given twice")
        rates: dict[str, float] = {}
        for pair in (p.strip() for p in prices.split(",")):
            channel, equals, price = (part.strip() for part in pair.partition("="))
            if channel not in CHANNELS:
                shown = f" {channel!r}" if echo else ""
                raise ValueError(
                    f"entry {label}: unknown channel{shown} (one of {', '.join(CHANNELS)})"
                )
            try:
                value = float(price) if equals else math.nan
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value >= 0):
                got = f", got {price!r}" if echo else ""
                raise ValueError(f"entry {label}: {channel} needs a price >= 0{got}")
            rates[channel] = value
        card[prefix] = rates
    if not card:
        raise ValueError("is empty; write PREFIX:channel=price,…;…")
    return card
