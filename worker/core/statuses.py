"""The one forward-only path by which a provider's answer changes a message.

Polls, SMSBAT status webhooks and BulkGate delivery reports all arrive as a `Report` and
go through `apply`, so a late `processing` can never undo a `delivered`, a final state never
changes, and a duplicate is a no-op whatever its source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.core.states import FINAL, State, advance

SOURCES = ("poll", "webhook", "dlr")


@dataclass(frozen=True, slots=True)
class Report:
    """A provider's statement about one message, from any source."""

    message_id: str  # the provider's messageId (BulkGate: smsID)
    state: State
    source: str  # one of SOURCES
    fields: dict[str, Any] = field(default_factory=dict)  # message columns to store
    detail: str | None = None  # for the event row, e.g. "deliverystatus delivered"


def apply(current_state: str, report: Report, now: datetime) -> dict[str, Any]:
    """Column changes for a message now in `current_state` (pure; empty when nothing moves).

    A report equal to the current state still refreshes the provider's fields (cost may
    arrive later than the state); an earlier or a post-final report changes nothing.
    """
    if current_state in FINAL:
        return {}
    moves = advance(current_state, report.state)
    if not moves and report.state != current_state:
        return {}
    change = dict(report.fields)
    if moves:
        change["state"] = report.state
        if report.state in FINAL:
            change |= {"next_poll_at": None, "final_at": now, "final_source": report.source}
    return change
