"""Start the simulator and real Celery worker processes on this machine.

Used by `cascade demo`, the integration tests and the benchmark: each runs the same
processes a deployment runs, over real sockets, so what they show is what users get.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: object, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # not up yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.log.close()


def spawn(name: str, args: list[str], env: Mapping[str, str], logdir: Path) -> Process:
    log = (logdir / f"{name}.log").open("ab")
    popen = subprocess.Popen(
        args, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Process(name, popen, log)


@dataclass
class Simulator:
    url: str
    process: Process

    def admin(self, path: str, json: object | None = None) -> object:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            response = client.post(path, json=json) if json is not None else client.get(path)
            response.raise_for_status()
            return response.json()

    def configure(self, **changes: object) -> object:
        return self.admin("/_sim/config", changes)

    def stats(self) -> dict[str, object]:
        return self.admin("/_sim/stats")  # type: ignore[return-value]


def start_simulator(logdir: Path, *options: str, api_key: str = "test-key") -> Simulator:
    port = free_port()
    args = [sys.executable, "-m", "worker.cli", "simulator", "--port", str(port)]
    process = spawn("simulator", [*args, "--api-key", api_key, *options], os.environ, logdir)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/_sim/health").status_code == 200, 20, "simulator")
    return Simulator(url, process)


@dataclass
class Workers:
    env: dict[str, str]
    logdir: Path
    processes: list[Process] = field(default_factory=list)

    def start(
        self,
        name: str = "worker",
        *,
        beat: bool = True,
        concurrency: int = 2,
        queues: Sequence[str] = (),
    ) -> Process:
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "-l",
            "info",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        if beat:
            args += ["-B", "--schedule", str(self.logdir / f"{name}-beat-schedule")]
        if queues:
            args += ["-Q", ",".join(queues)]
        process = spawn(name, args, self.env, self.logdir)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes.clear()


@contextmanager
def workers(env: Mapping[str, str], logdir: Path | None = None) -> Iterator[Workers]:
    directory = Path(logdir or tempfile.mkdtemp(prefix="cascade-"))
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    group = Workers(full_env, directory)
    try:
        yield group
    finally:
        group.stop()


@dataclass
class Api:
    url: str
    process: Process


def start_api(logdir: Path, env: Mapping[str, str], name: str = "api") -> Api:
    """`cascade api` on a free port, up once /healthz answers at all: a 503 (a broker
    down on purpose) is an API that serves."""
    port = free_port()
    args = [sys.executable, "-m", "worker.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    process = spawn(name, args, {**os.environ, **env}, logdir)
    url = f"http://127.0.0.1:{port}"

    def answered_or_exited() -> bool:
        if process.popen.poll() is not None:
            return True
        return httpx.get(url + "/healthz", timeout=5).status_code in (200, 503)

    wait_for(answered_or_exited, 30, name)
    if process.popen.poll() is not None:
        process.stop()
        raise RuntimeError(f"{name} exited with code {process.popen.returncode}: see {logdir}")
    return Api(url, process)
