"""Tables: one row per message (the outbox and its tracking record) and its event history.

The hot queue columns (`state`, `available_at`, `next_poll_at`) are covered by partial
indexes over the rows that are still claimable, so finished rows cost the claims nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy import (
    text as sql_text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; SQLite stores them naive, PostgreSQL as timestamptz."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class Campaign(Base):
    """A name messages were enqueued under; cancelling it stops its unsent messages.

    Held (launched with --hold, waiting for approval) or paused, its unsent messages are in
    the state `held`, which no claim takes (migration 0009).
    """

    __tablename__ = "campaigns"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    created_at: Mapped[datetime]
    cancelled_at: Mapped[datetime | None]
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_task: Mapped[str | None] = mapped_column(String(200))
    held_at: Mapped[datetime | None]  # waiting for `campaign approve` since
    paused_at: Mapped[datetime | None]  # paused since (`campaign pause`, or a cap)
    pause_reason: Mapped[str | None] = mapped_column(Text)
    retry_of: Mapped[str | None] = mapped_column(String(200))  # `campaign retry`'s source
    # Metering: messages wait `held`; beat releases them within these limits.
    daily_cap: Mapped[int | None] = mapped_column(Integer)  # messages released per UTC day
    rate_limit: Mapped[float | None] = mapped_column(Float)  # messages/s, under the global
    cap_day: Mapped[str | None] = mapped_column(String(10))  # the UTC day cap_released counts
    cap_released: Mapped[int | None] = mapped_column(Integer)
    # Quiet hours of this campaign ("10:00-18:00", "off"), over SEND_WINDOW (migration 0011).
    send_window: Mapped[str | None] = mapped_column(String(32))


class Message(Base):
    __tablename__ = "messages"

    pk: Mapped[int] = mapped_column(BigPK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(254), unique=True)
    campaign: Mapped[str | None] = mapped_column(String(200))

    # What the producer asked for (the cascade API's fields).
    from_name: Mapped[str] = mapped_column(String(64))
    to_phone: Mapped[str] = mapped_column(String(20))
    message_type: Mapped[str] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    ttl: Mapped[int | None] = mapped_column(Integer)
    scheduled_sent: Mapped[datetime | None]
    survey_options: Mapped[list[str] | None] = mapped_column(JSON)
    route: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(SmallInteger)

    # Queue state.
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    available_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0)
    unknown_outcomes: Mapped[int] = mapped_column(SmallInteger, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None]
    # When a message not yet with the provider stops being retried and is `failed`.
    send_deadline: Mapped[datetime | None]
    # Rows of a refused batch being isolated share a key: they are claimed together and
    # never with other rows, so the halving's progress lives here, not in a worker.
    isolation: Mapped[str | None] = mapped_column(String(32))
    # Consent (migration 0011): a message of a type the suppression list applies to (promo,
    # surveys) is never claimed while its number is suppressed; `window_at` is when quiet
    # hours let it go (set only when they held it back), for reports.
    needs_consent: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))
    window_at: Mapped[datetime | None]
    # The UTC day ("2026-03-02") the message last counted against the global daily caps
    # (worker/flows/quota.py, migration 0018): a send retried that day is not counted again.
    counted_on: Mapped[str | None] = mapped_column(String(10))
    # The UTC day a metered campaign last released it from `held` (worker/flows/campaigns.py
    # `meter`, migration 0018): held again that day, it is released again without counting.
    released_on: Mapped[str | None] = mapped_column(String(10))

    # Provider tracking.
    provider_message_id: Mapped[str | None] = mapped_column(String(64))
    submitted_at: Mapped[datetime | None]
    next_poll_at: Mapped[datetime | None]
    poll_deadline: Mapped[datetime | None]
    polls: Mapped[int] = mapped_column(Integer, default=0)
    last_polled_at: Mapped[datetime | None]
    final_at: Mapped[datetime | None]
    final_source: Mapped[str | None] = mapped_column(String(16))

    # Every field the provider reports.
    messagelist_id: Mapped[int | None] = mapped_column(BigInteger)
    deliverystatus: Mapped[str | None] = mapped_column(String(32))
    partscount: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[float | None] = mapped_column(Float)
    fallbacks: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    extended_statuses: Mapped[dict[str, str] | None] = mapped_column(JSON)
    rate: Mapped[float | None] = mapped_column(Float)
    rate_amount: Mapped[float | None] = mapped_column(Float)
    rate_currency: Mapped[str | None] = mapped_column(String(8))
    bill_amount: Mapped[float | None] = mapped_column(Float)
    bill_currency: Mapped[str | None] = mapped_column(String(8))

    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    # Outcome callback to the producing app: "waiting" until final, then "created".
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_task: Mapped[str | None] = mapped_column(String(200))
    callback_state: Mapped[str | None] = mapped_column(String(16))
    # "Tell me if it is not delivered by then" (e.g. an OTP to re-send another way).
    callback_late_at: Mapped[datetime | None]

    __table_args__ = (
        Index(
            "ix_messages_sendable",
            "route",
            "priority",
            "pk",
            postgresql_where=sql_text("state = 'queued'"),
            sqlite_where=sql_text("state = 'queued'"),
        ),
        Index(
            "ix_messages_queued_available",
            "available_at",
            postgresql_where=sql_text("state = 'queued'"),
            sqlite_where=sql_text("state = 'queued'"),
        ),
        Index(
            "ix_messages_isolation",
            "isolation",
            postgresql_where=sql_text("state = 'queued' AND isolation IS NOT NULL"),
            sqlite_where=sql_text("state = 'queued' AND isolation IS NOT NULL"),
        ),
        Index(  # the oldest part of a route, without reading the queue (0014)
            "ix_messages_parts",
            "route",
            "priority",
            "pk",
            postgresql_where=sql_text("state = 'queued' AND isolation IS NOT NULL"),
            sqlite_where=sql_text("state = 'queued' AND isolation IS NOT NULL"),
        ),
        Index(  # what a capped day still sends: the retries of messages it counted (0018)
            "ix_messages_counted",
            "route",
            "counted_on",
            "priority",
            "pk",
            postgresql_where=sql_text("state = 'queued' AND counted_on IS NOT NULL"),
            sqlite_where=sql_text("state = 'queued' AND counted_on IS NOT NULL"),
        ),
        Index(  # a metered campaign's messages released today and held again (0018)
            "ix_messages_released",
            "campaign",
            "released_on",
            postgresql_where=sql_text("state = 'held' AND released_on IS NOT NULL"),
            sqlite_where=sql_text("state = 'held' AND released_on IS NOT NULL"),
        ),
        Index(
            "ix_messages_send_deadline",
            "send_deadline",
            postgresql_where=sql_text("state = 'queued'"),
            sqlite_where=sql_text("state = 'queued'"),
        ),
        Index(
            "ix_messages_sending_lease",
            "lease_until",
            postgresql_where=sql_text("state = 'sending'"),
            sqlite_where=sql_text("state = 'sending'"),
        ),
        Index(
            "ix_messages_next_poll",
            "next_poll_at",
            "state",  # /metrics counts the messages awaiting a check by state from it (0008)
            postgresql_where=sql_text("next_poll_at IS NOT NULL"),
            sqlite_where=sql_text("next_poll_at IS NOT NULL"),
        ),
        Index(  # the due explorers of the default POLL_LEARN_EVERY, ahead of a backlog (0019)
            "ix_messages_explorers",
            "next_poll_at",
            postgresql_where=sql_text("next_poll_at IS NOT NULL AND pk % 100 = 0"),
            sqlite_where=sql_text("next_poll_at IS NOT NULL AND pk % 100 = 0"),
        ),
        Index("ix_messages_campaign_state", "campaign", "state"),
        # The summary's counts that depend on the time now, over just those rows (0017).
        Index(
            "ix_messages_waiting",
            "campaign",
            "available_at",
            postgresql_where=sql_text(
                "state = 'queued' AND scheduled_sent IS NOT NULL AND window_at IS NULL"
            ),
            sqlite_where=sql_text(
                "state = 'queued' AND scheduled_sent IS NOT NULL AND window_at IS NULL"
            ),
        ),
        Index(
            "ix_messages_window",
            "campaign",
            "window_at",
            postgresql_where=sql_text("state = 'queued' AND window_at IS NOT NULL"),
            sqlite_where=sql_text("state = 'queued' AND window_at IS NOT NULL"),
        ),
        Index(
            "ix_messages_callback_waiting",
            "final_at",
            postgresql_where=sql_text("callback_state = 'waiting'"),
            sqlite_where=sql_text("callback_state = 'waiting'"),
        ),
        Index(
            "ix_messages_callback_late",
            "callback_late_at",
            postgresql_where=sql_text("callback_late_at IS NOT NULL"),
            sqlite_where=sql_text("callback_late_at IS NOT NULL"),
        ),
        Index("ix_messages_to_phone", "to_phone", "pk"),
        # Unique where set: NULLs in the index cost every claim an entry (migration 0006).
        # SQLite databases keep the table-level UNIQUE of migration 0001; same lookups.
        Index(
            "ix_messages_provider_message_id",
            "provider_message_id",
            unique=True,
            postgresql_where=sql_text("provider_message_id IS NOT NULL"),
        ),
    )


class MessageEvent(Base):
    """One state change of a message, appended in the transaction that made it. No foreign
    key: its check cost a trigger and a row lock per event (migration 0016)."""

    __tablename__ = "message_events"

    pk: Mapped[int] = mapped_column(BigPK, primary_key=True, autoincrement=True)
    message_pk: Mapped[int] = mapped_column(BigPK, index=True)
    at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(16))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class ProviderReport(Base):
    """A pushed report (SMSBAT webhook, BulkGate DLR), stored before it is applied.

    A report for a messageId we do not know yet (the provider answered the webhook before
    our send answer was committed) stays unprocessed, parked, until the id appears.
    """

    __tablename__ = "provider_reports"

    pk: Mapped[int] = mapped_column(BigPK, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(16))
    provider_message_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    processed_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))
    # When a parked report is tried again: later and later as it ages (migration 0007).
    retry_at: Mapped[datetime | None]

    __table_args__ = (
        Index(
            "ix_provider_reports_due",
            "retry_at",
            postgresql_where=sql_text("processed_at IS NULL"),
            sqlite_where=sql_text("processed_at IS NULL"),
        ),
        Index(
            "ix_provider_reports_pending",
            "received_at",
            postgresql_where=sql_text("processed_at IS NULL"),
            sqlite_where=sql_text("processed_at IS NULL"),
        ),
        # What /metrics counts (migration 0008): only reports given up on enter it.
        Index(
            "ix_provider_reports_orphaned",
            "pk",
            postgresql_where=sql_text("outcome = 'orphan'"),
            sqlite_where=sql_text("outcome = 'orphan'"),
        ),
    )


class InboundMessage(Base):
    """An SMS a recipient sent us (BulkGate status 10), linked to what we last sent them."""

    __tablename__ = "inbound_messages"

    pk: Mapped[int] = mapped_column(BigPK, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(index=True)
    sender: Mapped[str] = mapped_column(String(32))
    text: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    message_pk: Mapped[int | None] = mapped_column(
        BigPK, ForeignKey("messages.pk", ondelete="SET NULL")
    )
    source: Mapped[str] = mapped_column(String(16))
    raw: Mapped[dict[str, Any]] = mapped_column(JSON)
    # inbox.inbound_key: one row per SMS however many times the provider pushes it.
    dedup_key: Mapped[str | None] = mapped_column(String(64), unique=True)


class Callback(Base):
    """One outcome notification to a producing app: a signed POST or a Celery task by name."""

    __tablename__ = "callbacks"

    pk: Mapped[int] = mapped_column(BigPK, primary_key=True, autoincrement=True)
    message_pk: Mapped[int] = mapped_column(
        BigPK, ForeignKey("messages.pk", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(8))  # "url" | "task"
    event: Mapped[str] = mapped_column(String(16), server_default="final")  # final | late
    target: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # pending | delivered | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index(
            "ix_callbacks_due",
            "next_attempt_at",
            postgresql_where=sql_text("state = 'pending'"),
            sqlite_where=sql_text("state = 'pending'"),
        ),
        # What /metrics counts (migration 0008): only callbacks that gave up enter it.
        Index(
            "ix_callbacks_dead",
            "pk",
            postgresql_where=sql_text("state = 'dead'"),
            sqlite_where=sql_text("state = 'dead'"),
        ),
    )


class Suppression(Base):
    """A number that opted out of promo and surveys (worker/flows/consent.py): E.164 only."""

    __tablename__ = "suppressions"

    phone: Mapped[str] = mapped_column(String(20), primary_key=True)
    created_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(16))  # reply | cli | api | import
    evidence: Mapped[str | None] = mapped_column(Text)  # the reply's text, or a note
    inbound_pk: Mapped[int | None] = mapped_column(
        BigPK, ForeignKey("inbound_messages.pk", ondelete="SET NULL")
    )


class SuppressionEvent(Base):
    """Every opt-out and opt-in, kept after the number is removed: the consent record."""

    __tablename__ = "suppression_events"

    pk: Mapped[int] = mapped_column(BigPK, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(String(20), index=True)
    at: Mapped[datetime]
    action: Mapped[str] = mapped_column(String(8))  # add | remove
    source: Mapped[str] = mapped_column(String(16))
    evidence: Mapped[str | None] = mapped_column(Text)
    inbound_pk: Mapped[int | None] = mapped_column(
        BigPK, ForeignKey("inbound_messages.pk", ondelete="SET NULL")
    )


class SendDay(Base):
    """What the workers handed to the provider on one UTC day, against the global caps
    (DAILY_MESSAGE_CAP, DAILY_SPEND_BUDGET; worker/flows/quota.py): one row a day."""

    __tablename__ = "send_days"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # 2026-12-07 (UTC)
    messages: Mapped[int] = mapped_column(Integer)  # messages claimed and admitted
    spend: Mapped[float] = mapped_column(Float)  # their rate-card estimate, RATE_CARD_CURRENCY
    # Why sending stopped for the day (a cap or the budget reached), null while it goes on;
    # in words, and the budget in force then, so a raised budget lets it go again.
    capped: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    spend_budget: Mapped[float | None] = mapped_column(Float)


class CampaignTally(Base):
    """What one write changed in a campaign's counts, per state, final source and currency:
    triggers on messages append these (migration 0017), a status view sums them, and the
    sweep folds each campaign's rows into their sums (worker/flows/tallies.py)."""

    __tablename__ = "campaign_tallies"

    pk: Mapped[int] = mapped_column(BigPK, primary_key=True, autoincrement=True)
    campaign: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[str] = mapped_column(String(16))
    final_source: Mapped[str | None] = mapped_column(String(16))
    currency: Mapped[str | None] = mapped_column(String(8))  # the bill's, else the rate's
    n: Mapped[int] = mapped_column(BigInteger)  # messages
    cost: Mapped[float] = mapped_column(Float)
    bill: Mapped[float] = mapped_column(Float)
    priced: Mapped[int] = mapped_column(BigInteger)  # messages with a cost or a bill
    unknown_outcomes: Mapped[int] = mapped_column(BigInteger)
    polls: Mapped[int] = mapped_column(BigInteger)
    sent: Mapped[int] = mapped_column(BigInteger)  # messages with a provider messageId
    first_created_at: Mapped[datetime | None]
    last_final_at: Mapped[datetime | None]


def _table(model: type[Base]) -> Table:
    """The mapped class's Table: SQLAlchemy types `__table__` as any FromClause, and the
    statements and helpers here need the Table (its columns, insert/update)."""
    table = model.__table__
    assert isinstance(table, Table), model
    return table


campaigns = _table(Campaign)
messages = _table(Message)
events = _table(MessageEvent)
provider_reports = _table(ProviderReport)
inbound_messages = _table(InboundMessage)
callbacks = _table(Callback)
suppressions = _table(Suppression)
suppression_events = _table(SuppressionEvent)
send_days = _table(SendDay)
campaign_tallies = _table(CampaignTally)
