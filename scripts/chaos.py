"""Chaos campaign: N messages through real workers while processes, Redis, PostgreSQL and
the provider misbehave; then check that nothing was lost, duplicated unnoticed or over-polled.

    .venv/bin/python scripts/chaos.py [--n 50000] [--db postgresql|sqlite] [--mode local|netns]
                                      [--duration 60] [--kill-every 4] [--json]

What runs: a private PostgreSQL cluster (initdb on a free port; the machine's shared one is
never restarted), a private redis-server (no persistence) unless `--broker URL` names a
Redis DB of its own, the simulator, and two `celery -A worker worker` processes (beat in the
first). During the fault phase (`--duration` seconds after the messages are enqueued):

- a worker is SIGKILLed every `--kill-every` seconds (± 50 %, so kills land mid-claim,
  mid-HTTP and mid-update) and started again;
- Redis is killed and restarted once (empty: no persistence), later FLUSHALLed once;
- PostgreSQL is restarted once (`pg_ctl restart -m immediate`: a crash to every client);
- the simulator answers 5xx to `--error-rate` of requests, 429 storms with Retry-After,
  2 s latency spikes, connection resets, cut-off JSON 200s, and answers missing trackinIds;
  it refuses `--refused` of the numbers with a whole-batch 400 that names no index (as
  SMSBAT's does), and goes down for `--outage` seconds once (503 to every send);
- `--mode netns`: the two workers run in network namespaces of their own, reaching the
  services over veth pairs, and the second host is cut off (`ip link set … down`) mid-run,
  so its claims must be taken over by the sweeper when their leases run out.

Invariants (exit code 1 if any fails): every accepted message final; exactly the refused
numbers `rejected` (INVALID_PHONE), no other message rejected or failed; every trackinId the
provider accepted more than once has `unknown_outcomes > 0` (and so has every send whose
answer the simulator dropped on purpose); no poll within 1 s of the previous one of a
message; no poll after a final answer the worker could have recorded. A final answer read by
a task that a fault then killed before its commit cannot be recorded: the next poll after
the lease is counted, and attributed to that fault when the final answer was given at most
`--explain-window` seconds before the fault (a poll task finishes within that time).
Those are printed as explained; any other is a failure. (The simulator counts a poll as
after-final only when its previous answer was a final the client could read: not after a
5xx, a reset or a cut-off answer.)
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from worker.core.states import FINAL, journal_allows  # noqa: E402
from worker.dev.stack import (  # noqa: E402
    PrivatePostgres,
    PrivateRedis,
    Simulator,
    Workers,
    start_simulator,
    workers,
)
from worker.flows.producer import enqueue  # noqa: E402
from worker.store.db import get_engine  # noqa: E402
from worker.store.migrate import upgrade_database  # noqa: E402
from worker.store.models import events, messages  # noqa: E402

API_KEY = "chaos-key"
# Short timings so leases run out and polls come due within a short run.
WORKER_ENV = {
    "SMSBAT_API_KEY": API_KEY,
    "POLL_FIRST_DELAY_SECONDS": "1",
    "POLL_MAX_INTERVAL_SECONDS": "2",
    "POLL_SWEEP_INTERVAL_SECONDS": "0.5",
    # --poll-batch checks in one wave per poll task: about one request's worst case (4 s
    # timeout), well inside the lease (200 at once on 2 loaded cores once took 11.6 s).
    "POLL_LEASE_SECONDS": "15",
    "DISPATCH_INTERVAL_SECONDS": "0.5",
    "SWEEP_INTERVAL_SECONDS": "1",
    "SEND_LINGER_SECONDS": "0.2",
    "SEND_BACKOFF_BASE_SECONDS": "0.2",
    "SEND_BACKOFF_MAX_SECONDS": "1",
    "SEND_LEASE_SECONDS": "12",
    "SEND_BATCH_MIN": "20",
    "CIRCUIT_OPEN_SECONDS": "2",
    # Kills every few seconds lose many answers: resend rather than fail (the invariant).
    "SEND_MAX_UNKNOWN_OUTCOMES": "10",
    "HTTP_CONNECT_TIMEOUT_SECONDS": "2",
    "HTTP_READ_TIMEOUT_SECONDS": "4",
}


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- network namespaces ------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@dataclass
class Host:
    """A worker host: a network namespace joined to this machine by a veth pair."""

    name: str
    host_if: str
    addr_host: str  # this machine's end: where the services are reached
    addr_ns: str

    @property
    def wrap(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def create(self) -> None:
        peer = self.host_if + "p"
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.name)
        _ip("addr", "add", f"{self.addr_host}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.addr_ns}/30", "dev", peer)
        _ip("-n", self.name, "link", "set", peer, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def destroy(self) -> None:
        _ip("link", "del", self.host_if, check=False)  # removes its peer too
        _ip("netns", "del", self.name, check=False)


def make_hosts(count: int) -> list[Host]:
    """Namespaces and /30 subnets named after this process, so concurrent runs never clash."""
    tag = os.getpid() % 60000
    pool = ipaddress.ip_network("10.64.0.0/10")
    hosts = []
    for i in range(count):
        index = (tag * count + i) % 2 ** (30 - pool.prefixlen)
        subnet = ipaddress.ip_network((int(pool.network_address) + index * 4, 30))
        ours, theirs = list(subnet.hosts())
        hosts.append(Host(f"cascade-chaos-{tag}-{i}", f"cx{tag}h{i}", str(ours), str(theirs)))
    return hosts


# --- the run -----------------------------------------------------------------------------


@dataclass
class Faults:
    """What was done, and when (unix time), for the report and for attributing polls."""

    kills: list[tuple[float, str]] = field(default_factory=list)
    windows: list[tuple[float, float, str]] = field(default_factory=list)  # (from, to, what)
    done: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    settings: Settings
    simulator: Simulator
    group: Workers
    hosts: list[Host]
    broker: PrivateRedis | None
    postgres: PrivatePostgres | None
    faults: Faults = field(default_factory=Faults)
    stop: threading.Event = field(default_factory=threading.Event)

    def start_worker(self, index: int) -> None:
        """Worker `w<index>`, beat in w0; on a host it reaches the services on its veth."""
        if not self.hosts:
            self.group.start(f"w{index}", beat=index == 0)
            return
        host = self.hosts[index]
        env = {
            key: self.group.env[key].replace("127.0.0.1", host.addr_host)
            for key in ("DATABASE_URL", "BROKER_URL", "SMSBAT_BASE_URL")
        }
        self.group.start(f"w{index}", beat=index == 0, wrap=host.wrap, env=env)

    def kill_worker(self, index: int) -> None:
        name = f"w{index}"
        for process in list(self.group.processes):
            if process.name == name:
                process.stop(signal.SIGKILL)
                self.group.processes.remove(process)
        self.faults.kills.append((time.time(), name))
        self.start_worker(index)


def refused_phones(n: int, count: int) -> list[str]:
    """`count` numbers spread over the campaign, so refusals land in many batches."""
    step = max(1, n // count) if count else 0
    return [phone(i) for i in range(step // 2, n, step)][:count] if count else []


def simulator_faults(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "reject_phones": refused_phones(args.n, args.refused),
        "refusal_hints": False,
        "error_rate": args.error_rate,
        "spike_rate": args.spike_rate,
        "spike_seconds": 2.0,
        "reset_rate": args.reset_rate,
        "malformed_rate": args.malformed_rate,
        "drop_answers": args.drop_answers,
        "retry_after": "1",
        "delay_min": args.delay_min,
        "delay_max": args.delay_max,
    }


def fault_schedule(run: Run) -> list[tuple[float, str, Callable[[], None]]]:
    """One-off faults at fixed shares of the fault phase; kills run beside them."""
    args, sim = run.args, run.simulator
    duration = args.duration

    def hung_send() -> None:  # above HTTP_READ_TIMEOUT_SECONDS: the answer is lost for sure
        sim.configure(hang_next_sends=1, hang_seconds=6.0)

    def storm() -> None:
        sim.configure(throttle_next=args.storm, status_throttle_next=args.storm)

    def outage() -> None:
        begin = time.time()
        sim.configure(outage_seconds=args.outage)
        run.faults.windows.append((begin, begin + args.outage, "provider outage"))

    def redis_restart() -> None:
        begin = time.time()
        if run.broker is not None:
            run.broker.restart(down_for=2.0)
            run.faults.windows.append((begin, time.time(), "redis restart"))

    def redis_flush() -> None:
        client = redis.Redis.from_url(run.settings.broker_url, socket_timeout=5)
        if run.broker is not None:
            client.flushall()
        else:
            client.flushdb()  # a shared server: only our own DB
        run.faults.windows.append((time.time(), time.time(), "redis flush"))

    def postgres_restart() -> None:
        begin = time.time()
        if run.postgres is not None:
            run.postgres.restart("immediate")
            run.faults.windows.append((begin, time.time(), "postgres restart"))

    def cut() -> None:
        run.hosts[1].cut()
        run.faults.windows.append((time.time(), float("inf"), f"{run.hosts[1].name} cut off"))

    plan = [
        (0.0, "hung send", hung_send),
        (0.15 * duration, "429 storm", storm),
        (0.3 * duration, "redis restart", redis_restart),
        (0.55 * duration, "redis flushall", redis_flush),
        (0.6 * duration, "429 storm", storm),
        (0.65 * duration, "provider outage", outage),
        (0.75 * duration, "postgres restart", postgres_restart),
    ]
    if run.broker is None:
        plan = [p for p in plan if p[1] != "redis restart"]
    if run.postgres is None:
        plan = [p for p in plan if p[1] != "postgres restart"]
    if run.hosts:
        plan.append((0.4 * duration, "host cut off", cut))
    return sorted(plan, key=lambda p: p[0])


def inject(run: Run) -> None:
    """The fault phase: the one-off faults in order, a worker SIGKILL every few seconds."""
    rng = random.Random(run.args.seed)
    began = time.monotonic()
    plan = fault_schedule(run)
    next_kill = began + rng.uniform(0.5, 1.5) * run.args.kill_every
    reachable = [0] if run.hosts else [0, 1]
    while not run.stop.is_set():
        now = time.monotonic()
        if now - began >= run.args.duration:
            break
        try:
            if plan and now - began >= plan[0][0]:
                _, what, action = plan.pop(0)
                log(what)
                action()
                run.faults.done.append(what)
                if what == "host cut off":
                    reachable = [0]
            elif run.args.kill_every and now >= next_kill:
                index = rng.choice(reachable)
                run.kill_worker(index)
                next_kill = now + rng.uniform(0.5, 1.5) * run.args.kill_every
        except Exception as exc:  # a fault that could not be applied is a failed run
            run.faults.errors.append(f"{type(exc).__name__}: {exc}")
            log(f"fault failed: {exc!r}")
        run.stop.wait(0.05)


def phone(i: int) -> str:
    return f"+38067{i % 10_000_000:07d}"


def chaos_messages(n: int, prefix: str) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {
            "id": f"{prefix}-{i}",
            "fromName": "Chaos",
            "toPhone": phone(i),
            "messageType": "transaction" if i % 3 else "promo",
            "text": f"Your code is {i % 1_000_000:06d}",
        }


def launch(run: Run, chunk: int = 1000) -> int:
    """Enqueue in chunks, retrying a chunk the faults interrupted: a re-enqueue is a no-op
    that answers `duplicate` for what the interrupted attempt stored, so nothing doubles."""
    batch = list(chaos_messages(run.args.n, "chaos"))
    stored = 0
    for start in range(0, len(batch), chunk):
        part = batch[start : start + chunk]
        for attempt in range(240):
            try:
                results = enqueue(part, "chaos", settings=run.settings)
                break
            except Exception as exc:  # PostgreSQL or Redis restarting under us
                if attempt == 239:
                    raise
                log(f"enqueue retry: {type(exc).__name__}")
                time.sleep(0.5)
        stored += sum(r.status in ("accepted", "duplicate") for r in results)
    return stored


def final_count(run: Run) -> int:
    try:
        with get_engine(run.settings.database_url).connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(messages.c.state.in_([str(s) for s in FINAL]))
                ).scalar_one()
            )
    except Exception:  # PostgreSQL restarting
        return -1


def campaign(run: Run) -> dict[str, Any]:
    """Launch, inject faults, wait for all-final; answer the raw figures."""
    args = run.args
    for index in (0, 1):
        run.start_worker(index)
    time.sleep(3)  # let the workers connect before the clock starts
    started = time.time()
    injector = threading.Thread(target=inject, args=(run,), daemon=True)
    injector.start()  # faults from the first send on
    accepted = launch(run)
    log(f"enqueued {accepted} in {time.time() - started:.1f}s; faults for {args.duration:g}s")
    deadline = time.monotonic() + args.duration + args.timeout
    final, reported = 0, 0.0
    while time.monotonic() < deadline:
        final = final_count(run)
        if final >= accepted and not injector.is_alive():
            break
        if time.monotonic() - reported > 10:
            log(f"final {final}/{accepted}")
            reported = time.monotonic()
        time.sleep(0.5)
    all_final_at = time.time() if final >= accepted else None
    run.stop.set()
    injector.join()
    return {"accepted": accepted, "started": started, "all_final_at": all_final_at}


def explained(at: float, faults: Faults, window: float) -> str | None:
    """The fault that can explain a final answer given at `at` and not recorded."""
    for killed_at, name in faults.kills:
        if killed_at - window <= at <= killed_at:
            return f"kill {name}"
    for begin, end, what in faults.windows:
        if begin - window <= at <= end + window:
            return what
    return None


def check(run: Run, launched: dict[str, Any]) -> dict[str, Any]:
    """Read the database and the simulator; answer the figures and the failed invariants."""
    args, sim = run.args, run.simulator
    engine = get_engine(run.settings.database_url)
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                select(
                    messages.c.id,
                    messages.c.state,
                    messages.c.unknown_outcomes,
                    messages.c.to_phone,
                    messages.c.error_code,
                )
            )
        }
        slowest = [
            {k: str(v) for k, v in r._mapping.items()}
            for r in conn.execute(
                select(
                    messages.c.id,
                    messages.c.state,
                    messages.c.attempts,
                    messages.c.unknown_outcomes,
                    messages.c.polls,
                    messages.c.created_at,
                    messages.c.submitted_at,
                    messages.c.final_at,
                )
                .order_by(messages.c.final_at.desc().nulls_first())
                .limit(3)
            )
        ]
        takeovers = conn.execute(
            select(func.count()).where(events.c.detail == "claim lease expired; outcome unknown")
        ).scalar_one()
        moves = conn.execute(
            select(events.c.source, events.c.from_state, events.c.to_state, func.count()).group_by(
                events.c.source, events.c.from_state, events.c.to_state
            )
        ).all()
    refused = set(refused_phones(args.n, args.refused))
    wrongly_rejected = [
        r.id for r in rows.values() if r.state == "rejected" and r.to_phone not in refused
    ]
    refused_not_rejected = [
        r.id
        for r in rows.values()
        if r.to_phone in refused and (r.state, r.error_code) != ("rejected", "INVALID_PHONE")
    ]
    failed = [r.id for r in rows.values() if r.state == "failed"]
    forbidden = {f"{s}: {a} -> {b}": n for s, a, b, n in moves if not journal_allows(s, a, b)}
    states: dict[str, int] = {}
    for row in rows.values():
        states[str(row.state)] = states.get(str(row.state), 0) + 1
    final_states = {str(s) for s in FINAL}
    lost = args.n - sum(n for s, n in states.items() if s in final_states)
    stats = sim.stats()
    dups: dict[str, Any] = sim.admin("/_sim/duplicates")  # type: ignore[assignment]
    unnoticed = [t for t in dups["duplicated"] if t not in rows or rows[t].unknown_outcomes < 1]
    unrecorded_lost = [
        t for t in dups["answer_lost"] if t not in rows or rows[t].unknown_outcomes < 1
    ]
    anomalies: list[dict[str, Any]] = sim.admin("/_sim/poll_anomalies")  # type: ignore[assignment]
    after_final = [a for a in anomalies if a["kind"] == "after_final"]
    per_message: dict[str, int] = {}
    for anomaly in after_final:
        per_message[anomaly["trackinId"]] = per_message.get(anomaly["trackinId"], 0) + 1
    repeated = sum(1 for n in per_message.values() if n > 1)
    causes: dict[str, int] = {}
    unexplained_after_final = 0
    for anomaly in after_final:
        cause = explained(anomaly["final_seen_at"], run.faults, args.explain_window)
        if cause is None:
            unexplained_after_final += 1
        else:
            key = cause.split(" ")[0] if cause.startswith("kill") else cause
            causes[key] = causes.get(key, 0) + 1
    end = launched["all_final_at"]
    figures = {
        "n": args.n,
        "db": args.db,
        "mode": args.mode,
        "accepted": launched["accepted"],
        "states": dict(sorted(states.items())),
        "lost": lost,
        "duplicate_tracking_ids": stats["duplicate_tracking_ids"],
        "duplicates_without_unknown_outcome": len(unnoticed),
        "answers_lost_by_simulator": len(dups["answer_lost"]),
        "answers_lost_not_recorded_unknown": len(unrecorded_lost),
        "unknown_outcome_messages": sum(1 for r in rows.values() if r.unknown_outcomes > 0),
        "polls_after_final": stats["polls_after_final"],
        "polls_after_final_explained": causes,
        "polls_after_final_unexplained": unexplained_after_final,
        "messages_polled_after_final_twice": repeated,
        "polls_within_1s": stats["polls_within_1s"],
        "polls_within_1s_sample": [a for a in anomalies if a["kind"] == "within_1s"][:10],
        "refused_numbers": len(refused),
        "rejected_not_refused": len(wrongly_rejected),
        "refused_not_rejected": len(refused_not_rejected),
        "failed": len(failed),
        "send_400s": stats["send_status"].get("400", 0),
        "sweeper_takeovers": takeovers,
        "journal_moves_not_allowed": forbidden,
        "time_to_all_final_s": round(end - launched["started"], 1) if end else None,
        "faults": {
            "kills": len(run.faults.kills),
            "one_off": run.faults.done,
            "errors": run.faults.errors,
        },
        "simulator": {
            k: stats[k]
            for k in (
                "send_requests",
                "send_status",
                "status_requests",
                "status_by_code",
                "messages_accepted",
                "messages_dropped",
                "latency_spikes",
                "connection_resets",
                "malformed_answers",
                "answers_lost",
            )
        },
        "slowest": slowest,
        "logs": str(run.workdir),
    }
    failures = []
    if launched["accepted"] != args.n:
        failures.append(f"only {launched['accepted']} of {args.n} accepted")
    if lost:
        failures.append(f"{lost} messages not final")
    if wrongly_rejected or refused_not_rejected:
        failures.append(
            f"rejections not the refused numbers: {len(wrongly_rejected)} rejected wrongly,"
            f" {len(refused_not_rejected)} refused but not rejected"
        )
    if failed:
        failures.append(f"{len(failed)} messages failed, e.g. {failed[:3]}")
    if unnoticed:
        failures.append(f"{len(unnoticed)} duplicated trackinIds without an unknown outcome")
    if unrecorded_lost:
        failures.append(f"{len(unrecorded_lost)} lost answers not recorded as unknown")
    if unexplained_after_final:
        failures.append(f"{unexplained_after_final} polls after a final answer")
    if len(after_final) < stats["polls_after_final"]:
        failures.append("poll anomaly log overflowed: polls after final not all attributed")
    if stats["polls_within_1s"]:
        failures.append(f"{stats['polls_within_1s']} polls within 1 s")
    if forbidden:
        failures.append(f"moves the state machine forbids in the journal: {forbidden}")
    if run.faults.errors:
        failures.append(f"{len(run.faults.errors)} faults could not be applied")
    expected = {"hung send", "429 storm", "redis flushall", "provider outage"}
    expected |= {"redis restart"} if run.broker else set()
    expected |= {"postgres restart"} if run.postgres else set()
    expected |= {"host cut off"} if run.hosts else set()
    if missing := expected - set(run.faults.done):
        failures.append(f"faults not applied: {sorted(missing)}")
    figures["failures"] = failures
    figures["ok"] = not failures
    return figures


def print_figures(figures: dict[str, Any]) -> None:
    lines = [
        f"cascade chaos: n={figures['n']:,} db={figures['db']} mode={figures['mode']}",
        f"  messages accepted              {figures['accepted']:,}",
        f"  final states                   {figures['states']}",
        f"  messages lost (must be 0)      {figures['lost']}",
        f"  trackinIds accepted twice+     {figures['duplicate_tracking_ids']:,}"
        f" (without an unknown outcome, must be 0: "
        f"{figures['duplicates_without_unknown_outcome']})",
        f"  answers lost on purpose        {figures['answers_lost_by_simulator']:,}"
        f" (not recorded as unknown, must be 0: "
        f"{figures['answers_lost_not_recorded_unknown']})",
        f"  polls after a final answer     {figures['polls_after_final']}"
        f" (unexplained, must be 0: {figures['polls_after_final_unexplained']};"
        f" explained by {figures['polls_after_final_explained']})",
        f"  messages re-polled twice       {figures['messages_polled_after_final_twice']}"
        " (a final answer lost to two faults)",
        f"  polls within 1 s (must be 0)   {figures['polls_within_1s']}"
        + (f" e.g. {figures['polls_within_1s_sample'][:3]}" if figures["polls_within_1s"] else ""),
        f"  refused numbers                {figures['refused_numbers']}"
        f" (rejected wrongly, must be 0: {figures['rejected_not_refused']};"
        f" refused, not rejected, must be 0: {figures['refused_not_rejected']};"
        f" requests refused: {figures['send_400s']})",
        f"  failed (must be 0)             {figures['failed']}",
        f"  sweeper takeovers              {figures['sweeper_takeovers']:,}",
        f"  journal moves not allowed      {figures['journal_moves_not_allowed'] or 0} (must be 0)",
        f"  time to all-final              {figures['time_to_all_final_s']} s",
        f"  faults                         {figures['faults']}",
        f"  simulator                      {figures['simulator']}",
        f"  logs                           {figures['logs']}",
        "  result                         "
        + ("OK" if figures["ok"] else "FAILED: " + "; ".join(figures["failures"])),
    ]
    print("\n".join(lines), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--mode", choices=["local", "netns"], default="local")
    parser.add_argument("--duration", type=float, default=60.0, help="fault phase (s)")
    parser.add_argument("--kill-every", type=float, default=6.0, help="mean s between kills")
    parser.add_argument("--timeout", type=float, default=2400.0, help="s after the faults")
    parser.add_argument(
        "--broker",
        default="private",
        help="'private' (a redis-server of its own, restarted once) or a Redis DB URL of "
        "its own, e.g. redis://127.0.0.1:6379/14 (flushed; no restart)",
    )
    parser.add_argument("--batch", type=int, default=200, help="SEND_BATCH_MAX: more sends")
    parser.add_argument(
        "--poll-batch", type=int, default=50, help="POLL_BATCH_SIZE = POLL_CONCURRENCY"
    )
    parser.add_argument("--error-rate", type=float, default=0.2)
    parser.add_argument("--spike-rate", type=float, default=0.02)
    parser.add_argument("--reset-rate", type=float, default=0.02)
    parser.add_argument("--malformed-rate", type=float, default=0.02)
    parser.add_argument("--drop-answers", type=float, default=0.01)
    parser.add_argument("--storm", type=int, default=8, help="429s per storm (sends, status)")
    parser.add_argument("--refused", type=int, default=25, help="numbers the provider refuses")
    parser.add_argument("--outage", type=float, default=10.0, help="s of 503 to every send")
    parser.add_argument("--delay-min", type=float, default=1.0)
    parser.add_argument("--delay-max", type=float, default=5.0)
    parser.add_argument(
        "--explain-window",
        type=float,
        default=5.0,
        help="a poll task's longest life (s): one wave of checks, 4 s timeouts, the commit",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.mode == "netns" and args.broker != "private":
        parser.error("--mode netns needs --broker private (bound where namespaces reach it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cascade-chaos-"))
    cleanups: list[Callable[[], None]] = []

    def cleanup() -> None:
        while cleanups:
            try:
                cleanups.pop()()
            except Exception as exc:
                log(f"cleanup: {exc!r}")

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        hosts: list[Host] = []
        if args.mode == "netns":
            hosts = make_hosts(2)
            for host in hosts:
                cleanups.append(host.destroy)
                host.create()
        listen = "0.0.0.0" if hosts else "127.0.0.1"
        # Each host reaches the services on its own veth address; this process uses loopback.
        broker: PrivateRedis | None = None
        if args.broker == "private":
            broker = PrivateRedis(workdir, host=listen)
            broker.start()
            cleanups.append(broker.stop)
            broker_url = f"redis://127.0.0.1:{broker.port}/0"
        else:
            broker_url = args.broker
            redis.Redis.from_url(broker_url).flushdb()
        postgres: PrivatePostgres | None = None
        if args.db == "postgresql":
            postgres = PrivatePostgres(listen=listen)
            cleanups.append(postgres.destroy)
            postgres.start()
            name = f"cascade_chaos_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            database_url = postgres.url(name)
        else:
            database_url = f"sqlite:///{workdir / 'chaos.db'}"
        upgrade_database(database_url)
        simulator = start_simulator(workdir, api_key=API_KEY, host=listen)
        cleanups.append(simulator.process.stop)
        simulator.configure(**simulator_faults(args))
        env = {
            **WORKER_ENV,
            "SEND_BATCH_MAX": str(args.batch),
            "POLL_BATCH_SIZE": str(args.poll_batch),
            "POLL_CONCURRENCY": str(args.poll_batch),
            "DATABASE_URL": database_url,
            "BROKER_URL": broker_url,
            "SMSBAT_BASE_URL": simulator.url,
        }
        settings = Settings(**env)  # type: ignore[arg-type]
        with workers(env, workdir) as group:
            run = Run(args, workdir, settings, simulator, group, hosts, broker, postgres)
            launched = campaign(run)
            group.stop()
            figures = check(run, launched)
    finally:
        cleanup()
    if figures["ok"]:  # a failed run keeps its logs to be read; a passing one leaves nothing
        shutil.rmtree(workdir)
        figures["logs"] = "removed (the run passed)"
    if args.json:
        print(json.dumps(figures, default=str), flush=True)
    else:
        print_figures(figures)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
