"""The intake: validate messages, store the valid ones as `queued`, wake the dispatcher.

A message is stored before anything else happens to it, so from here on the database
alone decides its fate. A known `id` is not stored twice: the caller learns the state
of the message already there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, Literal

from sqlalchemy import Connection, Engine, insert, select, update

from config import Settings, get_settings
from worker.core import quiet
from worker.core.quiet import WAITING_DETAIL, available_at
from worker.core.sendpolicy import send_deadline
from worker.core.states import State
from worker.core.validation import (
    FieldError,
    OutgoingMessage,
    ValidationRules,
    campaign_callbacks,
    inherit_callbacks,
    validate_message,
)
from worker.flows import consent
from worker.flows.campaigns import CampaignCancelled, campaign_window, ensure_campaign
from worker.flows.wake import wake_dispatcher
from worker.store.db import among, get_engine, insert_new, insert_new_by_copy, utcnow
from worker.store.models import campaigns, events, messages

log = logging.getLogger(__name__)

CHUNK = 1000
MAX_CAMPAIGN_LENGTH = 200
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """What became of one message handed to `enqueue`."""

    id: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    state: str | None = None
    errors: tuple[FieldError, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"id": self.id, "status": self.status, "state": self.state}
        if self.errors:
            result["errors"] = [e.as_dict() for e in self.errors]
        return result


def rules_from(settings: Settings) -> ValidationRules:
    return ValidationRules(
        max_schedule_ahead=timedelta(days=settings.schedule_max_ahead_days),
        past_skew=timedelta(seconds=settings.schedule_past_skew_seconds),
        default_region=settings.default_phone_region,
    )


def row_for(
    message: OutgoingMessage, campaign: str | None, now: datetime, settings: Settings
) -> dict[str, Any]:
    """The messages row; a message scheduled far ahead stays ours until shortly before."""
    keep = (settings.schedule_hold_ahead_seconds, settings.schedule_send_lead_seconds)
    start = max(now, message.scheduled_sent) if message.scheduled_sent else now
    called_back = bool(message.callback_url or message.callback_task)
    late = message.callback_late_after if called_back else None
    return {
        "id": message.id,
        "campaign": campaign,
        "from_name": message.from_name,
        "to_phone": message.to_phone,
        "message_type": message.message_type,
        "text": message.text,
        "ttl": message.ttl,
        "scheduled_sent": message.scheduled_sent,
        "survey_options": list(message.survey_options) if message.survey_options else None,
        "route": message.route,
        "priority": message.priority,
        "state": State.QUEUED,
        "created_at": now,
        "available_at": available_at(message.scheduled_sent, now, *keep),
        "window_at": None,  # quiet hours (worker/core/quiet.py) set it when they hold it back
        "expires_at": start + timedelta(seconds=message.ttl) if message.ttl else None,
        "send_deadline": send_deadline(start, settings),
        "attempts": 0,
        "unknown_outcomes": 0,
        "polls": 0,
        "callback_url": message.callback_url,
        "callback_task": message.callback_task,
        "callback_state": "waiting" if called_back else None,
        # Late counts from when the message may go out: a scheduled one is not late before.
        "callback_late_at": start + timedelta(seconds=late) if late else None,
    }


def check_campaign(campaign: str | None) -> None:
    if campaign is None:
        return
    if not isinstance(campaign, str) or not campaign.strip():
        raise ValueError("campaign must be a non-empty string")
    if len(campaign) > MAX_CAMPAIGN_LENGTH:
        raise ValueError(f"campaign must be at most {MAX_CAMPAIGN_LENGTH} characters")
    if _UNSTORABLE.search(campaign):  # PostgreSQL refuses NUL; UTF-8 cannot hold surrogates
        raise ValueError("campaign must not contain control characters or lone surrogates")


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def store(
    engine: Engine,
    rows: list[dict[str, Any]],
    campaign: str | None = None,
    expire: set[str] | frozenset[str] = frozenset(),
) -> set[str]:
    """Insert rows whose id is new; answer the ids actually inserted. Those in `expire`
    (their TTL runs out before their send window opens) end `expired` at once.

    The campaign row is read under a share lock in the same transaction, so a cancel either
    commits first (and nothing is inserted) or waits and then cancels these rows too.
    """
    return store_as(engine, rows, campaign, expire)[0]


def store_as(
    engine: Engine,
    rows: list[dict[str, Any]],
    campaign: str | None = None,
    expire: set[str] | frozenset[str] = frozenset(),
    *,
    expect_new: bool = True,
) -> tuple[set[str], State]:
    """`store`, and the state the new rows are in: `held` for a held, paused or metered
    campaign, else `queued`. `expect_new`: bet that no id is stored yet (`insert_new_by_copy`:
    COPY, redone through `insert_new` when one is); false after a chunk of duplicates."""
    if not rows:
        return set(), State.QUEUED
    with engine.begin() as conn:
        blocked = False
        if campaign is not None:
            state = conn.execute(
                select(
                    campaigns.c.cancelled_at,
                    campaigns.c.held_at,
                    campaigns.c.paused_at,
                    campaigns.c.daily_cap,
                    campaigns.c.rate_limit,
                )
                .where(campaigns.c.name == campaign)
                .with_for_update(read=True)
            ).first()
            if state is not None and state.cancelled_at is not None:
                raise CampaignCancelled(campaign)
            # Held, paused or metered (a cap or rate: beat releases them within it).
            blocked = state is not None and any(
                v is not None
                for v in (state.held_at, state.paused_at, state.daily_cap, state.rate_limit)
            )
        insert = insert_new_by_copy if expect_new else insert_new
        inserted = insert(conn, messages, rows, key="id")
        if expire & inserted:
            _expire_new(conn, expire & inserted)
        if blocked and inserted:
            _hold_new(conn, inserted)
        return inserted, State.HELD if blocked else State.QUEUED


def _hold_new(conn: Connection, ids: set[str]) -> None:
    """A held or paused campaign's new messages are held as they are stored (journalled as
    queued → held, in the insert's transaction: no claim ever sees them queued)."""
    now = utcnow()
    pks = list(
        conn.execute(
            update(messages)
            .where(among(conn, messages.c.id, ids), messages.c.state == State.QUEUED)
            .values(state=State.HELD)
            .returning(messages.c.pk)
        ).scalars()
    )
    if pks:
        conn.execute(
            insert(events),
            [
                {
                    "message_pk": pk,
                    "at": now,
                    "source": "system",
                    "from_state": State.QUEUED,
                    "to_state": State.HELD,
                    "detail": "campaign held, paused or metered",
                }
                for pk in pks
            ],
        )


