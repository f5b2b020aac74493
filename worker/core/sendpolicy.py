"""The send policy, as pure functions: what each row of a batch becomes after one answer.

The loop around it (`worker.flows.dispatcher`) only claims rows, posts them and writes what
these functions decide. Everything here takes the clock and the randomness it needs as
arguments, so tests call it directly and a model-checking test drives it through any
interleaving of provider answers.

One request per claim: a refused batch is not halved inside a worker but split into
parts that each carry an isolation key (`messages.isolation`) and are claimed on their
own. What the halving has learned lives with the rows, so a 429, a 5xx, a restart or a
lease running out costs only the request it hit.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, TypedDict

from config import Settings
from worker.core.answers import (
    BadRequest,
    OutcomeUnknown,
    ProviderError,
    Throttled,
    Unauthorized,
    Unavailable,
)
from worker.core.backoff import (
    CheckPlan,
    explores,
    learned_delay,
    poll_deadline,
    poll_interval,
    send_retry_delay,
)
from worker.core.states import State

# --- answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """Nothing was sent: sending was paused or the shared pacing failed before the request."""

    reason: str
    delay: float = 0.0


# trackinId → messageId of an accepted batch, a provider error, or nothing sent at all.
Answer = Mapping[str, str] | ProviderError | Held


def answer_label(answer: Answer) -> str:
    """The answer's class for logs and metrics: 200, 400, 401, 429, 5xx, unknown or held."""
    if isinstance(answer, Held):
        return "held"
    if isinstance(answer, BadRequest):
        return "400"
    if isinstance(answer, Unauthorized):
        return "401"
    if isinstance(answer, Throttled):
        return "429"
    if isinstance(answer, Unavailable):
        return "5xx"
    if isinstance(answer, ProviderError):
        return "unknown"
    return "200"


def provider_answered(answer: Answer) -> bool:
    """The provider read the request and answered it (accepted or refused): it is up."""
    return isinstance(answer, Mapping | BadRequest)


def provider_failed(answer: object) -> bool:
    """A fault of the provider's, not of the messages': it counts towards the circuit."""
    return isinstance(answer, Unavailable | OutcomeUnknown)


# --- pauses (sends and status checks alike) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Pause:
    """Stop every worker's requests of one kind: `throttle` (a 429) or `circuit` (the rest)."""

    kind: Literal["throttle", "circuit"]
    seconds: float
    reason: str


def pause_for(answer: object, *, failures: int, settings: Settings) -> Pause | None:
    """The pause an answer calls for; `failures` counts consecutive provider faults so far,
    this answer's included.

    A 429 pauses for its Retry-After; a 401 opens the circuit; so do `SEND_CIRCUIT_FAILURES`
    faults in a row (5xx, connection errors, timeouts), so that an outage of any length
    spends no message's retries: messages stay queued while one small probe tests it.
    """
    if isinstance(answer, Throttled):
        return Pause("throttle", answer.retry_after, "HTTP 429")
    if isinstance(answer, Unauthorized):
        return Pause(
            "circuit",
            settings.circuit_open_seconds,
            "HTTP 401: credentials refused; check SMSBAT_API_KEY",
        )
    if provider_failed(answer) and failures >= settings.send_circuit_failures:
        reason = f"provider unavailable ({failures} failures in a row)"
        return Pause("circuit", settings.circuit_open_seconds, reason)
    return None


# --- rows and outcomes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    """What the policy needs of a claimed row."""

    pk: int
    id: str
    to_phone: str
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Submitted:
    pk: int
    message_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    pk: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Back to the queue. `counts` says whether this was a failed attempt of its own."""

    pk: int
    reason: str
    counts: bool
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Unknown:
    """The request was written but its answer was lost: the provider may have it."""

    pk: int
    reason: str
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Isolate:
    """Refused with its batch: back to the queue in part `key`, claimed apart from others."""

    pk: int
    key: str
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class Expired:
    pk: int


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Would go back to the queue, but its campaign was cancelled meanwhile."""

    pk: int


Outcome = Submitted | Rejected | Retry | Unknown | Isolate | Expired | Cancelled


def retry_delay(batch: Sequence[Item], settings: Settings, rng: random.Random) -> float:
    """One backoff for the whole request, so the rows of a part come back together."""
    attempts = max((item.attempts for item in batch), default=0) + 1
    return send_retry_delay(
        attempts,
        base=settings.send_backoff_base_seconds,
        cap=settings.send_backoff_max_seconds,
        rng=rng,
    )


