"""`cascade`: the operator's command line."""

from __future__ import annotations

import gc
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from worker.ops.common import checked_engine as _engine
from worker.ops.common import console
from worker.ops.common import load_settings as _settings
from worker.ops.common import print_json as _print_json
from worker.ops.consent_cli import optout
from worker.store.migrate import upgrade_database


class _Commands(click.Group):
    """The command group. The development commands (worker/dev/commands.py) are loaded by
    name when run, so the runtime never imports the simulator, the stack or the demo."""

    DEV_COMMANDS = {
        "simulator": "worker.dev.commands:simulator",
        "demo": "worker.dev.commands:demo",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.DEV_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.DEV_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, _, name = self.DEV_COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command), command
        return command


@click.group(cls=_Commands)
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


# --- message -------------------------------------------------------------------------


@main.group()
def message() -> None:
    """One message and its history."""


@message.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def message_show(message_id: str, as_json: bool) -> None:
    """Show a message's state, provider fields and events."""
    from worker.ops.reports import message_detail

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


def _region_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from worker.core.validation import region_problem

    if value is None:
        return None
    if problem := region_problem(value):
        raise click.BadParameter(problem)
    return value.upper()


@main.group()
def campaign() -> None:
    """Campaigns: messages enqueued under one name."""


@campaign.command("launch")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", required=True, help="Campaign name (the key for status, report, cancel).")
@click.option("--from-name", help="fromName for rows without one.")
@click.option("--type", "message_type", help="messageType for rows without one.")
@click.option("--ttl", type=click.IntRange(min=1), help="ttl (seconds) for rows without one.")
@click.option("--route", type=click.Choice(["standard", "tg-viber"]), help="Cascade route.")
@click.option("--text", help="Text template for rows without text: 'Hi {name}, code {code}'.")
@click.option("--callback-url", help="POST a signed outcome event here on every final state.")
@click.option("--callback-task", help="Send this Celery task by name with every outcome.")
@click.option(
    "--default-region",
    callback=_region_option,
    help="Read national and '+'-less numbers as this country's (UA: 067… → +38067…). "
    "Default: DEFAULT_PHONE_REGION.",
)
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="HEADER=FIELD",
    help="Use the file's column HEADER as FIELD, e.g. --column phone=toPhone (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Validate every row, enqueue nothing.")
