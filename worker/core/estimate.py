"""Estimates before a launch: SMS parts per message and a cost from the rate card.

Pure. SMS parts follow GSM 03.38: a text of the GSM 7-bit alphabet takes 160 characters in
one part and 153 per part when split (the user data header takes the rest); a character of
the extension table (`€ [ ] { } ^ ~ | \\` and form feed) counts twice. Any other character
makes the whole text UCS-2: 70 in one part, 67 per part when split, counted in UTF-16 code
units (an emoji is two). The channel the cascade delivers by is only known afterwards, so
the estimate prices every message at the channel it would end on if nothing else reached
the recipient: SMS for the standard route, Viber for tg-viber, the flash call for flashcall.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from config.rates import RateCard

GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = frozenset("^{}\\[~]|€\f")
GSM_ALPHABET = GSM_BASIC | GSM_EXTENSION
SINGLE = {"GSM-7": 160, "UCS-2": 70}
SPLIT = {"GSM-7": 153, "UCS-2": 67}


def sms_parts(text: str | None) -> tuple[str, int, int]:
    """(encoding, length in that encoding's units, parts) of one SMS text."""
    if not text:
        return "GSM-7", 0, 1
    if GSM_ALPHABET.issuperset(text):  # set operations over the characters: no loop of ours
        doubled = 0 if GSM_EXTENSION.isdisjoint(text) else sum(map(text.count, GSM_EXTENSION))
        encoding, length = "GSM-7", len(text) + doubled
    else:
        encoding, length = "UCS-2", len(text.encode("utf-16-le")) // 2
    if length <= SINGLE[encoding]:
        return encoding, length, 1
    return encoding, length, -(-length // SPLIT[encoding])


def channel_for(message_type: str, route: str) -> str:
    if message_type == "flashcall":
        return "flashcall"
    return "viber" if route == "tg-viber" else "sms"


def rate_for(card: RateCard, phone: str, channel: str) -> float | None:
    """The price of the longest prefix of `phone` that has one for `channel` (`*` last)."""
    digits = phone.lstrip("+")
    for end in range(min(len(digits), 15), 0, -1):
        rates = card.get(digits[:end])
        if rates and channel in rates:
            return rates[channel]
    fallback = card.get("*")
    return fallback.get(channel) if fallback else None


def message_cost(message: Any, card: RateCard) -> float | None:
    """The rate card's price of one validated message (an OutgoingMessage): per SMS part on
    SMS, per message on other channels; None where the card has no rate for it."""
    channel = channel_for(message.message_type, message.route)
    rate = rate_for(card, message.to_phone, channel)
    if rate is None:
        return None
    parts = sms_parts(message.text)[2] if channel == "sms" else 1
    return rate * parts


@dataclass
class Estimate:
    """Running totals over the accepted messages of a launch."""

    messages: int = 0
    parts: int = 0
    encodings: Counter[str] = field(default_factory=Counter)
    parts_histogram: Counter[int] = field(default_factory=Counter)
    cost: float = 0.0
    priced: int = 0
    unpriced: Counter[str] = field(default_factory=Counter)  # "380/sms" without a rate

    def add(self, message: Any, card: RateCard | None) -> None:
        """Count one validated message (an OutgoingMessage)."""
        self.messages += 1
        if message.message_type != "flashcall":
            encoding, _, parts = sms_parts(message.text)
            self.encodings[encoding] += 1
            self.parts += parts
            self.parts_histogram[parts] += 1
        if card is None:
            return
        cost = message_cost(message, card)
        if cost is None:
            channel = channel_for(message.message_type, message.route)
            self.unpriced[f"{message.to_phone[:4]}…/{channel}"] += 1
            return
        self.priced += 1
        self.cost += cost

    def as_dict(self, currency: str | None) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "sms_parts": self.parts,
            "encodings": dict(sorted(self.encodings.items())),
            "parts_per_message": {str(k): v for k, v in sorted(self.parts_histogram.items())},
            "cost": round(self.cost, 4) if self.priced else None,
            "currency": currency,
            "priced_messages": self.priced,
            "without_rate": dict(self.unpriced.most_common(10)),
        }