def outcomes(
    batch: Sequence[Item],
    answer: Answer,
    *,
    settings: Settings,
    rng: random.Random,
    new_key: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> list[Outcome]:
    """What each row of one request becomes after the provider's answer."""
    if isinstance(answer, Mapping):  # map by trackinId, never by position
        missing = "missing from the provider's answer"
        delay = retry_delay(batch, settings, rng)
        return [
            Submitted(item.pk, answer[item.id])
            if item.id in answer
            else Retry(item.pk, missing, True, delay)
            for item in batch
        ]
    if isinstance(answer, BadRequest):
        if len(batch) == 1:
            return [Rejected(batch[0].pk, answer.code, answer.message)]
        reason = f"refused with its batch ({answer.code})"
        isolated: list[Outcome] = []
        for part in split(batch, answer):
            key = new_key()
            isolated += [Isolate(item.pk, key, len(part), reason) for item in part]
        return isolated
    if isinstance(answer, Held):
        return [Retry(item.pk, answer.reason, False, answer.delay) for item in batch]
    if isinstance(answer, Throttled):
        return [Retry(item.pk, "HTTP 429", False, answer.retry_after) for item in batch]
    if isinstance(answer, Unauthorized):
        return [Retry(item.pk, "HTTP 401", False) for item in batch]
    delay = retry_delay(batch, settings, rng)
    if isinstance(answer, OutcomeUnknown):
        return [Unknown(item.pk, str(answer), delay) for item in batch]
    return [Retry(item.pk, str(answer), True, delay) for item in batch]


# --- isolating a refused batch -----------------------------------------------------------

_INDEX = re.compile(r"\[(\d{1,4})\]|\bindex\s*:?\s*(\d{1,4})\b", re.IGNORECASE)
# An id or a phone number as a whole word of the message: "m-1" is not named by "m-10".
_WORD = re.compile(r"[\w.~:+-]+")


def suspects(batch: Sequence[Item], error: BadRequest) -> list[Item]:
    """Rows the 400's message names: by index in the batch, by id, or by phone number.

    A hint only: the provider's wording is not a contract, so a suspect is tried alone
    before anything is concluded from it.
    """
    text = error.message
    named: dict[int, Item] = {}
    for match in _INDEX.finditer(text):
        index = int(match.group(1) or match.group(2))
        if index < len(batch):
            named[batch[index].pk] = batch[index]
    words = set(_WORD.findall(text))
    for item in batch:
        if item.id in words or item.to_phone in words:
            named[item.pk] = item
    return list(named.values()) if len(named) < len(batch) else []


def split(batch: Sequence[Item], error: BadRequest) -> list[list[Item]]:
    """The parts a refused batch is sent again in: each suspect alone, the rest in halves.

    The rest is halved whatever the hint said, so a wrong or missing hint still finds a
    refused row in ceil(log2 n) levels; a right one finds it in the first.
    """
    alone = suspects(batch, error)
    known = {item.pk for item in alone}
    rest = [item for item in batch if item.pk not in known]
    half = math.ceil(len(rest) / 2)
    parts = [[item] for item in alone] + [rest[:half], rest[half:]]
    return [part for part in parts if part]


def request_bound(queued: int, parts: int, refused: int, batch_max: int) -> int:
    """Most requests to finish `queued` unisolated rows, `parts` isolation parts and
    `refused` refused numbers among them, once the provider answers every request.

    Each batch is one request (ceil(queued / batch_max)) and so is each part; a refused
    number costs its batch at most `levels` splits of three requests (the suspect named
    by the 400, two halves), one per halving level.
    """
    levels = math.ceil(math.log2(batch_max)) if batch_max > 1 else 0
    return math.ceil(queued / batch_max) + parts + refused * (3 * levels + 1)


# --- column values -----------------------------------------------------------------------


class MessageChange(TypedDict, total=False):
    """The columns a send decision writes to its message's row: only those it changes."""

    state: State
    claim_token: None  # the claim released
    lease_until: None
    isolation: str | None
    attempts: int
    unknown_outcomes: int
    available_at: datetime
    provider_message_id: str
    submitted_at: datetime
    next_poll_at: datetime
    poll_deadline: datetime
    error_code: str
    error_message: str
    final_at: datetime
    final_source: str


_RELEASE: MessageChange = {"claim_token": None, "lease_until": None}


def learn_every(settings: Settings) -> int:
    """One message in how many explores latencies; 0 (none) where webhooks report: then
    checks only reconcile what they missed, and start late."""
    return 0 if settings.webhooks_enabled else settings.poll_learn_every


def check_delay(
    age: float,
    polls: int,
    pk: int,
    plan: CheckPlan,
    settings: Settings,
    rng: random.Random | None = None,
) -> float:
    """Seconds from a check made `age` s after submit (its `polls`-th) to the next one:
    on the route's learned plan, or the fixed schedule while too little is known."""
    explorer = explores(pk, learn_every(settings))
    if not (explorer or plan.ages):
        return poll_interval(
            polls,
            first=settings.poll_first_delay_seconds,
            factor=settings.poll_backoff_factor,
            cap=settings.poll_max_interval_seconds,
            jitter=settings.poll_jitter,
            min_gap=settings.poll_min_gap_seconds,
            rng=rng,
        )
    return learned_delay(
        age,
        plan,
        explorer=explorer,
        step=settings.poll_learn_step_seconds,
        explore_until=settings.poll_learn_until_seconds,
        factor=settings.poll_backoff_factor,
        cap=settings.poll_max_interval_seconds,
        jitter=settings.poll_jitter,
        min_gap=settings.poll_min_gap_seconds,
        rng=rng,
    )


def first_check_delay(pk: int, plan: CheckPlan, settings: Settings) -> float:
    """Seconds from submit (or the scheduled time) to a message's first status check."""
    if settings.webhooks_enabled:
        return settings.poll_first_delay_with_webhooks_seconds
    if not (plan.ages or explores(pk, learn_every(settings))):
        return settings.poll_first_delay_seconds
    return check_delay(0.0, 0, pk, plan, settings)


def submitted_values(
    pk: int,
    message_id: str,
    ttl: int | None,
    scheduled_sent: datetime | None,
    settings: Settings,
    now: datetime,
    plan: CheckPlan,
) -> MessageChange:
    """Column values of a message the provider accepted."""
    start = max(now, scheduled_sent) if scheduled_sent else now
    return {
        **_RELEASE,
        "state": State.SUBMITTED,
        "isolation": None,
        "provider_message_id": message_id,
        "submitted_at": now,
        "next_poll_at": start + timedelta(seconds=first_check_delay(pk, plan, settings)),
        "poll_deadline": poll_deadline(
            start,
            ttl,
            grace=settings.poll_grace_seconds,
            max_age=settings.poll_max_age_seconds,
        ),
    }


@dataclass(frozen=True, slots=True)
class Current:
    """What a decision needs of the row as it stands, read under the claim's lock."""

    attempts: int
    unknown_outcomes: int
    send_deadline: datetime | None


def _final(state: State, code: str, message: str, now: datetime) -> MessageChange:
    return {
        **_RELEASE,
        "state": state,
        "isolation": None,
        "error_code": code,
        "error_message": message,
        "final_at": now,
        "final_source": "send",
    }


def decide(
    outcome: Outcome,
    current: Current,
    settings: Settings,
    now: datetime,
    *,
    resend_unknown: bool,
) -> tuple[MessageChange, State, str]:
    """(column values, new state, event detail) for an outcome other than submitted.

    A message fails only for what is its own: a refusal isolated to it is `rejected`;
    `failed` is kept for an answer lost too often to resend blind again, and for a
    message that could not be sent before its `send_deadline`.
    """
    values: MessageChange
    if isinstance(outcome, Rejected):
        values = _final(State.REJECTED, outcome.code, outcome.message, now)
        return values, State.REJECTED, f"{outcome.code}: {outcome.message}"
    if isinstance(outcome, Expired):
        message = "TTL ran out before the message could be sent"
        return _final(State.EXPIRED, "TTL_EXPIRED", message, now), State.EXPIRED, message
    if isinstance(outcome, Cancelled):
        message = "campaign cancelled before the message was sent"
        values = _final(State.CANCELLED, "CANCELLED", message, now)
        return values, State.CANCELLED, "campaign cancelled; not resent"
    if isinstance(outcome, Isolate):
        values = {**_RELEASE, "state": State.QUEUED, "isolation": outcome.key, "available_at": now}
        return values, State.QUEUED, f"{outcome.reason}: isolating in a part of {outcome.size}"
    if isinstance(outcome, Submitted):
        raise TypeError("a submitted message is written by submitted_values")
    unknown = isinstance(outcome, Unknown)
    lost = current.unknown_outcomes + (1 if unknown else 0)
    if unknown and (not resend_unknown or lost >= settings.send_max_unknown_outcomes):
        why = "not resent" if not resend_unknown else f"lost {lost} times; not resent again"
        values = _final(State.FAILED, "UNKNOWN_OUTCOME", outcome.reason, now)
        return values | {"unknown_outcomes": lost}, State.FAILED, f"outcome unknown ({why})"
    counts = unknown or (isinstance(outcome, Retry) and outcome.counts)
    attempts = current.attempts + (1 if counts else 0)
    retry_at = now + timedelta(seconds=outcome.delay)
    if current.send_deadline is not None and retry_at > current.send_deadline:
        message = f"not sent before its send deadline; last: {outcome.reason}"
        values = _final(State.FAILED, "SEND_DEADLINE", message, now)
        return values | {"attempts": attempts, "unknown_outcomes": lost}, State.FAILED, message
    values = {
        **_RELEASE,
        "state": State.QUEUED,
        "attempts": attempts,
        "unknown_outcomes": lost,
        "available_at": retry_at,
        "error_code": "UNKNOWN_OUTCOME" if unknown else "SEND_RETRY",
        "error_message": outcome.reason,
    }
    prefix = "outcome unknown, resending" if unknown else "retry"
    return values, State.QUEUED, f"{prefix}: {outcome.reason} (attempt {attempts})"


def send_deadline(start: datetime, settings: Settings) -> datetime:
    """When a message handed to us at `start` (or scheduled for it) stops being retried."""
    return start + timedelta(seconds=settings.send_retry_for_seconds)