@click.option(
    "--hold", is_flag=True, help="Store and validate everything, send nothing until approved."
)
@click.option("--dedupe", is_flag=True, help="Skip a phone already in the campaign or the file.")
@click.option(
    "--daily-cap", type=click.IntRange(min=1), help="At most N messages sent per UTC day."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="At most R messages/s for this campaign (beneath SEND_MESSAGES_PER_SECOND).",
)
@click.option(
    "--send-window",
    metavar="HH:MM-HH:MM",
    help="Quiet hours for this campaign's promo and surveys, in the recipient's local time "
    "(over SEND_WINDOW and SEND_WINDOW_BY_TYPE); 'none' (or 'off') sends at any hour. "
    "Stored with the campaign.",
)
def campaign_launch(
    file: Path,
    name: str,
    from_name: str | None,
    message_type: str | None,
    ttl: int | None,
    route: str | None,
    text: str | None,
    callback_url: str | None,
    callback_task: str | None,
    default_region: str | None,
    columns: tuple[str, ...],
    dry_run: bool,
    hold: bool,
    dedupe: bool,
    daily_cap: int | None,
    rate: float | None,
    send_window: str | None,
) -> None:
    """Enqueue a campaign from a CSV or .xlsx file (headers: the cascade API's field names,
    or mapped with --column)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from sqlalchemy.exc import DBAPIError

    from worker.flows.campaigns import CampaignError
    from worker.flows.launch import Defaults, column_mapping, launch, send_window_option

    settings = _settings()
    try:
        mapping = column_mapping(columns)
    except CampaignError as exc:
        raise click.BadParameter(str(exc), param_hint="--column") from None
    try:
        send_window = send_window_option(send_window)
    except CampaignError as exc:
        raise click.UsageError(str(exc)) from None
    defaults = Defaults(
        from_name,
        message_type,
        ttl,
        route,
        text,
        callback_url,
        callback_task,
        region=default_region or settings.default_phone_region,
        columns=mapping,
        dedupe=dedupe,
        send_window=send_window,
    )
    progress_columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[figures]}"),
        TimeElapsedColumn(),
    )
    started = time.monotonic()
    seen: list[Any] = []
    # What is loaded by now (modules, phonenumbers' metadata, settings) outlives the launch:
    # frozen, the garbage collector's full passes skip it. They took ≈0.7 s of CPU in a
    # 100,000-row launch (8 passes of ≈85 ms), ≈40 ms frozen (measured). Unfrozen after.
    gc.collect()
    gc.freeze()
    try:
        with Progress(*progress_columns, console=console, transient=False) as progress:
            task = progress.add_task("dry run" if dry_run else "launching", figures="")

            def show(stats: Any) -> None:
                seen[:] = [stats]
                rate = stats.rows / max(time.monotonic() - started, 1e-6)
                progress.update(
                    task,
                    figures=f"rows {stats.rows:,}  accepted {stats.accepted:,}  "
                    f"duplicate {stats.duplicate:,}  rejected {stats.rejected:,}  "
                    f"{rate:,.0f} rows/s",
                )

            stats = launch(
                file,
                name,
                defaults,
                settings,
                dry_run=dry_run,
                hold=hold,
                limits=(daily_cap, rate),
                progress=show,
            )
    except ValueError as exc:  # CampaignError, CampaignCancelled, a bad --name
        raise click.ClickException(str(exc)) from None
    except (KeyboardInterrupt, Exception) as exc:  # Ctrl-C, the database gone away…
        if isinstance(exc, DBAPIError):  # the file's own problems came first
            _engine(settings)  # one line if the schema is missing; else the error stands
        if dry_run:
            raise
        _interrupted(name, file, seen[0] if seen else None, exc, hold=hold)
    finally:
        gc.unfreeze()
    if stats.ignored_columns:
        console.print(f"ignored columns (not API fields): {', '.join(stats.ignored_columns)}")
    if stats.renumbered:
        console.print(
            f"{stats.renumbered:,} phone numbers read as {defaults.region} numbers "
            "(national or without '+') and sent in E.164"
        )
    verb = "would enqueue" if dry_run else "enqueued"
    console.print(
        f"{name}: {stats.rows:,} rows, {verb} {stats.accepted:,}, "
        f"{stats.duplicate:,} already known, {stats.rejected:,} rejected"
    )
    if stats.rejected_file:
        console.print(f"rejected rows: {stats.rejected_file}")
    if stats.suppressed or stats.waiting_for_window or stats.expired_by_window:
        would = "would be " if dry_run else ""
        console.print(
            f"consent: {stats.suppressed:,} {would}refused (number on the suppression list), "
            f"{stats.waiting_for_window:,} {would}held for the recipient's send window, "
            f"{stats.expired_by_window:,} {would}expired (TTL ends before the window opens)"
        )
    if stats.deduped:
        console.print(f"{stats.deduped:,} rows skipped: their phone is already in {name}")
    if stats.estimate is not None and stats.estimate.messages:
        console.print(estimate_line(stats.estimate.as_dict(settings.rate_card_currency)))
    if send_window is not None:
        shown = "none (any hour)" if send_window == "off" else f"{send_window} recipient's time"
        console.print(f"send window of {name}'s promo and surveys: {shown}")
    if hold and not dry_run:
        console.print(f"{name} is held: nothing is sent until `cascade campaign approve {name}`")


def estimate_line(estimate: dict[str, Any]) -> str:
    """`estimate: 3 messages, 4 SMS parts (GSM-7 2, UCS-2 1; …), cost 3.80 UAH`."""
    encodings = ", ".join(f"{k} {v:,}" for k, v in estimate["encodings"].items())
    parts = ", ".join(
        f"{n:,} of {k} part{'s' if k != '1' else ''}"
        for k, n in estimate["parts_per_message"].items()
    )
    line = (
        f"estimate: {estimate['messages']:,} messages, {estimate['sms_parts']:,} SMS parts"
        f" ({encodings}; {parts})"
    )
    if estimate["cost"] is not None:
        line += f", cost {estimate['cost']:,.2f} {estimate['currency']}"
        line += " if every message ends on SMS (viber for tg-viber)"
    else:
        line += "; no cost: set RATE_CARD and RATE_CARD_CURRENCY for one"
    if estimate["without_rate"]:
        missing = ", ".join(f"{k} ×{v:,}" for k, v in estimate["without_rate"].items())
        line += f"; without a rate (not in the cost): {missing}"
    return line


def _interrupted(
    name: str, file: Path, stats: Any, exc: BaseException, *, hold: bool = False
) -> None:
    """Say what a launch stored before it stopped, and how to finish it; exit non-zero."""
    from sqlalchemy import func, select

    from worker.store.models import messages

    why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped: {exc!r}"[:300]
    try:
        with _engine().connect() as conn:
            stored = conn.execute(
                select(func.count()).where(messages.c.campaign == name)
            ).scalar_one()
        counted = f"{stored:,} messages of campaign {name} are stored"
        if hold:  # `--hold`: stored held, nothing goes before `approve`
            counted += f" held (sent once `cascade campaign approve {name}`)"
    except Exception as error:
        counted = f"could not count what was stored ({type(error).__name__})"
    read = f" after {stats.rows:,} rows read" if stats else ""
    console.print(
        f"[red]launch {why}[/]{read}: {counted}{'' if hold else ' and will be sent'}.\n"
        f"To finish, launch the same file under the same name again "
        f"(`cascade campaign launch {file} --name {name} …` with the same options): "
        "rows already stored are skipped, not sent twice."
    )
    raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 1)


@campaign.command("status")
@click.argument("name")
@click.option("--watch", is_flag=True, help="Live view until every message is final.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Refresh seconds (--watch).",
)
def campaign_status(name: str, watch: bool, as_json: bool, interval: float) -> None:
    """Progress of a campaign: counts per state, delivery rate, cost, throughput, ETA."""
    from worker.ops.reports import campaign_summary

    engine = _engine()
    broker = _settings().broker_url
    report = campaign_summary(engine, name, broker)
    if report is None:
        raise click.ClickException(f"no campaign named {name!r}")
    control = report.get("control") or {}
    if control.get("status") == "held":  # what approving it would send, and cost
        from worker.core.states import State
        from worker.ops.reports import stored_estimate

        settings = _settings()
        estimate = stored_estimate(engine, name, settings.rates, (State.HELD,))
        report["estimate"] = estimate.as_dict(settings.rate_card_currency)
    if as_json:
        _print_json(report)
        return
    if report.get("estimate", {}).get("messages"):
        console.print(estimate_line(report["estimate"]))
    if not watch:
        console.print(status_view(report, None))
        return
    from rich.live import Live

    samples: list[tuple[float, int]] = [(time.monotonic(), report["final"])]
    with Live(status_view(report, None), console=console, refresh_per_second=4) as live:
        while not report["all_final"] and not _stopped(report):
            time.sleep(interval)
            report = campaign_summary(engine, name, broker) or report
            samples = [*samples[-30:], (time.monotonic(), report["final"])]
            live.update(status_view(report, samples))
    if report["all_final"]:
        console.print(f"{name}: every message is final")
    else:
        console.print(
            f"{name}: {report['control']['status']}, nothing more moves until "
            "it is approved, resumed or its cap resets"
        )


def _stopped(report: dict[str, Any]) -> bool:
    """A held, paused or capped campaign whose every other message is final: watching on
    would never end."""
    control = report.get("control") or {}
    held = report["states"].get("held", 0)
    return (
        control.get("status") in ("held", "paused", "capped")
        and held > 0
        and report["final"] + held == report["total"]
    )


def _cost(report: dict[str, Any]) -> str:
    """One total in its currency; amounts in several currencies are never added."""
    if report["cost"] is None:
        return "in several currencies, never added: " + ", ".join(
            f"{money['cost']:.2f} {currency}" for currency, money in report["money"].items()
        )
    currency = report.get("cost_currency")
    return f"{report['cost']:.2f}" + (f" {currency}" if currency else "")


def _control_rows(table: Table, report: dict[str, Any]) -> None:
    control = report.get("control") or {}
    status = control.get("status", "running")
    if status == "held":
        table.add_row(
            "status",
            f"[yellow]held for approval[/] since {control['held_since']}: "
            f"`cascade campaign approve {report['campaign']}` sends it",
        )
    elif status == "capped":
        table.add_row("status", f"[yellow]capped[/]: {control['pause_reason']}")
    elif status == "paused":
        table.add_row(
            "status",
            f"[yellow]paused[/] since {control['paused_since']} ({control['pause_reason']}): "
            f"`cascade campaign resume {report['campaign']}` sends it again",
        )
    elif (sending := report.get("sending")) and not report["all_final"]:
        table.add_row(
            "status",
            f"{status}; [yellow]sending paused[/] for every campaign, about "
            f"{sending['paused_for_seconds']:.0f} s more: {sending['reason']}",
        )
    else:
        table.add_row("status", status)
    limits = control.get("limits") or {}
    if limits.get("daily_cap") or limits.get("rate"):
        cap = f"{limits['daily_cap']:,}/day" if limits.get("daily_cap") else "no daily cap"
        rate = f"{limits['rate']:g}/s" if limits.get("rate") else "no own rate"
        table.add_row("limits", f"{cap}, {rate}; {limits['released_today']:,} released today (UTC)")


def _state_rows(table: Table, report: dict[str, Any], indent: str = "") -> None:
    """Counts per state; `queued` split into ready and scheduled ones waiting for their time."""
    waiting = report.get("waiting_for_time", 0)
    window = report.get("waiting_for_window", 0)  # quiet hours (worker/core/quiet.py)
    for state, count in report["states"].items():
        if state == "queued" and (waiting or window):
            table.add_row(f"{indent}queued", f"{count - waiting - window:,}")
            if waiting:
                table.add_row(f"{indent}waiting for its time", f"{waiting:,}")
            if window:
                table.add_row(f"{indent}waiting for its send window", f"{window:,}")
        else:
            table.add_row(f"{indent}{state}", f"{count:,}")


def status_view(report: dict[str, Any], samples: list[tuple[float, int]] | None) -> Table:
    """One frame of `campaign status`: figures, states and a bar to all-final."""
    total, final = report["total"], report["final"]
    width = 40
    filled = int(width * final / total) if total else width
    rate = eta = None
    if samples and len(samples) > 1:
        (t0, f0), (t1, f1) = samples[0], samples[-1]
        rate = (f1 - f0) / (t1 - t0) if t1 > t0 else None
        if rate:
            eta = (total - final) / rate
    table = Table(title=f"campaign {report['campaign']}", show_header=False)
    _control_rows(table, report)
    table.add_row("final", f"[green]{'█' * filled}[/]{'░' * (width - filled)} {final:,}/{total:,}")
    _state_rows(table, report, "  ")
    table.add_row("delivery rate", f"{report['delivery_rate']:.1%} of total")
    table.add_row("cost so far", _cost(report))
    table.add_row("throughput", f"{rate:,.1f} final/s" if rate is not None else "-")
    table.add_row("ETA", f"{eta:,.0f} s" if eta is not None else "-")
    return table


@campaign.command("cancel")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_cancel(name: str, as_json: bool) -> None:
    """Cancel the messages not yet sent; those already with the provider are left alone."""
    from worker.flows.campaigns import cancel_campaign

    result = cancel_campaign(_engine(), name)
    if result is None:
        raise click.ClickException(f"no campaign named {name!r}")
    if as_json:
        _print_json({"campaign": name, **result})
        return
    console.print(
        f"{name}: {result['cancelled_now']:,} messages cancelled now "
        f"({result['cancelled']:,} cancelled in all); "
        f"{result['with_provider']:,} already with the provider and left alone; "
        f"{result['in_flight']:,} in flight (cancelled if their send fails); "
        f"{result['final_before']:,} were already final"
    )


def _control(action: str, name: str, as_json: bool) -> None:
    from worker.flows import campaigns

    settings = _settings()
    engine = _engine()
    controls: dict[str, Callable[[], dict[str, Any] | None]] = {
        "pause": lambda: campaigns.pause_campaign(engine, name),
        "hold": lambda: campaigns.hold_campaign(engine, name),
        "resume": lambda: campaigns.resume_campaign(engine, name, settings.broker_url),
        "approve": lambda: campaigns.approve_campaign(engine, name, settings.broker_url),
    }
    run = controls[action]
    try:
        result = run()
    except ValueError as exc:  # CampaignCancelled, CampaignStateError
        raise click.ClickException(str(exc)) from None
    if result is None:
        raise click.ClickException(f"no campaign named {name!r}")
    if as_json:
        _print_json({"campaign": name, **result})
        return
    if "held_now" in result:
        done = f"{result['held_now']:,} unsent messages held now"
    else:
        done = f"{result['released_now']:,} messages back in the queue"
    console.print(
        f"{name}: {result['status']}; {done}; {result['held_messages']:,} held in all"
        + (f" ({result['pause_reason']})" if result["pause_reason"] else "")
    )


@campaign.command("pause")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_pause(name: str, as_json: bool) -> None:
    """Stop sending: unsent messages are held; those with the provider are still followed."""
    _control("pause", name, as_json)


@campaign.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_resume(name: str, as_json: bool) -> None:
    """Send a paused campaign's held messages again."""
    _control("resume", name, as_json)


