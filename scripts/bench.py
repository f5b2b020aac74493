"""End-to-end benchmark: our pipeline beside the naive baseline and the floor, one run.

    .venv/bin/python scripts/bench.py [--n 100000] [--workers 2] [--db postgresql|sqlite]

- ours: `celery -A worker worker` processes (prefork, 2 each, beat in the first) against
  the simulator (deliveries spread over 5–30 s); N messages enqueued from this process.
- naive: what the provider's examples lead to (scripts/naive_baseline.py): one task per
  message posting a one-element array, then a countdown poll task every 5 s until final.
- floor: the same messages bulk-inserted, then POSTed in 1000-message batches from this one
  process with their answers written back; no queue, no polling.
- webhook intake (needs Debian's `wrk`): `cascade api [--workers N]` taking SMSBAT pushes
  (one report each, every messageId new) from wrk -t2 -c64 for --intake-seconds, then
  BulkGate arrays of 100; a Celery worker with beat applies them to submitted messages.
  Medians of --intake-runs runs; `--skip ours --skip naive --skip floor --skip webhooks`
  runs it alone.

Uses Redis DB 15 (flushed) and a fresh PostgreSQL database (or SQLite file) per run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import redis
from sqlalchemy import Engine, func, insert, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from worker.celery import POLL_QUEUE, SEND_QUEUE, app  # noqa: E402
from worker.core.backoff import learn_plan  # noqa: E402
from worker.core.states import FINAL, State  # noqa: E402
from worker.dev.stack import (  # noqa: E402
    Process,
    Simulator,
    spawn,
    start_api,
    start_simulator,
    workers,
)
from worker.flows.producer import enqueue, wake_dispatcher  # noqa: E402
from worker.provider.keepalive import KeepAliveTransport  # noqa: E402
from worker.provider.smsbat import StatusClient  # noqa: E402
from worker.store.db import get_engine, make_engine  # noqa: E402
from worker.store.migrate import upgrade_database  # noqa: E402
from worker.store.models import messages  # noqa: E402
from worker.store.pacing import LATENCIES  # noqa: E402

DEFAULT_BROKER = "redis://127.0.0.1:6379/15"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
API_KEY = "bench-key"
WEBHOOK_TOKEN = "bench-webhook-token"
# Every queue but sends: the workers take the send queue on once the outbox is full.
HELD_BACK = [q.name for q in app.conf.task_queues if q.name != SEND_QUEUE]


@dataclass
class Result:
    name: str
    n: int
    figures: dict[str, float | None] = field(default_factory=dict)
    rss: list[float] = field(default_factory=list)  # peak MB of each worker process
    plan: str | None = None  # the status checks' plan at launch


def bench_messages(n: int, prefix: str, start: int = 0) -> Iterator[dict[str, Any]]:
    for i in range(start, start + n):
        yield {
            "id": f"{prefix}-{i}",
            "fromName": "Bench",
            "toPhone": f"+38067{i % 10_000_000:07d}",
            "messageType": "transaction" if i % 3 else "promo",
            "text": f"Your code is {i % 1_000_000:06d}",
            "ttl": 3600,
        }


def _rate(n: int, start: float | None, end: float | None) -> float | None:
    return n / (end - start) if start and end and end > start else None


def reset_broker(url: str) -> None:
    """Empty the broker's Redis DB but the routes' learned check latencies: a deployment
    keeps them from campaign to campaign, so only the bench's first column starts cold."""
    client = redis.Redis.from_url(url)
    kept = {key: client.lrange(key, 0, -1) for key in client.scan_iter(LATENCIES + "*")}
    client.flushdb()
    for key, values in kept.items():
        if values:
            client.rpush(key, *values)


def plan_at_launch(url: str) -> str:
    """The check plan the workers would use at launch, as the table's footnote says it."""
    client = redis.Redis.from_url(url)
    values = [float(v) for v in client.lrange(LATENCIES + "standard", 0, -1)]
    settings = Settings()
    plan = learn_plan(values, settings.poll_learn_quantiles, settings.poll_learn_min_samples)
    if not plan.ages:
        return f"fixed schedule ({len(values)} latencies known)"
    return f"checks at {', '.join(f'{a:g}' for a in plan.ages)} s ({len(values)} latencies known)"


def new_database(backend: str, workdir: Path) -> str:
    if backend == "sqlite":
        url = f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:6]}.db'}"
    else:
        name = f"cascade_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade_database(url)
    return url


