"""docker-compose.yml: valid for Debian's docker-compose 1.29, and the deployment we document.

No Docker daemon is needed: `docker-compose config` validates and resolves the file. A
missing docker-compose fails these tests where `scripts/services.sh` could have installed it
(root), and skips them, saying why, where it could not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = {"migrate", "worker", "beat", "api", "flower", "simulator", "demo"}
MONITORING = {"prometheus", "grafana"}
SERVICES = APP_SERVICES | MONITORING | {"redis", "postgres", "demo-db"}
FLOWER_AUTH = "ops:secret"


def compose(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run docker-compose on the repo's file, with `project` (holding `.env`) as project dir."""
    executable = shutil.which("docker-compose")
    install = "apt-get install -y --no-install-recommends docker-compose"
    if executable is None and os.geteuid() != 0:
        pytest.skip(f"docker-compose is not installed, and installing it needs root ({install})")
    assert executable, f"docker-compose is not installed: {install}"
    # Only PATH and HOME: variables of the test process must not leak into interpolation.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    command = [executable, "-f", str(ROOT / "docker-compose.yml"), "--project-directory"]
    return subprocess.run(
        [*command, str(project), *args], env=env, capture_output=True, text=True, timeout=120
    )


def make_project(directory: Path, flower_auth: str | None) -> Path:
    """A project dir whose `.env` is `.env.example`, optionally with FLOWER_BASIC_AUTH set."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    if flower_auth is not None:
        assert "FLOWER_BASIC_AUTH=" in lines, ".env.example must list FLOWER_BASIC_AUTH="
        setting = f"FLOWER_BASIC_AUTH={flower_auth}"
        lines = [setting if line == "FLOWER_BASIC_AUTH=" else line for line in lines]
    (directory / ".env").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def example_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("compose-example"), None)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The resolved configuration, demo profile included, with Flower's password set."""
    project = make_project(tmp_path_factory.mktemp("compose"), FLOWER_AUTH)
    result = compose(project, "--profile", "demo", "--profile", "monitoring", "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "profile",
    [[], ["--profile", "demo"], ["--profile", "monitoring"]],
    ids=["default", "demo", "monitoring"],
)
def test_the_file_validates_with_the_example_env(example_project: Path, profile: list[str]) -> None:
    result = compose(example_project, *profile, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_the_demo_profile_is_declared(example_project: Path) -> None:
    result = compose(example_project, "config", "--profiles")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["demo", "monitoring"]


def test_services_and_profiles(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == SERVICES
    profiled = {name for name, service in services.items() if service.get("profiles")}
    assert profiled == {"demo", "demo-db"} | MONITORING
    assert services["demo"]["profiles"] == ["demo"]


def test_app_services_share_one_image_and_point_at_compose_services(
    config: dict[str, Any],
) -> None:
    services = config["services"]
    assert {s["image"] for name, s in services.items() if name in APP_SERVICES} == {
        "cascade-worker:latest"
    }
    for name in APP_SERVICES:
        assert "build" in services[name], name
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://cascade:"), name
        assert "@postgres:5432/" in env["DATABASE_URL"], name
        assert env["BROKER_URL"].startswith("redis://redis:6379/"), name
        assert env["SMSBAT_BASE_URL"] == "http://simulator:8090", name
    # The demo's own worker would otherwise share the outbox with the worker service.
    demo, worker = services["demo"]["environment"], services["worker"]["environment"]
    assert demo["DATABASE_URL"] != worker["DATABASE_URL"]
    assert demo["BROKER_URL"] != worker["BROKER_URL"]


def test_commands(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["migrate"]["command"] == ["cascade", "db", "upgrade"]
    assert services["worker"]["command"][:5] == ["celery", "-A", "worker", "worker", "-l"]
    beat = services["beat"]["command"]
    assert beat[:4] == ["celery", "-A", "worker", "beat"]
    assert beat[beat.index("--schedule") + 1] == "/tmp/celerybeat-schedule"
    assert "celery -A worker flower" in " ".join(services["flower"]["command"])
    assert services["simulator"]["command"][:4] == ["cascade", "simulator", "--host", "0.0.0.0"]
    assert services["demo"]["command"] == ["cascade", "demo"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_command


def test_start_order(config: dict[str, Any]) -> None:
    services = config["services"]

    def condition(service: str, on: str) -> str:
        return str(services[service]["depends_on"][on]["condition"])

    assert condition("migrate", "postgres") == "service_healthy"
    for name in ("worker", "beat"):
        assert condition(name, "migrate") == "service_completed_successfully"
        assert condition(name, "redis") == "service_healthy"
    assert condition("flower", "redis") == "service_healthy"
    assert condition("demo", "demo-db") == "service_completed_successfully"
    assert condition("demo-db", "postgres") == "service_healthy"


@pytest.mark.parametrize(
    ("service", "probe"),
    [
        ("redis", "redis-cli"),
        ("postgres", "pg_isready"),
        ("worker", "inspect ping -d celery@$"),
        ("beat", "cascade health beat"),
        ("flower", "http://127.0.0.1:5555/healthcheck"),
        ("simulator", "http://127.0.0.1:8090/_sim/health"),
    ],
)
def test_health_checks(config: dict[str, Any], service: str, probe: str) -> None:
    test = config["services"][service]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert probe in " ".join(test)


def test_flower_has_basic_auth_and_is_not_public(config: dict[str, Any]) -> None:
    flower = config["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == FLOWER_AUTH  # from .env
    ports = flower["ports"]
    assert len(ports) == 1
    port = ports[0]
    if isinstance(port, dict):  # docker compose v2 prints the long form
        assert (port["host_ip"], int(port["target"])) == ("127.0.0.1", 5555)
    else:  # docker-compose 1.29: "127.0.0.1:5555:5555/tcp"
        assert port.startswith("127.0.0.1:") and port.split(":")[2].startswith("5555")


def test_flower_refuses_to_start_without_basic_auth(config: dict[str, Any]) -> None:
    """Run the service's own shell guard: without a password it exits before Flower starts."""
    shell, flag, script = config["services"]["flower"]["command"]
    assert (shell, flag) == ("sh", "-c")
    script = script.replace("$$", "$")  # compose's escape, undone as the container sees it
    env = {"PATH": os.environ.get("PATH", ""), "FLOWER_BASIC_AUTH": ""}
    result = subprocess.run([shell, flag, script], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "FLOWER_BASIC_AUTH" in result.stderr


@pytest.mark.parametrize("service", ["api", "flower"])
def test_services_that_need_a_token_are_retried_a_few_times_not_forever(
    config: dict[str, Any], service: str
) -> None:
    """They refuse without it; `unless-stopped` would turn that into a restart loop."""
    assert config["services"][service]["restart"] == "on-failure:3"


def test_api_refuses_to_start_without_a_token_in_one_line(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """The service's own command, run here as its container would run it without API_TOKEN."""
    command = config["services"]["api"]["command"]
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'unused.db'}"
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "refusing to start the API: API_TOKEN is not set "
        "(producers send it as Authorization: Bearer <API_TOKEN>)"
    ]


def test_readme_and_compose_agree_on_the_demo_command() -> None:
    command = "--profile demo run --rm demo"
    for document in ("README.md", "docker-compose.yml", "docs/reference.md"):
        text = (ROOT / document).read_text()
        assert command in text, document
        assert "--profile demo up" not in text, document


def test_image_installs_the_lock_then_the_package_as_a_library() -> None:
    """Pinned dependencies, then a plain (not editable) install: migrations ship inside."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    lines = dockerfile.splitlines()
    assert "pip install -r /tmp/requirements.lock" in dockerfile
    assert "pip install --no-deps /tmp/src" in dockerfile and " -e " not in dockerfile
    for needed in ("requirements.lock", "config", "worker"):
        assert any(line.split()[:2] == ["COPY", needed] for line in lines), needed
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in ignored if line and not line.startswith("#")]
    assert patterns[0] == "*"  # an allow-list: `.env` and local databases stay out
    assert "!requirements.lock" in patterns
    assert not any(p.startswith(("!.env", "!*")) for p in patterns)


def test_monitoring_is_provisioned_from_the_repository(config: dict[str, Any]) -> None:
    """Prometheus loads our rules and scrapes the api; Grafana gets the dashboard; workers
    and the api share the multiprocess directory the api sums on /metrics."""
    services = config["services"]
    mounted = {
        name: {str(v["source"] if isinstance(v, dict) else v.split(":")[0]) for v in s["volumes"]}
        for name, s in services.items()
        if name in MONITORING
    }
    for path in ("deploy/prometheus/alerts.yml", "deploy/prometheus/prometheus.yml"):
        # Relative to the project directory: the repository in a real deployment.
        assert any(source.endswith("/" + path) for source in mounted["prometheus"]), path
        assert (ROOT / path).is_file()
    for path in ("deploy/grafana/cascade.json", "deploy/grafana/provisioning"):
        assert any(source.endswith("/" + path) for source in mounted["grafana"]), path
        assert (ROOT / path).exists()
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["api:8000"]
    for name in ("worker", "api"):
        directory = services[name]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        volumes = services[name]["volumes"]
        assert any(directory in str(v) for v in volumes), name