@campaign.command("hold")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_hold(name: str, as_json: bool) -> None:
    """Hold a campaign for approval (as `launch --hold` does): nothing unsent goes out."""
    _control("hold", name, as_json)


@campaign.command("approve")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_approve(name: str, as_json: bool) -> None:
    """Send a campaign that was launched with --hold."""
    _control("approve", name, as_json)


@campaign.command("limit")
@click.argument("name")
@click.option("--daily-cap", type=click.IntRange(min=0), help="Messages per UTC day; 0 lifts it.")
@click.option(
    "--rate", type=click.FloatRange(min=0), help="Messages/s for this campaign; 0 lifts it."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_limit(name: str, daily_cap: int | None, rate: float | None, as_json: bool) -> None:
    """Cap a campaign's messages per day and its own rate; beyond them messages wait, held."""
    from worker.flows.campaigns import set_limits

    if daily_cap is None and rate is None:
        raise click.UsageError("give --daily-cap and/or --rate (0 lifts a limit)")
    engine = _engine()
    from worker.flows.campaigns import campaign_control

    current = campaign_control(engine, name)["limits"]
    cap = current["daily_cap"] if daily_cap is None else (daily_cap or None)
    per_second = current["rate"] if rate is None else (rate or None)
    try:
        result = set_limits(engine, name, cap, per_second)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if result is None:
        raise click.ClickException(f"no campaign named {name!r}")
    if as_json:
        _print_json({"campaign": name, **result})
        return
    limits = result["limits"]
    console.print(
        f"{name}: {result['status']}; daily cap {limits['daily_cap'] or 'none'}, "
        f"rate {limits['rate'] or 'none'}; {result['held_messages']:,} messages waiting"
    )


@campaign.command("retry")
@click.argument("name")
@click.option(
    "--states",
    default="undeliverable,failed,expired",
    show_default=True,
    help="Final states to send again (never delivered), comma-separated.",
)
@click.option("--route", type=click.Choice(["standard", "tg-viber"]), help="Route for the retry.")
@click.option("--name", "new_name", help="The new campaign's name (default: NAME-retry).")
@click.option("--hold", is_flag=True, help="Hold the retry for approval.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_retry(
    name: str, states: str, route: str | None, new_name: str | None, hold: bool, as_json: bool
) -> None:
    """Send again, as a linked campaign with new tracking ids, what did not arrive."""
    from worker.flows.launch import retry_campaign, retry_states

    settings = _settings()
    try:
        chosen = retry_states(states)
        result = retry_campaign(name, chosen, settings, new_name=new_name, route=route, hold=hold)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if result is None:
        raise click.ClickException(f"no campaign named {name!r}")
    if as_json:
        _print_json(result)
        return
    console.print(
        f"{result['campaign']} (retry of {name}): {result['selected']:,} messages in "
        f"{', '.join(result['states'])}; enqueued {result['accepted']:,}, "
        f"{result['duplicate']:,} already retried, {result['rejected']:,} rejected"
        + (f"; held until `cascade campaign approve {result['campaign']}`" if hold else "")
    )


@campaign.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def campaign_list(as_json: bool) -> None:
    """Every campaign with its size and progress."""
    from worker.flows.campaigns import list_campaigns

    listing = list_campaigns(_engine())
    if as_json:
        _print_json(listing)
        return
    table = Table("campaign", "created", "total", "final", "delivered", "cancelled")
    for c in listing:
        table.add_row(
            c["campaign"],
            c["created_at"] or "",
            f"{c['total']:,}",
            f"{c['final']:,}",
            f"{c['delivered']:,}",
            c["cancelled_at"] or "",
        )
    console.print(table)


@campaign.command("report")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--csv",
    "csv_file",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write every message's outcome as CSV to FILE ('-' for stdout).",
)
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Write an HTML report.")
def campaign_report_cmd(
    name: str, as_json: bool, csv_file: str | None, html_file: str | None
) -> None:
    """Counts per state, delivery rate, cost per currency, channels, latency, errors."""
    from worker.ops.reports import campaign_report

    engine = _engine()
    report = campaign_report(engine, name, _settings().broker_url)
    if report is None:
        raise click.ClickException(f"no campaign named {name!r}")
    if csv_file:
        _write_outcomes(engine, name, csv_file)
    if html_file:
        from worker.ops.html_report import render_html
        from worker.ops.reports import deliveries_over_time

        Path(html_file).write_text(render_html(report, deliveries_over_time(engine, name)))
        if not as_json:
            console.print(f"HTML report: {html_file}")
    if as_json:
        _print_json(report)
    elif csv_file != "-":
        print_report(report)


