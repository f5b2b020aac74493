"""Campaign tallies (migration 0017): whatever writes the messages, the tallies the
triggers keep sum to a recount of the messages, folding or not, on both backends.

A hypothesis state machine drives real flows (intake, claims, holds and pauses, cancel,
consent, the sweeper) and an operator's own SQL (updates of any tallied column, moves
between campaigns, deletes); after every step each campaign's summary, read from the
tallies, must equal one counted over its messages. tests/test_send_model.py checks the
same after every step of the send path.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import Engine, delete, event, func, inspect, select, text, update

from config import Settings
from tests.conftest import make_messages
from tests.helpers import assert_tallies_match
from worker.core.states import FINAL
from worker.core.validation import validate_message
from worker.flows import campaigns as campaign_flows
from worker.flows import consent, dispatcher, sweeper, tallies
from worker.flows.producer import row_for, store
from worker.observe.gauges import NO_CAMPAIGN, read_totals
from worker.store import migrate
from worker.store.db import get_engine, utcnow
from worker.store.migrate import upgrade_database
from worker.store.models import campaign_tallies, campaigns, events, messages, suppressions

NAMES = ("alpha", "beta")
# Amounts with at most four decimals: sums in any order round to the same figure.
COSTS = (None, 0.25, 0.5, 0.0315, 1.2)
BILLS = (None, 0.3, 1.1)
CURRENCIES = (None, "", "UAH", "USD")


def _settings(url: str) -> Settings:
    return Settings(SMSBAT_API_KEY="k", DATABASE_URL=url)  # type: ignore[call-arg]


def stored(
    engine: Engine, settings: Settings, campaign: str | None, count: int, start: int, **extra: Any
) -> None:
    now = utcnow()
    rows = []
    for raw in make_messages(count, f"{campaign}-{start}", start=start, **extra):
        checked = validate_message(raw, now=now)
        assert not isinstance(checked, list), checked
        rows.append(row_for(checked, campaign, now, settings))
    store(engine, rows, campaign)


def tallies_machine(url: str) -> type[RuleBasedStateMachine]:
    settings = _settings(url)
    engine = get_engine(url)

    class Tallies(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            with engine.begin() as conn:
                for table in (events, messages, campaigns, suppressions, campaign_tallies):
                    conn.execute(delete(table))
            self.created = 0
            # Deletes, moves out of a campaign and cleared final times leave the tallies'
            # first and last times covering rows gone: bounds then, no longer equal.
            self.exact = True

        @rule(
            name=st.sampled_from(NAMES),
            count=st.integers(1, 12),
            kind=st.sampled_from(["transaction", "promo"]),
        )
        def enqueue(self, name: str, count: int, kind: str) -> None:
            stored(engine, settings, name, count, self.created, messageType=kind)
            self.created += count

        @rule(limit=st.integers(1, 20))
        def claim(self, limit: int) -> None:
            for route in ("standard", "promo", "cascade"):
                dispatcher.claim(engine, route, utcnow(), limit, 60, uuid.uuid4().hex)

        @rule()
        def claims_lapse(self) -> None:
            later = utcnow() + timedelta(minutes=5)
            sweeper.recover_stale_claims(engine, settings, later)

        @rule()
        def deadlines_pass(self) -> None:
            sweeper.give_up(engine, utcnow() + timedelta(days=30))

        @rule(name=st.sampled_from(NAMES), action=st.sampled_from(["hold", "pause", "resume"]))
        def control(self, name: str, action: str) -> None:
            try:
                if action == "hold":
                    campaign_flows.hold_campaign(engine, name)
                elif action == "pause":
                    campaign_flows.pause_campaign(engine, name)
                else:
                    campaign_flows.resume_campaign(engine, name)
            except campaign_flows.CampaignCancelled:
                pass

        @rule(name=st.sampled_from(NAMES))
        def cancel(self, name: str) -> None:
            campaign_flows.cancel_campaign(engine, name)

        @rule(number=st.integers(0, 30))
        def opt_out(self, number: int) -> None:
            with engine.begin() as conn:
                consent.add(conn, f"+38067{number:07d}", source="cli")
            consent.suppress_queued(engine)

        @rule(
            state=st.sampled_from(["submitted", "delivered", "undeliverable", "queued"]),
            cost=st.sampled_from(COSTS),
            bill=st.sampled_from(BILLS),
            currency=st.sampled_from(CURRENCIES),
            rate_currency=st.sampled_from(CURRENCIES),
            source=st.sampled_from([None, "poll", "webhook"]),
            share=st.integers(1, 4),
        )
        def operator_update(
            self,
            state: str,
            cost: float | None,
            bill: float | None,
            currency: str | None,
            rate_currency: str | None,
            source: str | None,
            share: int,
        ) -> None:
            """Answers and reports as an operator's SQL might write them, to every share-th row."""
            now = utcnow()
            self.exact = self.exact and state in FINAL
            with engine.begin() as conn:
                conn.execute(
                    update(messages)
                    .where(messages.c.pk % share == 0, messages.c.state != "sending")
                    .values(
                        state=state,
                        cost=cost,
                        bill_amount=bill,
                        bill_currency=currency,
                        rate_currency=rate_currency,
                        final_source=source,
                        provider_message_id=func.coalesce(
                            messages.c.provider_message_id, "p-" + messages.c.id
                        )
                        if state != "queued"
                        else None,
                        final_at=now if state in FINAL else None,
                        polls=messages.c.polls + 1,
                        unknown_outcomes=messages.c.unknown_outcomes + (share % 2),
                    )
                )

        @rule(share=st.integers(2, 5), to=st.sampled_from([*NAMES, None]))
        def operator_moves(self, share: int, to: str | None) -> None:
            self.exact = False
            with engine.begin() as conn:
                conn.execute(update(messages).where(messages.c.pk % share == 1).values(campaign=to))

        @rule(share=st.integers(3, 7))
        def operator_deletes(self, share: int) -> None:
            self.exact = False
            with engine.begin() as conn:
                conn.execute(delete(messages).where(messages.c.pk % share == 2))

        @rule()
        def fold(self) -> None:
            tallies._fold(engine, list(NAMES))

        @invariant()
        def tallies_sum_to_a_recount(self) -> None:
            assert_tallies_match(engine, NAMES, exact=self.exact)

        @invariant()
        def metrics_totals_are_a_recount(self) -> None:
            assert read_totals(engine).by_campaign == metrics_recount(engine)

    return Tallies