def drop_database(url: str) -> None:
    if url.startswith("postgresql"):
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_bytes(url: str) -> int:
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    with make_engine(url).connect() as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def peak_rss_mb(root_pids: list[int]) -> list[float]:
    """Peak resident memory (VmHWM) of each process and its children, in MB."""
    found = []
    for pid in root_pids:
        tree = [pid, *_children(pid)]
        for p in tree:
            try:
                status = Path(f"/proc/{p}/status").read_text()
            except OSError:
                continue
            kb = next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
            )
            found.append(kb / 1024)
    return found


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far (user + system, from /proc) by each group of process trees,
    by PostgreSQL's processes and by the rest: what a figure's work cost the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    owner = {
        pid: kind for kind, roots in groups.items() for r in roots for pid in (r, *_children(r))
    }
    used = dict.fromkeys([*groups, "postgres", "rest"], 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name, _, rest = (entry / "stat").read_text().rpartition(")")
        except OSError:
            continue
        fields = rest.split()
        kind = owner.get(int(entry.name)) or ("postgres" if name.endswith("(postgres") else "rest")
        used[kind] += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return used


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


# --- ours --------------------------------------------------------------------------------


def run_ours(
    n: int,
    n_workers: int,
    url: str,
    broker: str,
    sim: Simulator,
    logdir: Path,
    *,
    webhooks: bool = False,
    profile: bool = False,
    overlap: bool = False,
    chunk: int = 10_000,
    until_sent: bool = False,
    name: str | None = None,
) -> Result:
    """Fill the outbox with sending held, then let the workers send and follow every message.

    Workers start on every queue but sends (`-Q`) and take the send queue on by remote
    control once the campaign is stored, so send throughput measures sending alone, as the
    floor's does; launch to all-final still counts from the first message enqueued.

    `overlap`: as users run it instead. Workers take every queue from the start and the
    campaign goes to `enqueue` in chunks of `chunk`, each waking the dispatcher, so sends
    overlap intake; "end to end" is the first enqueue call to the last message submitted.

    `until_sent`: stop once every message has left the queue (polling runs beside the sends
    as ever), for sizes whose all-final only measures how many checks a second fit.
    """
    env = {
        "DATABASE_URL": url,
        "BROKER_URL": broker,
        "SMSBAT_BASE_URL": sim.url,
        "SMSBAT_API_KEY": API_KEY,
    }
    if webhooks:
        env |= {"WEBHOOKS_ENABLED": "true", "WEBHOOK_TOKEN": WEBHOOK_TOKEN, "API_TOKEN": API_KEY}
    settings = Settings(**env)  # type: ignore[arg-type]
    engine = get_engine(url)
    name = name or ("ours, overlapped" if overlap else "ours + webhooks" if webhooks else "ours")
    result = Result(name, n)
    result.plan = plan_at_launch(broker)
    nodes = [f"ours{i}@{socket.gethostname()}" for i in range(n_workers)]
    app.conf.broker_url = broker  # remote control below goes through this app
    with workers(env, logdir) as group:
        for i in range(n_workers):
            group.start(f"ours{i}", beat=i == 0, queues=() if overlap else HELD_BACK)
        api = start_api(logdir, group.env) if webhooks else None
        if api is not None:
            sim.configure(webhook_url=f"{api.url}/webhooks/smsbat", webhook_token=WEBHOOK_TOKEN)
        _wait_for_nodes(nodes)
        pids = {
            "workers": [p.popen.pid for p in group.processes],
            "API": [api.process.popen.pid] if api is not None else [],
            "simulator": [sim.process.popen.pid],
        }
        before = cpu_seconds(pids)
        started = time.time()
        campaign = f"bench-{uuid.uuid4().hex[:6]}"
        spies = [_spy(p, logdir) for p in group.processes] if profile and overlap else []
        if overlap:
            for start in range(0, n, chunk):
                part = bench_messages(min(chunk, n - start), campaign, start)
                enqueue(part, campaign, settings=settings)
        else:
            enqueue(bench_messages(n, campaign), campaign, settings=settings, kick=False)
        enqueued = time.time()
        if not overlap:
            spies = [_spy(p, logdir) for p in group.processes] if profile else []
            replies = app.control.add_consumer(SEND_QUEUE, destination=nodes, reply=True, timeout=5)
            if {name for reply in replies for name in reply} != set(nodes):
                raise RuntimeError(f"not every worker took the send queue on: {replies}")
            wake_dispatcher(broker)
        wait_until_done(engine, sim, campaign, n, sent=True)
        spent = _spent(before, cpu_seconds(pids))
        wait_until_done(engine, sim, campaign, n, until_sent)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        with engine.connect() as db:
            last_submit, last_final = db.execute(
                select(func.max(messages.c.submitted_at), func.max(messages.c.final_at))
            ).one()
        rss = peak_rss_mb([p.popen.pid for p in group.processes])
        if api is not None:
            api.process.stop()
    stats = sim.stats()
    result.figures = {
        "enqueue rate (msg/s)": n / (enqueued - started),
        "send throughput (msg/s)": _rate(n, stats["first_send_at"], last_submit.timestamp()),
        "end to end (msg/s)": _rate(n, started, last_submit.timestamp()),
        "launch to all-final (s)": None if until_sent else last_final.timestamp() - started,
        "send requests / message": stats["send_requests"] / n,
        "status polls / message": stats["status_requests"] / n,
        "peak worker RSS (MB, max)": max(rss) if rss else None,
        "database bytes / message": database_bytes(url) / n,
        **{
            f"CPU until sent: {kind} (us/msg)": seconds / n * 1e6
            for kind, seconds in spent.items()
            if kind != "API" or api is not None
        },
    }
    result.rss = rss
    return result


def wait_until_done(engine: Engine, sim: Simulator, campaign: str, n: int, sent: bool) -> None:
    """Until every message left the queue (`sent`) or is final, watched cheaply.

    An exact count walks every index entry the campaign's rows ever had (no visibility map
    with autovacuum off): at 1,000,000 it took half a core, a second each second, from the
    workers it measured. So the bench first waits on what costs nothing: the simulator's
    count of messages taken, then (for all-final) no row left awaiting a check. The exact
    count only confirms it.
    """
    while sim.stats()["unique_tracking_ids"] < n:
        time.sleep(1)
    while not sent and _checks_waiting(engine):
        time.sleep(1)
    while (_sent if sent else _finals)(engine, campaign) < n:
        time.sleep(1)


def _checks_waiting(engine: Engine) -> bool:
    """Whether a message of the (bench's only) campaign still awaits a status check: one
    step on the partial index of `next_poll_at`."""
    with engine.connect() as conn:
        found = conn.execute(
            select(messages.c.pk).where(messages.c.next_poll_at.is_not(None)).limit(1)
        ).first()
        return found is not None


def _finals(engine: Engine, campaign: str) -> int:
    """Final messages of the campaign, counted on its (campaign, state) index."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    messages.c.campaign == campaign, messages.c.state.in_(list(FINAL))
                )
            ).scalar_one()
        )


def _sent(engine: Engine, campaign: str) -> int:
    """Messages of the campaign that left the queue (submitted, or final without a send)."""
    waiting = [State.QUEUED, State.SENDING, State.HELD]
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    messages.c.campaign == campaign, messages.c.state.not_in(waiting)
                )
            ).scalar_one()
        )


def _wait_for_nodes(nodes: list[str], timeout: float = 60) -> None:
    """Until every worker answers a ping: the clock must not count their start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = app.control.ping(destination=nodes, timeout=1)
        if {name for reply in answered for name in reply} >= set(nodes):
            return
    raise TimeoutError(f"workers {nodes} did not answer within {timeout:.0f}s")


def _spy(process: Process, logdir: Path) -> subprocess.Popen[bytes]:
    """py-spy on a worker and its pool children until SIGINT, as collapsed stacks."""
    out = logdir / f"{process.name}.pyspy.txt"
    args = ["record", "--pid", str(process.popen.pid), "--subprocesses", "--rate", "50"]
    args += ["--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_summary(logdir: Path, top: int = 15) -> list[str]:
    """Share of the workers' samples spent in (or under) each of our own functions."""
    inclusive: Counter[str] = Counter()
    total = 0
    for path in logdir.glob("*.pyspy.txt"):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():  # a line cut short when py-spy was stopped
                continue
            total += int(count)
            ours = {re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if " (worker/" in f}
            for frame in ours:
                inclusive[frame] += int(count)
    return [f"{v / total * 100:5.1f}%  {k}" for k, v in inclusive.most_common(top)] if total else []


# --- naive -------------------------------------------------------------------------------


def run_naive(
    n: int, n_workers: int, url: str, broker: str, sim: Simulator, logdir: Path, timeout: float
) -> Result:
    from scripts.naive_baseline import metadata, naive_messages

    engine = make_engine(url)
    metadata.create_all(engine)
    batch = list(bench_messages(n, "naive"))
    with engine.begin() as conn:
        conn.execute(insert(naive_messages), [{"id": m["id"], "status": "queued"} for m in batch])
    env = {
        **os.environ,
        "NAIVE_DATABASE_URL": url,
        "NAIVE_BROKER_URL": broker,
        "BROKER_URL": broker,  # Celery reads it from the environment too
        "NAIVE_PROVIDER_URL": sim.url,
        "NAIVE_API_KEY": API_KEY,
        "PYTHONPATH": str(ROOT),
    }
    result = Result("naive", n)
    from scripts.naive_baseline import app, send

    # As for ours, the queue is filled before anything sends: the send figures are sending's.
    app.conf.broker_url = broker
    started = time.time()
    with app.connection_for_write() as conn:
        for message in batch:
            send.apply_async((message,), connection=conn)
    enqueued = time.time()
    procs = [
        spawn(
            f"naive{i}",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "scripts.naive_baseline",
                "worker",
                "-l",
                "warning",
                "-P",
                "prefork",
                "-c",
                "2",
                "-n",
                f"naive{i}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            env,
            logdir,
        )
        for i in range(n_workers)
    ]
    try:
        deadline = started + timeout
        while time.time() < deadline:
            with engine.connect() as conn:
                final = conn.execute(
                    select(func.count()).where(
                        naive_messages.c.status.in_(
                            ["delivered", "undeliverable", "permanenterror"]
                        )
                    )
                ).scalar_one()
            if final >= n:
                break
            time.sleep(0.5)
        finished = time.time()
        rss = peak_rss_mb([p.popen.pid for p in procs])
    finally:
        for p in procs:
            p.stop()
    stats = sim.stats()
    result.figures = {
        "enqueue rate (msg/s)": n / (enqueued - started),
        "send throughput (msg/s)": _rate(n, stats["first_send_at"], stats["last_send_at"]),
        "launch to all-final (s)": finished - started if final >= n else None,
        "send requests / message": stats["send_requests"] / n,
        "status polls / message": stats["status_requests"] / n,
        "peak worker RSS (MB, max)": max(rss) if rss else None,
        "database bytes / message": None,
    }
    result.rss = rss
    return result


# --- floor -------------------------------------------------------------------------------


def run_floor(n: int, url: str, sim: Simulator, name: str = "floor") -> Result:
    """The fastest plain code doing the unavoidable work: the messages stored (COPY on
    PostgreSQL), POSTed in 1000-message batches, each answer's ids written back with one
    set-based UPDATE. No queue, no claims, no polling, no history."""
    batch = list(bench_messages(n, "floor"))
    postgres = url.startswith("postgresql")
    started = time.time()
    with httpx.Client(
        base_url=sim.url, headers={"X-Authorization-Key": API_KEY}, timeout=60
    ) as client:
        if postgres:
            inserted = _floor_postgres(url, batch, client)
        else:
            inserted = _floor_sqlite(url, batch, client)
    sent = time.time()
    return Result(
        name,
        n,
        {
            "enqueue rate (msg/s)": n / (inserted - started),
            "send throughput (msg/s)": n / (sent - inserted),
            "end to end (msg/s)": n / (sent - started),
            "launch to all-final (s)": None,
            "send requests / message": sim.stats()["send_requests"] / n,
            "status polls / message": 0.0,
            "peak worker RSS (MB, max)": None,
            "database bytes / message": None,
        },
    )


_FLOOR_TABLE = "CREATE TABLE floor_messages (id TEXT PRIMARY KEY, body TEXT, message_id TEXT)"


def _post(client: httpx.Client, chunk: list[dict[str, Any]]) -> list[dict[str, str]]:
    answer: list[dict[str, str]] = client.post(
        "/api/CascadeMessage/send_message/async",
        content=orjson.dumps(chunk),
        headers={"Content-Type": "application/json"},
    ).json()
    return answer


def _floor_postgres(url: str, batch: list[dict[str, Any]], client: httpx.Client) -> float:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute(_FLOOR_TABLE)
        with conn.cursor().copy("COPY floor_messages (id, body) FROM STDIN") as copy:
            for m in batch:
                copy.write_row((m["id"], orjson.dumps(m).decode()))
        conn.commit()
        inserted = time.time()
        for start in range(0, len(batch), 1000):
            answer = _post(client, batch[start : start + 1000])
            conn.execute(
                "UPDATE floor_messages f SET message_id = v.m "
                "FROM unnest(%s::text[], %s::text[]) AS v(i, m) WHERE f.id = v.i",
                ([a["trackinId"] for a in answer], [a["messageId"] for a in answer]),
            )
            conn.commit()
    return inserted


def _floor_sqlite(url: str, batch: list[dict[str, Any]], client: httpx.Client) -> float:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(_FLOOR_TABLE))
        conn.execute(
            text("INSERT INTO floor_messages (id, body) VALUES (:id, :body)"),
            [{"id": m["id"], "body": orjson.dumps(m).decode()} for m in batch],
        )
    inserted = time.time()
    for start in range(0, len(batch), 1000):
        answer = _post(client, batch[start : start + 1000])
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE floor_messages SET message_id = :m WHERE id = :i"),
                [{"m": a["messageId"], "i": a["trackinId"]} for a in answer],
            )
    return inserted


