"""The `cascade` command line, run as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from config import Settings
from tests.conftest import (
    Stack,
    create_postgres_database,
    drop_postgres_database,
    make_messages,
)
from worker.dev.stack import free_port

CASCADE = [sys.executable, "-m", "worker.ops.cli"]


def cascade(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CASCADE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_message_show_and_campaign_report(stack: Stack, sim, campaign: str, tmp_path: Path) -> None:
    stack.enqueue(make_messages(20, campaign), campaign)
    stack.wait_final(campaign, 20)
    env = {"DATABASE_URL": stack.settings.database_url}

    shown = cascade("message", "show", f"{campaign}-3", "--json", **env)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert {"id", "state", "messageId", "deliverystatus", "partscount", "cost", "events"} <= set(
        detail
    )
    assert detail["id"] == f"{campaign}-3"
    assert detail["state"] == detail["deliverystatus"]
    assert detail["events"][0]["to"] == "submitted"
    assert detail["events"][-1]["to"] == detail["state"]

    reported = cascade("campaign", "report", campaign, "--json", **env)
    assert reported.returncode == 0, reported.stderr
    report = json.loads(reported.stdout)
    assert report["campaign"] == campaign and report["total"] == 20
    assert sum(report["states"].values()) == 20
    assert report["delivery_rate"] == report["states"].get("delivered", 0) / 20
    assert report["cost"] >= 0

    assert set(report["channels"]) <= {"telegram", "viber", "rcs", "sms", "none"}
    assert sum(report["channels"].values()) == 20

    out_csv, out_html = tmp_path / "outcomes.csv", tmp_path / "report.html"
    files = cascade(
        "campaign", "report", campaign, "--csv", str(out_csv), "--html", str(out_html), **env
    )
    assert files.returncode == 0, files.stderr
    with out_csv.open(newline="") as handle:
        outcomes = list(csv.DictReader(handle))
    assert len(outcomes) == 20 and {o["state"] for o in outcomes} == set(report["states"])
    assert all("*" in o["toPhone"] for o in outcomes)  # phones masked
    page = out_html.read_text()
    assert campaign in page and "<svg" in page and "<script" not in page

    table = cascade("campaign", "report", campaign, **env)
    assert "delivery rate" in table.stdout and campaign in table.stdout
    human = cascade("message", "show", f"{campaign}-3", **env)
    assert detail["messageId"] in human.stdout


def test_unknown_message_and_campaign_are_clear_errors(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    assert cascade("db", "upgrade", **env).returncode == 0

    missing = cascade("message", "show", "nope", **env)
    assert missing.returncode != 0 and "no message with id 'nope'" in missing.stderr
    absent = cascade("campaign", "report", "nope", "--json", **env)
    assert absent.returncode != 0 and "no campaign named 'nope'" in absent.stderr


def test_invalid_setting_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    bad = cascade("db", "upgrade", SEND_BATCH_MAX="2000", DATABASE_URL="sqlite:///x.db")
    assert bad.returncode != 0
    assert "SEND_BATCH_MAX" in bad.stderr and "1000" in bad.stderr
    assert "Traceback" not in bad.stderr

    worse = cascade("db", "upgrade", DATABASE_URL="mysql://u:hunter2@h/db")
    assert worse.returncode != 0
    assert "DATABASE_URL" in worse.stderr and "hunter2" not in worse.stderr


def test_secrets_never_appear_in_the_settings_repr() -> None:
    settings = Settings(  # type: ignore[call-arg]
        DATABASE_URL="postgresql://u:dbpass@h/db",
        BROKER_URL="redis://:brokerpass@h:6379/0",
        SMSBAT_API_KEY="api-secret",
        SMSBAT_PASSWORD="pw-secret",
        SMSBAT_VIBER_TOKEN="viber-secret",
        SMSBAT_TG_BOT_KEY="tg-secret",
        WEBHOOK_TOKEN="hook-secret",
    )
    shown = repr(settings) + str(settings)
    secrets = ("dbpass", "brokerpass", "api-secret", "pw-secret", "viber-secret", "tg-secret")
    for secret in (*secrets, "hook-secret"):
        assert secret not in shown


def test_db_upgrade_creates_the_schema_on_both_backends(
    database_factory: Callable[[str], str],
) -> None:
    for backend in ("sqlite", "postgresql"):
        url = database_factory(backend)  # runs `upgrade_database`; run the CLI again on top
        done = cascade("db", "upgrade", DATABASE_URL=url)
        assert done.returncode == 0, done.stderr
        assert "database at revision head" in done.stdout


def run_in(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A command as a user runs it from `cwd`: none of the test process's settings."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env={**clean, **env}, timeout=120
    )


def test_cascade_env_file_names_the_settings_file(tmp_path: Path) -> None:
    elsewhere, config = tmp_path / "elsewhere", tmp_path / "etc"
    elsewhere.mkdir()
    config.mkdir()
    database = tmp_path / "from-env-file.db"
    (config / "cascade.env").write_text(f"DATABASE_URL=sqlite:///{database}\n")
    env_file = str(config / "cascade.env")

    done = run_in(elsewhere, *CASCADE, "db", "upgrade", CASCADE_ENV_FILE=env_file)
    assert done.returncode == 0, done.stderr
    assert database.exists() and not list(elsewhere.iterdir())

    missing = run_in(elsewhere, *CASCADE, "db", "upgrade", CASCADE_ENV_FILE=env_file + ".old")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: CASCADE_ENV_FILE={env_file}.old: no such file"


def test_a_database_without_the_schema_is_one_line(tmp_path: Path) -> None:
    database = tmp_path / "never-migrated.db"
    for command in (["campaign", "list"], ["message", "show", "x"], ["inbound", "list"]):
        done = cascade(*command, DATABASE_URL=f"sqlite:///{database}")
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"Error: sqlite:///{database} has no cascade schema; run `cascade db upgrade`"
        ]
    assert not database.exists()  # reported, not created
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("toPhone,text\n+380671234567,hi\n")
    launch = ["campaign", "launch", str(contacts), "--name", "n", "--from-name", "Shop"]
    done = cascade(*launch, "--type", "promo", DATABASE_URL=f"sqlite:///{database}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].endswith("has no cascade schema; run `cascade db upgrade`")

    name = create_postgres_database()
    try:
        url = f"postgresql://postgres:hunter2@127.0.0.1:5432/{name}"
        done = cascade("campaign", "report", "x", DATABASE_URL=url)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.splitlines() == [
            f"Error: postgresql+psycopg://postgres:***@127.0.0.1:5432/{name} has no cascade "
            "schema; run `cascade db upgrade`"
        ]
    finally:
        drop_postgres_database(name)


def test_api_and_worker_refuse_a_database_without_the_schema_in_one_line(
    tmp_path: Path, redis_db: str
) -> None:
    url = f"sqlite:///{tmp_path / 'never-migrated.db'}"
    line = f"{url} has no cascade schema; run `cascade db upgrade`"
    env = {"DATABASE_URL": url, "BROKER_URL": redis_db, "API_TOKEN": "t0ken"}

    api = run_in(tmp_path, *CASCADE, "api", "--port", str(free_port()), **env)
    assert api.returncode == 1
    assert api.stderr.splitlines() == [f"refusing to start the API: {line}"]

    worker = [sys.executable, "-m", "celery", "-A", "worker", "worker"]
    done = run_in(tmp_path, *worker, "-l", "info", "-P", "solo", **env)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert f"refusing to start the worker: {line}" in output
    assert "Traceback" not in output and "celery@" not in output  # stopped before its banner
