"""`cascade`: the operator's command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from config import Settings

console = Console()
ROOT = Path(__file__).resolve().parent.parent


def _settings() -> Settings:
    from pydantic import ValidationError

    from config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        ]
        raise click.ClickException("invalid settings:\n" + "\n".join(lines)) from None


def _engine() -> Any:
    from worker.db import get_engine

    return get_engine(_settings().database_url)


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


@click.group()
def main() -> None:
    """Cascade delivery worker: batched SMSBAT sends, status tracking, reports."""


# --- db ------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations to DATABASE_URL."""
    upgrade_database(_settings().database_url, revision)
    console.print(f"database at revision {revision}")


def upgrade_database(url: str, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, revision)


# --- message -------------------------------------------------------------------------


@main.group()
def message() -> None:
    """One message and its history."""


@message.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def message_show(message_id: str, as_json: bool) -> None:
    """Show a message's state, provider fields and events."""
    from worker.reports import message_detail

    detail = message_detail(_engine(), message_id)
    if detail is None:
        raise click.ClickException(f"no message with id {message_id!r}")
    if as_json:
        _print_json(detail)
        return
    table = Table(title=f"message {message_id}", show_header=False)
    for key, value in detail.items():
        if key != "events" and value is not None:
            table.add_row(key, str(value))
    console.print(table)
    history = Table("at", "source", "from", "to", "detail", title="events")
    for e in detail["events"]:
        history.add_row(e["at"], e["source"], e["from"] or "", e["to"], e["detail"] or "")
    console.print(history)


# --- campaign ------------------------------------------------------------------------


@main.group()
def campaign() -> None:
    """Campaigns: messages enqueued under one name."""


@campaign.command("report")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_report_cmd(name: str, as_json: bool) -> None:
    """Counts per state, delivery rate and cost of a campaign."""
    from worker.reports import campaign_report

    report = campaign_report(_engine(), name)
    if report is None:
        raise click.ClickException(f"no campaign named {name!r}")
    if as_json:
        _print_json(report)
        return
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"campaign {report['campaign']}", show_header=False)
    for key in ("total", "sent", "delivered", "final"):
        table.add_row(key, str(report[key]))
    table.add_row("delivery rate", f"{report['delivery_rate']:.1%}")
    table.add_row("cost", f"{report['cost']:.2f}")
    table.add_row("unknown send outcomes", str(report["unknown_outcomes"]))
    table.add_row("status polls", str(report["polls"]))
    console.print(table)
    states = Table("state", "messages", title="states")
    for state, count in report["states"].items():
        states.add_row(state, str(count))
    console.print(states)


# --- simulator and demo --------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
@click.option("--api-key", default="test-key", show_default=True)
@click.option("--username", default="user", show_default=True)
@click.option("--password", default="pass", show_default=True)
@click.option("--delay-min", default=5.0, show_default=True, help="Seconds to a final state.")
@click.option("--delay-max", default=30.0, show_default=True)
@click.option("--delivered", default=0.9, show_default=True, help="Share delivered.")
@click.option("--undeliverable", default=0.07, show_default=True)
@click.option("--permanenterror", default=0.03, show_default=True)
@click.option("--latency-ms", default=0.0, show_default=True)
@click.option("--error-rate", default=0.0, show_default=True, help="Share of 500 answers.")
@click.option("--throttle-next", default=0, show_default=True, help="Answer 429 to N sends.")
@click.option("--retry-after", default="1", show_default=True)
@click.option("--seed", default=None, type=int)
def simulator(**options: Any) -> None:
    """Serve the SMSBAT cascade and status endpoints on loopback for demos and tests."""
    from worker.simulator import SimulatorConfig, serve

    host, port = options.pop("host"), options.pop("port")
    mix = {k: options.pop(k) for k in ("delivered", "undeliverable", "permanenterror")}
    config = SimulatorConfig(mix=mix, **options)
    console.print(f"simulator on http://{host}:{port} (api key {'*' * 4})")
    serve(host, port, config)


@main.command()
@click.option("--messages", "count", default=2000, show_default=True, type=int)
@click.option("--campaign", "name", default=None, help="Campaign name (default: demo-<time>).")
def demo(count: int, name: str | None) -> None:
    """Run a campaign end to end: simulator, worker and beat, enqueue, track to all-final."""
    from worker.demo import run_demo

    report = run_demo(_settings(), count, name, console)
    print_report(report)
    if not report["all_final"]:
        raise click.ClickException("demo ended before every message was final")


if __name__ == "__main__":
    main()