def check_cost(sim: Simulator, n: int = 4000) -> list[str]:
    """Worker CPU per status check, httpx's own transport beside worker/provider/keepalive.py,
    on one thread and on 16, and the workers' own path: 16 under way from one thread
    (`StatusClient.status_all`). Client side only: the simulator has its own."""
    sim.admin("/_sim/reset", {})
    with httpx.Client(base_url=sim.url, headers={"X-Authorization-Key": API_KEY}) as poster:
        ids = [a["messageId"] for a in _post(poster, list(bench_messages(100, "cost")))]
    settings = Settings(SMSBAT_BASE_URL=sim.url, SMSBAT_API_KEY=API_KEY)  # type: ignore[call-arg]
    lines = []

    def cost_line(name: str, threads: int, check: Callable[[Iterator[str]], object]) -> str:
        """The median worker CPU per check over 5 rounds of `n`, as a line of the column."""
        samples = []
        for _ in range(5):
            cpu = time.process_time()
            check(ids[i % len(ids)] for i in range(n))
            samples.append((time.process_time() - cpu) / n * 1e6)
        return (
            f"  {name:22} {threads:2} thread(s): {statistics.median(samples):5.0f} µs "
            f"of CPU per check (median of 5 rounds of {n:,})"
        )

    for name, transport in (
        ("httpx HTTPTransport", httpx.HTTPTransport(limits=httpx.Limits(max_connections=16))),
        ("worker/provider/keepalive.py", KeepAliveTransport(httpx.URL(sim.url))),
    ):
        client = StatusClient(settings, transport=transport)
        for threads in (1, 16):
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(client.status, ids))
                status = client.status
                lines.append(
                    cost_line(name, threads, lambda batch, s=status: list(pool.map(s, batch)))
                )
        client.close()
    client = StatusClient(settings)  # the workers' path: checks under way from one thread
    with ThreadPoolExecutor(1) as pool:
        lines.append(
            cost_line(
                "status_all, 16 at once",
                1,
                lambda batch: list(
                    client.status_all(
                        batch,
                        width=16,
                        deadline=time.monotonic() + 300,
                        go_on=lambda: True,
                        threads=pool,
                    )
                ),
            )
        )
    client.close()
    return lines


