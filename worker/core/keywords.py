"""Consent keywords and the suppression list's settings: pure parsing (worker/flows/consent.py
stores and applies them; config/settings.py checks them at start-up).

Matching is what carriers do: the reply, with case, accents, spaces and punctuation taken
away, must *be* a keyword ("Stop!" and "s t o p" opt out, "stop by the shop tomorrow?"
does not). `OPTOUT_KEYWORDS` / `OPTIN_KEYWORDS` replace the defaults below.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from worker.core.validation import MESSAGE_TYPES, _phone_problem, with_region

# Defaults per language of the markets served. English (the CTIA list), Ukrainian, Russian,
# Polish, Czech and Slovak, Romanian, German. Written as people type them; matching folds
# case and accents ("odhlasit" matches ODHLÁSIT) and drops spaces ("OPT OUT").
DEFAULT_OPTOUT: tuple[str, ...] = (
    # English
    "STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPT OUT",
    # Ukrainian
    "СТОП", "ВІДПИСАТИСЯ", "ВІДПИСАТИСЬ", "ВІДПИСКА", "ВІДПИШІТЬ",
    # Russian
    "ОТПИСАТЬСЯ", "ОТПИСКА", "ОТПИШИТЕ",
    # Polish
    "WYPISZ", "REZYGNUJĘ", "REZYGNACJA",
    # Czech, Slovak
    "ODHLÁSIT", "ODHLÁSIŤ",
    # Romanian
    "DEZABONARE", "DEZABONEAZĂ",
    # German
    "ABMELDEN",
)  # fmt: skip
DEFAULT_OPTIN: tuple[str, ...] = (
    "START", "UNSTOP", "SUBSCRIBE",  # English
    "СТАРТ", "ПІДПИСАТИСЯ", "ПІДПИСАТИСЬ",  # Ukrainian
    "ПОДПИСАТЬСЯ",  # Russian
    "ZAPISZ",  # Polish
    "PŘIHLÁSIT", "PRIHLÁSIŤ",  # Czech, Slovak
    "ABONARE",  # Romanian
    "ANMELDEN",  # German
)  # fmt: skip
DEFAULT_SUPPRESSED_TYPES: tuple[str, ...] = ("promo", "viber_survey")

Kind = Literal["optout", "optin"]


def fold(text: str) -> str:
    """What a reply is compared as: letters and digits only, accents dropped, case folded."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = (c for c in decomposed if not unicodedata.category(c).startswith("M"))
    return "".join(c for c in "".join(kept).casefold() if c.isalnum())


@dataclass(frozen=True)
class Keywords:
    optout: frozenset[str]
    optin: frozenset[str]

    def classify(self, text: str | None) -> Kind | None:
        """`optout`, `optin` or None: the whole reply, folded, must be one keyword."""
        if not text:
            return None
        folded = fold(text)
        if folded in self.optout:
            return "optout"
        if folded in self.optin:
            return "optin"
        return None


def parse_keywords(value: str | None, default: Sequence[str], setting: str) -> frozenset[str]:
    """A comma-separated list (unset: the defaults), folded; an entry with no letter or digit
    is refused naming the setting and the entry."""
    if value is None:
        return frozenset(fold(k) for k in default)
    folded: set[str] = set()
    for number, entry in enumerate(value.split(","), 1):
        key = fold(entry)
        if not key:
            raise ValueError(
                f"{setting}: entry {number} ({entry.strip()!r}) has no letter or digit; "
                "give keywords separated by commas, like STOP,UNSUBSCRIBE"
            )
        folded.add(key)
    return frozenset(folded)


def keywords_from(optout: str | None, optin: str | None) -> Keywords:
    """Both lists checked: a keyword in both would make a reply mean two things."""
    out = parse_keywords(optout, DEFAULT_OPTOUT, "OPTOUT_KEYWORDS")
    back = parse_keywords(optin, DEFAULT_OPTIN, "OPTIN_KEYWORDS")
    both = sorted(out & back)
    if both:
        raise ValueError(
            f"OPTOUT_KEYWORDS and OPTIN_KEYWORDS both hold {', '.join(both)}: "
            "a reply must mean one thing"
        )
    return Keywords(out, back)


def parse_types(value: str, setting: str = "SUPPRESS_MESSAGE_TYPES") -> frozenset[str]:
    chosen = {t.strip() for t in value.split(",") if t.strip()}
    unknown = sorted(chosen - set(MESSAGE_TYPES))
    if unknown:  # named only when it could be a mistyped type: else it may be a secret
        named = [repr(t) for t in unknown if re.fullmatch(r"[a-z_]{1,40}", t)]
        raise ValueError(
            f"{setting}: unknown message type {', '.join(named) or '(not shown)'} "
            f"(known: {', '.join(MESSAGE_TYPES)})"
        )
    return frozenset(chosen)


def phone_problem(value: object, region: str | None = None) -> tuple[str | None, str | None]:
    """(the number in E.164, None) or (None, why not): what the door accepts as `toPhone`."""
    read = with_region(value.strip() if isinstance(value, str) else value, region)
    problem = _phone_problem(read, None)
    if problem is not None:
        return None, problem
    assert isinstance(read, str)
    return read, None
