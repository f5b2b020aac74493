"""What a /metrics scrape costs the database, on N messages in PostgreSQL (default 1,000,000).

    .venv/bin/python scripts/metrics_bench.py [--n 1000000] [--scrapes 30]

Fills a fresh database with a campaign mix after a busy day (200 campaigns; 94 % final,
2 % queued, 2 % awaiting a status check, 2 % expired), VACUUM ANALYZE, then times the
per-scrape statement (worker.observe.gauges.read_backlog), the totals refresh (every message by
campaign and state, at most every METRICS_TOTALS_SECONDS) and a whole exposition. Prints
the median and the worst; the database is dropped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from worker.observe.gauges import (  # noqa: E402
    DatabaseCollector,
    backlog_statement,
    metrics_engine,
    read_backlog,
    read_totals,
)
from worker.observe.metrics import exposition  # noqa: E402
from worker.store.db import utcnow  # noqa: E402
from worker.store.migrate import upgrade_database  # noqa: E402

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
FILL = """
INSERT INTO campaigns(name, created_at) SELECT 'camp-' || g, now() FROM generate_series(0, 199) g;
INSERT INTO messages(id, campaign, from_name, to_phone, message_type, text, route, priority,
    state, created_at, available_at, attempts, unknown_outcomes, polls, submitted_at,
    next_poll_at, final_at)
SELECT 'm-' || g, 'camp-' || (g %% 200), 'Bench', '+38067' || lpad((g %% 10000000)::text, 7, '0'),
    'transaction', 'message ' || g, 'standard', 1,
    CASE WHEN g %% 100 < 85 THEN 'delivered' WHEN g %% 100 < 92 THEN 'undeliverable'
         WHEN g %% 100 < 94 THEN 'failed' WHEN g %% 100 < 96 THEN 'queued'
         WHEN g %% 100 < 98 THEN 'submitted' ELSE 'expired' END,
    now() - interval '1 hour', now() - interval '1 hour', 1, 0, 1,
    CASE WHEN g %% 100 IN (94, 95) THEN NULL ELSE now() - interval '50 minutes' END,
    CASE WHEN g %% 100 IN (96, 97) THEN now() - interval '1 second' * (g %% 600) END,
    CASE WHEN g %% 100 < 94 OR g %% 100 >= 98 THEN now() - interval '10 minutes' END
FROM generate_series(1, %(n)s) g;
"""


def timed(call: object, times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def show(name: str, samples: list[float]) -> None:
    print(
        f"{name:<28} median {statistics.median(samples):7.1f} ms"
        f"   worst {max(samples):7.1f} ms   ({len(samples)} runs)"
    )


def explain(engine: Engine) -> None:
    sql = backlog_statement(utcnow()).compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        for (line,) in conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")):
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--explain", action="store_true", help="Print the statement's plan.")
    args = parser.parse_args()
    name = f"cascade_metrics_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade_database(url)
        started = time.perf_counter()
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            for statement in filter(str.strip, FILL.split(";")):
                conn.execute(statement, {"n": args.n} if "%(n)s" in statement else None)  # type: ignore[arg-type]
            conn.execute("VACUUM ANALYZE")
        print(f"{args.n:,} messages in {time.perf_counter() - started:.0f} s")
        engine = metrics_engine(url)
        read_backlog(engine)  # connect, warm the cache
        settings = Settings(  # type: ignore[call-arg]
            DATABASE_URL=url, BROKER_URL="redis://127.0.0.1:6379/15", METRICS_TOTALS_SECONDS=3600
        )
        collector = DatabaseCollector(settings)
        show("per-scrape statement", timed(lambda: read_backlog(engine), args.scrapes))
        show("totals refresh", timed(lambda: read_totals(engine), max(3, args.scrapes // 5)))
        exposition(collector)  # the first scrape reads the totals
        show("whole scrape (totals cached)", timed(lambda: exposition(collector), args.scrapes))
        if args.explain:
            explain(engine)
        engine.dispose()
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
