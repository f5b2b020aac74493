"""Time the intake alone: `enqueue` of N bench messages and a CSV `campaign launch` of N rows.

Each run gets a fresh, migrated database (PostgreSQL by default) and the figures are the
medians of `--runs` runs; the rate is counted as scripts/bench.py counts "enqueue rate"
(campaign creation included). CPU is this process's (the producer's), per message.

    .venv/bin/python scripts/enqueue_bench.py --n 100000 --runs 3 [--db sqlite] [--profile F]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import bench_messages, drop_database, new_database  # noqa: E402

from config import Settings  # noqa: E402
from worker.flows.launch import Defaults, launch  # noqa: E402
from worker.flows.producer import enqueue  # noqa: E402

BROKER = "redis://127.0.0.1:6379/12"


def write_csv(path: Path, n: int) -> None:
    """The bench's messages as a launch file (the API's field names as headers)."""
    fields = ["id", "fromName", "toPhone", "messageType", "text", "ttl"]
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fields)
        writer.writeheader()
        writer.writerows(bench_messages(n, "csv"))


def one_call(n: int, settings: Settings, campaign: str) -> None:
    results = enqueue(bench_messages(n, campaign), campaign, settings=settings, kick=False)
    assert sum(r.status == "accepted" for r in results) == n, "not every message accepted"


def chunks_of(size: int) -> Callable[[int, Settings, str], None]:
    def run(n: int, settings: Settings, campaign: str) -> None:
        for start in range(0, n, size):
            part = bench_messages(min(size, n - start), campaign, start)
            enqueue(part, campaign, settings=settings, kick=False)

    return run


def csv_launch(path: Path) -> Callable[[int, Settings, str], None]:
    def run(n: int, settings: Settings, campaign: str) -> None:
        stats = launch(path, campaign, Defaults(), settings)
        assert stats.accepted == n, f"launch accepted {stats.accepted} of {n}"

    return run


def timed(
    name: str,
    work: Callable[[int, Settings, str], None],
    n: int,
    args: argparse.Namespace,
    workdir: Path,
) -> str:
    rates, cpus = [], []
    for i in range(args.runs):
        url = new_database(args.db, workdir)
        try:
            settings = Settings(DATABASE_URL=url, BROKER_URL=BROKER)
            campaign = f"bench-{uuid.uuid4().hex[:6]}"
            load = os.getloadavg()[0]
            profiler = cProfile.Profile() if args.profile and i == 0 else None
            wall, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            work(n, settings, campaign)
            if profiler:
                profiler.disable()
                profiler.dump_stats(f"{args.profile}.{name.split()[0]}")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            drop_database(url)
        rates.append(n / wall)
        cpus.append(cpu / n * 1e6)
        print(
            f"  {name} run {i + 1}: {n / wall:,.0f} msg/s, {cpu / n * 1e6:.1f} µs CPU/msg"
            f" (load {load:.2f})",
            flush=True,
        )
    return (
        f"{name}: median {statistics.median(rates):,.0f} msg/s "
        f"({', '.join(f'{r:,.0f}' for r in rates)}), "
        f"CPU {statistics.median(cpus):.1f} µs/msg"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--only", action="append", choices=["one", "chunks", "csv"])
    parser.add_argument("--profile", help="cProfile the first run of each into FILE.<name>")
    args = parser.parse_args()
    chosen = args.only or ["one", "chunks", "csv"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source = workdir / "bench.csv"
        write_csv(source, args.n)
        works = {
            "one": ("one call", one_call),
            "chunks": ("chunks of 10,000", chunks_of(10_000)),
            "csv": ("csv launch", csv_launch(source)),
        }
        print(f"n={args.n:,} db={args.db} load average at start {os.getloadavg()}")
        lines = [timed(*works[key], args.n, args, workdir) for key in chosen]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
