"""Read-only views of the record: one message with its history, one campaign in figures.

The dictionaries returned here are the `--json` output of the CLI; their keys are part of
the public contract.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from worker.models import events, messages
from worker.states import FINAL, State


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def message_detail(engine: Engine, message_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        if row is None:
            return None
        history = conn.execute(
            select(events).where(events.c.message_pk == row.pk).order_by(events.c.pk)
        ).all()
    return {
        "id": row.id,
        "campaign": row.campaign,
        "state": row.state,
        "final": row.state in FINAL,
        "messageId": row.provider_message_id,
        "route": row.route,
        "messageType": row.message_type,
        "deliverystatus": row.deliverystatus,
        "partscount": row.partscount,
        "cost": row.cost,
        "messagelistId": row.messagelist_id,
        "fallbacks": row.fallbacks,
        "extendedStatuses": row.extended_statuses,
        "rate": row.rate,
        "rateAmount": row.rate_amount,
        "rateCurrency": row.rate_currency,
        "billAmount": row.bill_amount,
        "billCurrency": row.bill_currency,
        "attempts": row.attempts,
        "unknownOutcomes": row.unknown_outcomes,
        "polls": row.polls,
        "error": {"code": row.error_code, "message": row.error_message} if row.error_code else None,
        "createdAt": _iso(row.created_at),
        "submittedAt": _iso(row.submitted_at),
        "finalAt": _iso(row.final_at),
        "finalSource": row.final_source,
        "events": [
            {
                "at": _iso(e.at),
                "source": e.source,
                "from": e.from_state,
                "to": e.to_state,
                "detail": e.detail,
            }
            for e in history
        ],
    }


def campaign_report(engine: Engine, campaign: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        by_state = conn.execute(
            select(
                messages.c.state,
                func.count(),
                func.coalesce(func.sum(messages.c.cost), 0.0),
                func.coalesce(func.sum(messages.c.unknown_outcomes), 0),
                func.coalesce(func.sum(messages.c.polls), 0),
                func.count(messages.c.provider_message_id),
            )
            .where(messages.c.campaign == campaign)
            .group_by(messages.c.state)
        ).all()
    if not by_state:
        return None
    states = {row[0]: row[1] for row in by_state}
    total = sum(states.values())
    final = sum(n for state, n in states.items() if state in FINAL)
    delivered = states.get(State.DELIVERED, 0)
    sent = sum(row[5] for row in by_state)
    return {
        "campaign": campaign,
        "total": total,
        "states": dict(sorted(states.items())),
        "final": final,
        "all_final": final == total,
        "sent": sent,
        "delivered": delivered,
        "delivery_rate": round(delivered / total, 4) if total else 0.0,
        "delivery_rate_of_sent": round(delivered / sent, 4) if sent else 0.0,
        "cost": round(sum(row[2] for row in by_state), 4),
        "unknown_outcomes": int(sum(row[3] for row in by_state)),
        "polls": int(sum(row[4] for row in by_state)),
    }