# --- webhook intake ------------------------------------------------------------------------
#
# wrk (Debian's `wrk`) pushes to a `cascade api` over 64 connections, every request with a
# messageId of its own; a Celery worker (beat + the poll queue) applies what was stored.

WRK_SCRIPT = r"""
-- each thread numbers its own requests: messageIds <prefix>-<thread>-<n>, never repeated
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local n = 0
local path = os.getenv("WRK_PATH")
local prefix = os.getenv("WRK_PREFIX")
local batch = tonumber(os.getenv("WRK_BATCH") or "1")
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_TOKEN")
wrk.headers["Content-Type"] = "application/json"
function request()
  local parts = {}
  for i = 1, batch do
    n = n + 1
    local id = prefix .. "-" .. tid .. "-" .. n
    if batch == 1 then
      parts[i] = '{"messageId":"' .. id .. '","deliverystatus":"delivered",'
        .. '"timestamp":"2026-12-07T07:40:00.123Z","cost":0.0432}'
    else
      parts[i] = '{"status":"1","smsID":"' .. id .. '","price":"0.71",'
        .. '"date":"2612070740;2612070741"}'
    end
  end
  local body = parts[1]
  if batch > 1 then body = "[" .. table.concat(parts, ",") .. "]" end
  return wrk.format(nil, path, nil, body)
end
function done(summary, latency, requests)
  io.write(string.format("WRK requests=%d non2xx=%d errors=%d seconds=%.3f p50=%d p99=%d\n",
    summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    summary.duration / 1e6, latency:percentile(50), latency:percentile(99)))
end
"""
WRK_THREADS = 2
WRK_CONNECTIONS = 64