def _write_outcomes(engine: Any, name: str, target: str) -> None:
    import csv
    from contextlib import nullcontext

    from worker.ops.reports import OUTCOME_COLUMNS, message_outcomes

    stream = (
        nullcontext(sys.stdout)
        if target == "-"
        else open(target, "w", newline="", encoding="utf-8")  # noqa: SIM115
    )
    with stream as out:
        writer = csv.DictWriter(out, fieldnames=OUTCOME_COLUMNS)
        writer.writeheader()
        writer.writerows(message_outcomes(engine, name))


def print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"campaign {report['campaign']}", show_header=False)
    _control_rows(table, report)
    for key in ("total", "sent", "delivered", "final"):
        table.add_row(key, f"{report[key]:,}")
    table.add_row("delivery rate", f"{report['delivery_rate']:.1%} of total")
    table.add_row("", f"{report['delivery_rate_of_sent']:.1%} of sent")
    table.add_row("cost", _cost(report))
    for currency, money in report.get("money", {}).items():
        note = f" ({money['note']})" if money.get("note") else ""
        table.add_row(
            f"  {currency}",
            f"cost {money['cost']:.2f}, bill {money['bill']:.2f} "
            f"for {money['messages']:,} messages{note}",
        )
    table.add_row("unknown send outcomes", f"{report['unknown_outcomes']:,}")
    table.add_row("status polls", f"{report['polls']:,}")
    latency = report.get("latency_seconds", {}).get("submit_to_final") or {}
    if latency.get("p50") is not None:
        table.add_row(
            "submit → final",
            "  ".join(f"{k} {v:.1f}s" for k, v in latency.items() if v is not None),
        )
    console.print(table)
    states = Table("state", "messages", title="states")
    _state_rows(states, report)
    console.print(states)
    if report.get("channels"):
        channels = Table("channel", "messages", title="delivered by")
        for channel, count in report["channels"].items():
            channels.add_row(channel, f"{count:,}")
        console.print(channels)
    if report.get("top_errors"):
        errors = Table("error", "messages", title="top errors")
        for error in report["top_errors"]:
            errors.add_row(error["code"], f"{error['count']:,}")
        console.print(errors)


