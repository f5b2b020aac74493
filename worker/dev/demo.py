"""`cascade demo`: a whole campaign against the bundled simulator, watched to the end."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from config import Settings
from worker.dev.stack import start_simulator, workers
from worker.flows.producer import enqueue
from worker.ops.reports import campaign_report, campaign_summary
from worker.store.db import get_engine
from worker.store.migrate import upgrade_database

TYPES = {"transaction": 0.6, "promo": 0.3, "viber_survey": 0.05, "flashcall": 0.05}


def demo_messages(count: int, prefix: str, rng: random.Random) -> list[dict[str, Any]]:
    batch = []
    for i, kind in enumerate(rng.choices(list(TYPES), list(TYPES.values()), k=count)):
        message: dict[str, Any] = {
            "id": f"{prefix}-{i:07d}",
            "fromName": "CascadeDemo",
            "toPhone": f"+38067{rng.randrange(10**7):07d}",
            "messageType": kind,
            "ttl": 3600,
        }
        if kind == "viber_survey":
            message |= {"text": "How was your delivery?", "surveyOptions": ["Good", "Bad"]}
        elif kind != "flashcall":
            message["text"] = f"Your code is {rng.randrange(10**6):06d}"
        batch.append(message)
    return batch


def run_demo(settings: Settings, count: int, name: str | None, console: Console) -> dict[str, Any]:
    try:
        redis.Redis.from_url(settings.broker_url, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise SystemExit(
            f"Redis is not reachable at BROKER_URL ({exc}); start redis-server"
        ) from None
    upgrade_database(settings.database_url)
    name = name or f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    engine = get_engine(settings.database_url)
    with workers({}) as group:
        simulator = start_simulator(group.logdir, "--delay-min", "2", "--delay-max", "10")
        try:
            group.env |= {
                "SMSBAT_BASE_URL": simulator.url,
                "SMSBAT_API_KEY": "test-key",
                "POLL_FIRST_DELAY_SECONDS": "2",
                "DATABASE_URL": settings.database_url,
                "BROKER_URL": settings.broker_url,
            }
            group.start()
            console.print(
                f"simulator {simulator.url}, worker logs in {group.logdir} "
                "(removed at the end unless the demo fails)"
            )
            results = enqueue(demo_messages(count, name, random.Random()), name, settings=settings)
            accepted = sum(r.status == "accepted" for r in results)
            console.print(f"campaign {name}: {accepted} of {count} messages accepted")
            _watch(engine, name, count, console)
        finally:
            simulator.process.stop()
    report = campaign_report(engine, name)
    assert report is not None
    return report


def _watch(engine: Any, name: str, total: int, console: Console, timeout: float = 600) -> None:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("final", total=total, detail="")
        while time.monotonic() < deadline:
            report = campaign_summary(engine, name) or {"final": 0, "states": {}}
            detail = " ".join(f"{k}={v}" for k, v in report["states"].items())
            progress.update(task, completed=report["final"], detail=detail)
            if report["final"] >= total:
                return
            time.sleep(0.5)