def run_wrk(url: str, path: str, prefix: str, batch: int, seconds: float, workdir: Path) -> dict:
    """One wrk run; its counts and latencies (ms) as parsed from the script's last line."""
    script = workdir / "intake.lua"
    script.write_text(WRK_SCRIPT)
    env = {
        **os.environ,
        "WRK_PATH": path,
        "WRK_PREFIX": prefix,
        "WRK_BATCH": str(batch),
        "WRK_TOKEN": WEBHOOK_TOKEN,
    }
    args = ["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNECTIONS), "-d", f"{seconds:g}s"]
    args += ["--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}{out.stderr}")
    found = dict(part.split("=") for part in line.split()[1:])
    return {
        "requests": int(found["requests"]),
        "non2xx": int(found["non2xx"]),
        "errors": int(found["errors"]),
        "seconds": float(found["seconds"]),
        "p50_ms": int(found["p50"]) / 1000,
        "p99_ms": int(found["p99"]) / 1000,
    }


def submitted_messages(url: str, prefix: str, per_thread: int) -> None:
    """Messages already with the provider, one per messageId wrk will push (threads 1..T)."""
    from worker.store.db import insert_rows, utcnow

    now = utcnow()
    rows = [
        {
            "id": f"{prefix}-{t}-{i}",
            "from_name": "Bench",
            "to_phone": "+380670000000",
            "message_type": "transaction",
            "route": "sms",
            "priority": 0,
            "state": "submitted",
            "created_at": now,
            "available_at": now,
            "attempts": 1,
            "unknown_outcomes": 0,
            "polls": 0,
            "provider_message_id": f"{prefix}-{t}-{i}",
            "submitted_at": now,
        }
        for t in range(1, WRK_THREADS + 1)
        for i in range(1, per_thread + 1)
    ]
    engine = get_engine(url)
    for start in range(0, len(rows), 50_000):
        with engine.begin() as conn:
            insert_rows(conn, messages, rows[start : start + 50_000])


def applied_latencies(url: str, prefix: str, settle: float) -> tuple[int, int, list[float]]:
    """(stored, applied, receipt→applied seconds of each applied report), once nothing
    matched is left unapplied or `settle` seconds passed."""
    from worker.store.models import provider_reports as reports

    engine = get_engine(url)
    ours = reports.c.provider_message_id.like(f"{prefix}-%")
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            waiting = conn.execute(
                select(func.count())
                .select_from(reports)
                .join(messages, messages.c.provider_message_id == reports.c.provider_message_id)
                .where(ours, reports.c.processed_at.is_(None))
            ).scalar_one()
        if not waiting:
            break
        time.sleep(0.5)
    with engine.connect() as conn:
        stored = conn.execute(select(func.count()).where(ours)).scalar_one()
        rows = conn.execute(
            select(reports.c.received_at, reports.c.processed_at).where(
                ours, reports.c.outcome == "applied"
            )
        ).all()
    return stored, len(rows), sorted((p - r).total_seconds() for r, p in rows)


def _quantile(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def run_intake(
    url: str, broker: str, logdir: Path, *, seconds: float, api_workers: int, rate_guess: int
) -> Result:
    """SMSBAT pushes (one report each) then BulkGate arrays of 100, each by wrk for `seconds`."""
    env = {
        "DATABASE_URL": url,
        "BROKER_URL": broker,
        "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "API_TOKEN": API_KEY,
        "SMSBAT_API_KEY": API_KEY,
    }
    prefix = f"in{uuid.uuid4().hex[:4]}"
    submitted_messages(url, prefix, int(rate_guess * seconds / WRK_THREADS) + 1000)
    result = Result(f"intake, {api_workers} API", 0)
    with workers(env, logdir) as group:
        group.start("intake0", beat=True, queues=[POLL_QUEUE])
        options = ["--workers", str(api_workers)] if api_workers != 1 else []
        api = start_api(logdir, group.env, extra=options)
        load = os.getloadavg()[0]
        pids = {"API": [api.process.popen.pid], "workers": [p.popen.pid for p in group.processes]}
        before = cpu_seconds(pids)
        pushed = run_wrk(api.url, "/webhooks/smsbat", prefix, 1, seconds, logdir)
        pushes_cpu = _spent(before, cpu_seconds(pids))
        load_after = os.getloadavg()[0]
        stored, applied, waits = applied_latencies(url, prefix, 60)
        before = cpu_seconds(pids)
        arrays = run_wrk(api.url, "/webhooks/bulkgate", prefix + "g", 100, seconds, logdir)
        arrays_cpu = _spent(before, cpu_seconds(pids))
        rss = peak_rss_mb([api.process.popen.pid])
        api.process.stop()
    ok = pushed["requests"] - pushed["non2xx"]
    reports = (arrays["requests"] - arrays["non2xx"]) * 100
    result.n = pushed["requests"]
    result.figures = {
        "pushes/s (answered 200)": ok / pushed["seconds"],
        "push latency p50 (ms)": pushed["p50_ms"],
        "push latency p99 (ms)": pushed["p99_ms"],
        "pushes refused or failed": pushed["non2xx"] + pushed["errors"],
        "pushes stored": stored,
        "pushes applied": applied,
        "receipt to applied p99 (s)": _quantile(waits, 0.99),
        **{
            f"push CPU: {kind} (us)": spent / max(ok, 1) * 1e6 for kind, spent in pushes_cpu.items()
        },
        "BulkGate reports/s (x100 arrays)": reports / arrays["seconds"],
        "BulkGate array p99 (ms)": arrays["p99_ms"],
        **{
            f"report CPU: {kind} (us)": spent / max(reports, 1) * 1e6
            for kind, spent in arrays_cpu.items()
        },
        "peak API RSS (MB, max)": max(rss) if rss else None,
        "load average at start": load,
        "load average after pushes": load_after,
    }
    result.rss = rss
    return result


def _spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {kind: after[kind] - before[kind] for kind in before}


def median_result(runs: list[Result]) -> Result:
    """Each figure's median over the runs (peak RSS: the largest)."""
    import statistics

    figures: dict[str, float | None] = {}
    for name in runs[0].figures:
        values = [r.figures[name] for r in runs if r.figures.get(name) is not None]
        figures[name] = statistics.median(values) if values else None
    rss = [max(mb for r in runs for mb in r.rss)] if any(r.rss for r in runs) else []
    name = runs[0].name + (f", median of {len(runs)}" if len(runs) > 1 else "")
    return Result(name, int(statistics.median(r.n for r in runs)), figures, rss)


# --- the table ---------------------------------------------------------------------------


def print_table(results: list[Result], meta: str) -> None:
    names = list(results[0].figures)
    header = f"{'':32}" + "".join(f"{r.name + f' (n={r.n:,})':>28}" for r in results)
    print(meta)
    print(header)
    for name in names:
        cells = []
        for r in results:
            value = r.figures.get(name)
            shown = (
                "-" if value is None else f"{value:,.4f}" if abs(value) < 10 else f"{value:,.1f}"
            )
            cells.append(f"{shown:>28}")
        print(f"{name:32}" + "".join(cells))
    for r in results:
        if r.rss:
            shown = ", ".join(f"{mb:.0f}" for mb in sorted(r.rss, reverse=True))
            print(f"peak RSS of each worker process, {r.name} (MB): {shown}")
    for r in results:
        if r.plan:
            print(f"status checks at launch, {r.name}: {r.plan}")
    by = {r.name: r.figures.get("send throughput (msg/s)") for r in results}
    if by.get("ours") and by.get("naive"):
        print(f"send throughput ours / naive: {by['ours'] / by['naive']:.1f}x")
    if by.get("ours") and by.get("floor"):
        print(f"send throughput ours / floor: {by['ours'] / by['floor']:.2f}")
    for kind in ("ours", "floor"):
        small, large = by.get(kind), by.get(f"{kind}, at scale")
        if small and large:
            sizes = {r.name: r.n for r in results}
            print(
                f"send throughput {kind} at {sizes[kind + ', at scale']:,} / at "
                f"{sizes[kind]:,}: {large / small:.2f}"
            )
    ends = {r.name: r.figures.get("end to end (msg/s)") for r in results}
    for name in ("ours", "ours, overlapped"):
        if ends.get(name) and ends.get("floor"):
            print(f"end to end {name} / floor: {ends[name] / ends['floor']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument(
        "--scale",
        type=int,
        default=None,
        help="also send this many (ours until sent, and the floor): sending flat with size",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2 pool each)")
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--naive-n", type=int, default=None, help="default: min(n, 20000)")
    parser.add_argument("--naive-timeout", type=float, default=1800)
    parser.add_argument("--webhooks-n", type=int, default=None, help="default: min(n, 20000)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["ours", "naive", "floor", "webhooks", "overlapped", "check-cost", "intake"],
    )
    parser.add_argument("--intake-seconds", type=float, default=10, help="per wrk run")
    parser.add_argument("--intake-api-workers", type=int, default=1, help="cascade api --workers")
    parser.add_argument("--intake-runs", type=int, default=3, help="the table shows medians")
    parser.add_argument(
        "--intake-rate", type=int, default=10_000, help="pushes/s to have messages ready for"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on our workers; prints where time went"
    )
    parser.add_argument("--check-n", type=int, default=4000, help="checks per check-cost round")
    parser.add_argument("--delay-min", type=float, default=5.0)
    parser.add_argument("--delay-max", type=float, default=30.0)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="a Redis DB of its own (flushed)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
    redis.Redis.from_url(args.broker).flushdb()
    sim = start_simulator(
        workdir,
        "--delay-min",
        str(args.delay_min),
        "--delay-max",
        str(args.delay_max),
        api_key=API_KEY,
    )
    results: list[Result] = []
    costs: list[str] = []
    intake: Result | None = None
    urls: list[str] = []
    try:
        url = new_database(args.db, workdir)
        urls.append(url)
        if "ours" not in args.skip:
            results.append(
                run_ours(args.n, args.workers, url, args.broker, sim, workdir, profile=args.profile)
            )
        if "overlapped" not in args.skip:
            sim.admin("/_sim/reset", {})
            reset_broker(args.broker)
            overlapped = new_database(args.db, workdir)
            urls.append(overlapped)
            results.append(
                run_ours(args.n, args.workers, overlapped, args.broker, sim, workdir, overlap=True)
            )
        if "webhooks" not in args.skip:
            sim.admin("/_sim/reset", {})
            reset_broker(args.broker)
            hooked = new_database(args.db, workdir)
            urls.append(hooked)
            hooked_n = args.webhooks_n or min(args.n, 20_000)
            results.append(
                run_ours(hooked_n, args.workers, hooked, args.broker, sim, workdir, webhooks=True)
            )
            sim.configure(webhook_url=None)
        if "naive" not in args.skip:
            sim.admin("/_sim/reset", {})
            reset_broker(args.broker)
            naive_n = args.naive_n or min(args.n, 20_000)
            results.append(
                run_naive(naive_n, args.workers, url, args.broker, sim, workdir, args.naive_timeout)
            )
        if "floor" not in args.skip:
            sim.admin("/_sim/reset", {})
            results.append(run_floor(args.n, url, sim))
        if args.scale:
            sim.admin("/_sim/reset", {})
            reset_broker(args.broker)
            scaled = new_database(args.db, workdir)
            urls.append(scaled)
            results.append(
                run_ours(
                    args.scale,
                    args.workers,
                    scaled,
                    args.broker,
                    sim,
                    workdir,
                    until_sent=True,
                    name="ours, at scale",
                )
            )
            if "floor" not in args.skip:
                sim.admin("/_sim/reset", {})
                results.append(run_floor(args.scale, scaled, sim, "floor, at scale"))
            drop_database(scaled)
        if "check-cost" not in args.skip:
            costs = check_cost(sim, args.check_n)
        if "intake" not in args.skip and shutil.which("wrk") is None:
            print("webhook intake column skipped: wrk is not installed (apt-get install wrk)")
        elif "intake" not in args.skip:
            runs = []
            for _ in range(args.intake_runs):
                redis.Redis.from_url(args.broker).flushdb()
                intake_url = new_database(args.db, workdir)
                urls.append(intake_url)
                runs.append(
                    run_intake(
                        intake_url,
                        args.broker,
                        workdir,
                        seconds=args.intake_seconds,
                        api_workers=args.intake_api_workers,
                        rate_guess=args.intake_rate,
                    )
                )
                drop_database(intake_url)
            intake = median_result(runs)
            for i, run in enumerate(runs, 1):
                f = run.figures
                print(
                    f"intake run {i}: {f['pushes/s (answered 200)']:,.0f} pushes/s, p99 "
                    f"{f['push latency p99 (ms)']:.0f} ms, applied p99 "
                    f"{f['receipt to applied p99 (s)'] or float('nan'):.2f} s, BulkGate "
                    f"{f['BulkGate reports/s (x100 arrays)']:,.0f} reports/s, "
                    f"load average {f['load average at start']:.2f} -> "
                    f"{f['load average after pushes']:.2f}"
                )
    finally:
        sim.process.stop()
        for url in urls:
            drop_database(url)
    meta = (
        f"cascade bench: db={args.db} workers={args.workers}x2 deliveries {args.delay_min:g}-"
        f"{args.delay_max:g}s, {os.cpu_count()} cores"
    )
    if results:
        print_table(results, meta)
    if costs:
        print("status check cost:")
        print("\n".join(costs))
    if intake is not None:
        print_table([intake], meta + f", webhook intake: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}")
    if args.profile:
        print("where our workers spent their samples (inclusive), sending and polling:")
        print("\n".join(profile_summary(workdir)))
    shutil.rmtree(workdir)  # kept only when the run failed, for its logs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