# --- inbound SMS and outcome callbacks ----------------------------------------------


@main.group()
def inbound() -> None:
    """SMS replies recipients sent back (BulkGate status 10)."""


@inbound.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--campaign", default=None, help="Only replies to this campaign's messages.")
@click.option("--since", default=None, help="Only replies received since: ISO time or 30m, 2h, 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def inbound_list(limit: int, campaign: str | None, since: str | None, as_json: bool) -> None:
    """The newest inbound messages, each linked to the last message we sent that number
    (numbers masked); an opt-out or opt-in reply is marked in `consent`."""
    from worker.core.redact import mask_phone
    from worker.flows.inbox import list_inbound

    try:
        after = _since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    rows = list_inbound(_engine(), limit, campaign=campaign, since=after)
    for row in rows:
        row["from"] = mask_phone(row["from"])
    if as_json:
        _print_json(rows)
        return
    table = Table("received", "from", "text", "meaning", "reply to")
    meaning = {"optout": "opt-out", "optin": "opt-in"}
    for row in rows:
        table.add_row(
            row["receivedAt"],
            row["from"],
            row["text"] or "",
            meaning.get(row.get("consent") or "", ""),
            row["replyTo"] or "",
        )
    console.print(table)


def _since(text: str | None) -> Any:
    """`--since`: an ISO time (UTC unless it says) or a span back from now (30m, 2h, 7d)."""
    from datetime import UTC, datetime, timedelta

    from worker.store.db import utcnow

    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return utcnow() - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO time nor a span like 30m, 2h, 7d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


main.add_command(optout)  # the suppression list's commands


@main.group()
def callbacks() -> None:
    """Outcome callbacks to the producing apps."""


@callbacks.command("list")
@click.option("--dead", is_flag=True, help="Only callbacks that gave up.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def callbacks_list(dead: bool, limit: int, as_json: bool) -> None:
    """Callbacks with their state, attempts and last error."""
    from worker.flows.callbacks import list_callbacks

    rows = list_callbacks(_engine(), "dead" if dead else None, limit)
    if as_json:
        _print_json(rows)
        return
    table = Table("pk", "message", "kind", "target", "state", "attempts", "last error")
    for row in rows:
        table.add_row(
            str(row["pk"]),
            row["messageId"],
            row["kind"],
            row["target"],
            row["state"],
            str(row["attempts"]),
            row["lastError"] or "",
        )
    console.print(table)


@callbacks.command("retry")
@click.argument("pks", nargs=-1, type=int)
@click.option("--all-dead", is_flag=True, help="Retry every dead callback.")
def callbacks_retry(pks: tuple[int, ...], all_dead: bool) -> None:
    """Give dead callbacks a new round of attempts."""
    from worker.flows.callbacks import retry_dead

    if not pks and not all_dead:
        raise click.UsageError("name callback ids or pass --all-dead")
    count = retry_dead(_engine(), None if all_dead else list(pks))
    console.print(f"{count} callbacks queued again")


# --- HTTP API ------------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Default: API_HOST.")
@click.option("--port", default=None, type=int, help="Default: API_PORT.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="API processes sharing the port (uvicorn workers); one per core for webhook intake.",
)
def api(host: str | None, port: int | None, workers: int) -> None:
    """Serve the HTTP API: producers, message and campaign views, webhooks, /healthz."""
    from worker.http.app import serve

    settings = _settings()
    serve(settings, host or settings.api_host, port or settings.api_port, workers=workers)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9464, show_default=True, type=int)
@click.option(
    "--db/--no-db",
    "database",
    default=True,
    show_default=True,
    help="Serve the database gauges (--no-db: this host's worker counters and pauses only, "
    "when another exporter serves the gauges).",
)
def metrics(host: str, port: int, database: bool) -> None:
    """Serve /metrics (Prometheus) without the API: workers' counters and database gauges."""
    from worker.observe.exporter import serve

    serve(_settings(), host, port, database=database)


@main.group()
def health() -> None:
    """Liveness checks for orchestrators (docker-compose healthchecks)."""


@health.command("beat")
@click.option("--max-age", type=float, default=None, help="Default: HEALTH_BEAT_MAX_AGE_SECONDS.")
def health_beat(max_age: float | None) -> None:
    """Exit 0 when beat sent a periodic task within --max-age seconds, else 1."""
    from worker.observe.health import beat_health

    settings = _settings()
    limit = max_age if max_age is not None else settings.health_beat_max_age_seconds
    beat = beat_health(settings.broker_url, limit)
    age = "never" if beat.age_seconds is None else f"{beat.age_seconds:.1f} s ago"
    click.echo(f"beat {beat.status}: last tick {age} (limit {limit:g} s)")
    if beat.status != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