def metrics_recount(engine: Engine) -> dict[tuple[str, str], int]:
    """What the /metrics totals must say: every message by campaign ("none" without one)
    and state, counted over the messages."""
    m = messages.c
    with engine.connect() as conn:
        rows = conn.execute(select(m.campaign, m.state, func.count()).group_by(m.campaign, m.state))
        return {(campaign or NO_CAMPAIGN, state): n for campaign, state, n in rows}


MACHINE_SETTINGS = hypothesis_settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tallies_sum_to_a_recount_after_any_writes(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    run_state_machine_as_test(tallies_machine(database_factory(backend)), settings=MACHINE_SETTINGS)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_folding_while_writers_commit_loses_nothing(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = get_engine(url)
    settings = _settings(url)
    stored(engine, settings, "alpha", 2000, 0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(25):
                share, pick = rng.randint(2, 9), rng.randint(0, 8)
                state = rng.choice(["submitted", "delivered", "queued", "undeliverable"])
                with engine.begin() as conn:
                    conn.execute(
                        update(messages)
                        # Rows of this writer's own: two updates of one row would deadlock.
                        .where(messages.c.pk % 3 == seed, messages.c.pk % share == pick % share)
                        .values(state=state, polls=messages.c.polls + 1, cost=rng.choice(COSTS))
                    )
        except BaseException as exc:
            errors.append(exc)

    def keep_folding() -> None:
        try:
            while not stop.is_set():
                tallies._fold(engine, ["alpha"])
        except BaseException as exc:
            errors.append(exc)

    folder = threading.Thread(target=keep_folding)
    writers = [threading.Thread(target=write, args=(seed,)) for seed in range(3)]
    folder.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    folder.join()
    assert not errors, errors
    assert_tallies_match(engine, ("alpha",))
    tallies._fold(engine, ["alpha"])
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(campaign_tallies)).scalar_one()
    assert rows <= 4 * 5  # one row per group once folded
    assert_tallies_match(engine, ("alpha",))


def test_fold_only_when_deltas_outnumber_the_groups() -> None:
    assert not tallies.should_fold(rows=10, groups=5)
    assert not tallies.should_fold(rows=100, groups=60)
    assert tallies.should_fold(rows=120, groups=60)
    assert tallies.should_fold(rows=64, groups=3)


def _alembic(url: str) -> Config:
    config = Config()
    config.set_main_option("sqlalchemy.url", url)
    config.set_main_option("script_location", str(Path(migrate.__file__).parent / "migrations"))
    return config


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_migration_counts_the_messages_already_there_and_goes_back(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = get_engine(url)
    command.downgrade(_alembic(url), "0016")
    assert "campaign_tallies" not in inspect(engine).get_table_names()
    settings = _settings(url)
    stored(engine, settings, "alpha", 30, 0)
    stored(engine, settings, "beta", 20, 30, messageType="promo")
    stored(engine, settings, "gamma", 5, 50)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.pk % 3 == 0)
            .values(state="delivered", cost=0.25, bill_currency="UAH", final_at=now,
                    final_source="poll", provider_message_id="p-" + messages.c.id, polls=2)
        )  # fmt: skip
        conn.execute(update(messages).where(messages.c.pk % 7 == 0).values(campaign=None))

    upgrade_database(url)

    assert_tallies_match(engine, ("alpha", "beta", "gamma"))
    stored(engine, settings, "alpha", 5, 100)  # and the triggers count what comes next
    assert_tallies_match(engine, ("alpha", "beta", "gamma"))
    command.downgrade(_alembic(url), "0016")
    assert "campaign_tallies" not in inspect(engine).get_table_names()
    with engine.begin() as conn:  # no trigger left behind to write to a missing table
        conn.execute(update(messages).values(polls=messages.c.polls + 1))
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 60


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_sweep_folds_a_campaign_with_many_rows_and_leaves_a_small_one(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = get_engine(url)
    settings = _settings(url)
    stored(engine, settings, "alpha", 100, 0)
    stored(engine, settings, "beta", 3, 100)
    for pk in range(1, 81):  # one write per statement: 80 delta rows and more for alpha
        with engine.begin() as conn:
            conn.execute(update(messages).where(messages.c.pk == pk).values(polls=1, cost=0.25))

    def rows(name: str) -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(campaign_tallies.c.campaign == name)
                ).scalar_one()
            )

    small = rows("beta")  # one a message on SQLite, one for the batch on PostgreSQL
    assert rows("alpha") > tallies.FOLD_MIN_ROWS
    assert sweeper.sweep(engine, settings)["tallies_folded"] == 1
    assert rows("alpha") == 1 and rows("beta") == small  # all queued, with a cost: one group
    assert_tallies_match(engine, ("alpha", "beta"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_write_that_changes_no_tallied_column_appends_nothing(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    url = database_factory(backend)
    engine = get_engine(url)
    stored(engine, _settings(url), "alpha", 50, 0)
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.pk % 2 == 0).values(cost=0.0315))
        before = conn.execute(select(func.count()).select_from(campaign_tallies)).scalar_one()
        conn.execute(update(messages).values(next_poll_at=utcnow(), attempts=2))
        conn.execute(update(messages).values(cost=messages.c.cost))  # rewritten, not changed
        after = conn.execute(select(func.count()).select_from(campaign_tallies)).scalar_one()
    assert after == before


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_metrics_totals_read_the_tallies_and_only_messages_without_a_campaign(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    """At a million messages a recount took 0.4 s every METRICS_TOTALS_SECONDS; the
    tallies answer for the campaigns, and only campaign-less messages are counted."""
    url = database_factory(backend)
    engine = get_engine(url)
    settings = _settings(url)
    stored(engine, settings, "alpha", 30, 0)
    stored(engine, settings, None, 4, 30)
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.pk % 3 == 0).values(state="delivered"))
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        totals = read_totals(engine)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert totals.by_campaign == metrics_recount(engine)
    assert {campaign for campaign, _ in totals.by_campaign} == {"alpha", NO_CAMPAIGN}
    reads = [s for s in seen if "FROM messages" in s]
    assert reads and all("messages.campaign IS NULL" in s for s in reads), reads
    assert any("campaign_tallies" in s for s in seen)