def _expire_new(conn: Connection, ids: Set[str]) -> None:
    """Messages whose TTL runs out before quiet hours end: expired, never sent at night."""
    now = utcnow()
    pks = list(
        conn.execute(
            update(messages)
            .where(among(conn, messages.c.id, ids), messages.c.state == State.QUEUED)
            .values(
                state=State.EXPIRED,
                final_at=now,
                final_source="system",
                error_code="QUIET_HOURS",
                error_message=WAITING_DETAIL,
            )
            .returning(messages.c.pk)
        ).scalars()
    )
    if pks:
        journal = [
            {
                "message_pk": pk,
                "at": now,
                "source": "system",
                "from_state": State.QUEUED,
                "to_state": State.EXPIRED,
                "detail": WAITING_DETAIL,
            }
            for pk in pks
        ]
        conn.execute(insert(events), journal)


def existing_states(engine: Engine, ids: Iterable[str]) -> dict[str, str]:
    wanted = list(ids)
    if not wanted:
        return {}
    with engine.begin() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.state).where(messages.c.id.in_(wanted))
        )
        return {row.id: row.state for row in rows}


def enqueue(
    items: Iterable[Mapping[str, Any]],
    campaign: str | None = None,
    *,
    settings: Settings | None = None,
    kick: bool = True,
    callback_url: str | None = None,
    callback_task: str | None = None,
    send_window: str | None = None,
) -> list[EnqueueResult]:
    """Validate and queue messages (the cascade API's JSON objects); one result per message.

    Results come in input order. A refused message never stops the others. A cancelled
    campaign takes no new messages (`CampaignCancelled`). `callback_url`/`callback_task`
    are stored on the campaign (or, without one, apply to this call); messages without
    callbacks of their own inherit the campaign's. `send_window` ("10:00-18:00", "off") is
    the campaign's quiet hours over SEND_WINDOW (worker/core/quiet.py). A promo or survey to a
    number on the suppression list is rejected (worker/flows/consent.py).
    """
    check_campaign(campaign)
    inherited = campaign_callbacks(callback_url, callback_task)
    settings = settings or get_settings()
    engine = get_engine(settings.database_url)
    if campaign is not None:
        inherited = ensure_campaign(engine, campaign, inherited)
    own_window = campaign_window(engine, campaign, send_window)
    windows, suppressed_types = settings.windows, settings.suppressed_types
    rules = rules_from(settings)
    results: list[EnqueueResult] = []
    seen: set[str] = set()
    accepted_any = False
    expect_new = True  # a relaunch meets its ids again: then ask before each insert
    for chunk in chunked(items, CHUNK):
        now = utcnow()
        chunk_results: list[EnqueueResult | None] = []
        rows: list[dict[str, Any]] = []
        for raw in chunk:
            checked = validate_message(raw, now=now, rules=rules)
            if not isinstance(checked, list):
                checked = inherit_callbacks(checked, inherited)
            if isinstance(checked, list):
                raw_id = raw.get("id") if isinstance(raw, Mapping) else None
                shown_id = raw_id if isinstance(raw_id, str) else None
                chunk_results.append(EnqueueResult(shown_id, "rejected", errors=tuple(checked)))
            elif checked.id in seen:
                chunk_results.append(EnqueueResult(checked.id, "duplicate", State.QUEUED))
            else:
                seen.add(checked.id)
                rows.append(row_for(checked, campaign, now, settings))
                chunk_results.append(None)
        if refused := consent.door(engine, rows, suppressed_types):
            chunk_results, rows = _refuse(chunk_results, rows, refused)
        late = {
            row["id"]
            for row in rows
            if quiet.place(row, windows.for_message(row["message_type"], own_window), now, settings)
        }
        inserted, stored_as = store_as(engine, rows, campaign, late, expect_new=expect_new)
        expect_new = expect_new and len(inserted) == len(rows)
        accepted_any = accepted_any or bool(inserted - late)
        known = existing_states(engine, {r["id"] for r in rows} - inserted)
        pending = iter(rows)
        for result in chunk_results:
            if result is None:
                message_id = next(pending)["id"]
                accepted = State.EXPIRED if message_id in late else stored_as
                result = (
                    EnqueueResult(message_id, "accepted", accepted)
                    if message_id in inserted
                    else EnqueueResult(message_id, "duplicate", known.get(message_id))
                )
            results.append(result)
    if kick and accepted_any:
        wake_dispatcher(settings.broker_url)
    return results


def _refuse(
    results: list[EnqueueResult | None],
    rows: list[dict[str, Any]],
    refused: Mapping[str, FieldError],
) -> tuple[list[EnqueueResult | None], list[dict[str, Any]]]:
    """The rows refused after validation (the suppression list) become rejected results."""
    pending = iter(rows)
    answered: list[EnqueueResult | None] = []
    for result in results:
        if result is None:
            row = next(pending)
            if row["id"] in refused:
                result = EnqueueResult(row["id"], "rejected", errors=(refused[row["id"]],))
        answered.append(result)
    return answered, [row for row in rows if row["id"] not in refused]
