"""Start the simulator and real Celery worker processes on this machine.

Used by `cascade demo`, the integration tests and the benchmark: each runs the same
processes a deployment runs, over real sockets, so what they show is what users get.
"""

from __future__ import annotations

import glob
import os
import shutil
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

ROOT = Path(__file__).resolve().parents[2]  # the checkout: worker/dev/stack.py


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


def start_simulator(
    logdir: Path,
    *options: str,
    api_key: str = "test-key",
    host: str = "127.0.0.1",
    advertise: str = "127.0.0.1",
) -> Simulator:
    """`cascade simulator` on a free port; `host` is what it binds, `advertise` its URL's host
    (a worker in a network namespace reaches it over a veth address, not loopback)."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "worker.ops.cli",
        "simulator",
        "--host",
        host,
        "--port",
        str(port),
    ]
    process = spawn("simulator", [*args, "--api-key", api_key, *options], os.environ, logdir)
    url = f"http://{advertise}:{port}"
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
        wrap: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """A `celery -A worker worker`: on `queues` only (default all); `wrap` prefixes the
        command (`ip netns exec NS`) and `env` overrides the group's environment for this
        process only."""
        args = [
            *wrap,
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
        process = spawn(name, args, {**self.env, **(env or {})}, self.logdir)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes.clear()


@contextmanager
def workers(env: Mapping[str, str], logdir: Path | None = None) -> Iterator[Workers]:
    """Without `logdir`, the logs go to a temporary directory removed after a clean exit
    (kept when the block raised, so its logs can be read)."""
    directory = Path(logdir or tempfile.mkdtemp(prefix="cascade-"))
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    group = Workers(full_env, directory)
    try:
        yield group
    finally:
        group.stop()
    if logdir is None:
        shutil.rmtree(directory)


@dataclass
class Api:
    url: str
    process: Process


def start_api(
    logdir: Path, env: Mapping[str, str], name: str = "api", extra: Sequence[str] = ()
) -> Api:
    """`cascade api` on a free port (`extra`: more options, e.g. `--workers 2`), up once
    /healthz answers at all: a 503 (a broker down on purpose) is an API that serves."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "worker.ops.cli",
        "api",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
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


# --- private services for chaos runs -------------------------------------------------------
#
# A chaos run restarts Redis and PostgreSQL. The machine's own servers are shared with other
# test runs, so the run starts its own on free ports and restarts only those.


@dataclass
class PrivateRedis:
    """A redis-server without persistence on a port of its own; restartable on that port.

    `die_with_parent` (Linux, util-linux's setpriv): the server gets SIGTERM when the thread
    that started it ends, so a test run that is killed leaves no server behind.
    """

    logdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    process: Process | None = None
    die_with_parent: bool = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", self.host]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        args += ["--protected-mode", "no", "--maxmemory-policy", "noeviction"]
        if self.die_with_parent and shutil.which("setpriv"):
            args = ["setpriv", "--pdeathsig", "TERM", "--", *args]
        self.process = spawn("redis", args, os.environ, self.logdir)
        wait_for(self._pong, 20, "private redis")

    def _pong(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.stop(sig)
            self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        """Kill it (everything in it is gone: no persistence) and start it on the same port."""
        self.stop(signal.SIGKILL)
        time.sleep(down_for)
        self.start()


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed")
    return found


def _as_postgres(args: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb, trust auth) on a port of its own.

    `listen` is what it binds (0.0.0.0 lets network namespaces in); the socket and the
    server log live in the data directory. `stop()` removes nothing, `destroy()` does.
    fsync is off (the cluster lives for one run); commits are still synchronous, so an
    immediate restart — a crash to clients — loses nothing committed.
    """

    listen: str = "127.0.0.1"
    host: str = "127.0.0.1"  # what clients connect to
    port: int = field(default_factory=free_port)
    datadir: Path | None = None

    def init(self) -> None:
        self.datadir = Path(tempfile.mkdtemp(prefix="cascade-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.datadir, "postgres", "postgres")
        args = [_postgres_bin("initdb"), "-D", str(self.datadir), "-U", "postgres"]
        subprocess.run(
            _as_postgres([*args, "--auth=trust", "--no-sync", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '{self.listen}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.datadir}'\nmax_connections = 200\n"
                "fsync = off\nfull_page_writes = off\n"
            )
        with (self.datadir / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        if self.datadir is None:
            raise RuntimeError("the cluster is not initialised: call init() or start() first")
        log = str(self.datadir / "server.log")  # the postgres user can write there
        command = [_postgres_bin("pg_ctl"), "-D", str(self.datadir), "-l", log, "-w", *args]
        subprocess.run(_as_postgres(command), check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if self.datadir is None:
            self.init()
        self._ctl("start")

    def restart(self, mode: str = "immediate") -> None:
        """`immediate` is a crash as far as clients go: every connection drops at once."""
        self._ctl("restart", "-m", mode)

    def stop(self) -> None:
        if self.datadir is not None and (self.datadir / "postmaster.pid").exists():
            self._ctl("stop", "-m", "immediate")

    def destroy(self) -> None:
        self.stop()
        if self.datadir is not None:
            shutil.rmtree(self.datadir, ignore_errors=True)
            self.datadir = None
