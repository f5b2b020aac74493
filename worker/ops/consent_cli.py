"""`cascade optout …`: the suppression list for operators (worker/flows/consent.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table
from sqlalchemy import Engine

from config import Settings
from worker.core.keywords import phone_problem
from worker.core.redact import mask_phone
from worker.ops.common import checked_engine, console, load_settings, print_json


def _context() -> tuple[Settings, Engine]:
    settings = load_settings()
    return settings, checked_engine(settings)


def _number(value: str, region: str | None) -> str:
    phone, problem = phone_problem(value, region)
    if phone is None:
        raise click.ClickException(f"PHONE {problem}")
    return phone


_REGION = click.option(
    "--default-region",
    "region",
    default=None,
    help="Read national and '+'-less numbers as this country's (UA, PL…); stored in E.164.",
)


@click.group()
def optout() -> None:
    """The suppression list: numbers that get no promo or survey (STOP replies add them)."""


@optout.command("add")
@click.argument("phone")
@click.option("--note", default=None, help="Why (kept as the evidence), e.g. 'asked by phone'.")
@_REGION
def optout_add(phone: str, note: str | None, region: str | None) -> None:
    """Add PHONE; its unsent promo and surveys end as suppressed at once."""
    from worker.flows import consent

    settings, engine = _context()
    number = _number(phone, region or settings.default_phone_region)
    with engine.begin() as conn:
        change = consent.add(
            conn,
            number,
            source="cli",
            evidence=note,
            types=settings.suppressed_types,
        )
    state = "added" if change.changed else "already on the list"
    click.echo(f"{mask_phone(number)}: {state}; {change.suppressed} unsent messages suppressed")


@optout.command("remove")
@click.argument("phone")
@click.option("--note", default=None, help="Why (kept in the record).")
@_REGION
def optout_remove(phone: str, note: str | None, region: str | None) -> None:
    """Take PHONE off the list (its suppressed messages stay suppressed)."""
    from worker.flows import consent

    settings, engine = _context()
    number = _number(phone, region or settings.default_phone_region)
    with engine.begin() as conn:
        change = consent.remove(conn, number, source="cli", evidence=note)
    if not change.changed:
        raise click.ClickException(f"{mask_phone(number)} is not on the list")
    click.echo(f"{mask_phone(number)}: removed")


@optout.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def optout_list(limit: int, as_json: bool) -> None:
    """The newest entries first, numbers masked (`export` gives them whole)."""
    from worker.flows import consent

    _, engine = _context()
    rows = consent.list_numbers(engine, limit)
    if as_json:
        print_json(rows)
        return
    table = Table("phone", "added", "source", "evidence")
    for row in rows:
        table.add_row(row["phone"], row["addedAt"], row["source"], row["evidence"] or "")
    console.print(table)
    console.print(f"{consent.count(engine):,} numbers on the list")


@optout.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_REGION
def optout_import(file: Path, region: str | None) -> None:
    """Add every number of FILE: a CSV with a `phone` column (and optionally `evidence`), or
    one number per line. A row that is not a number is refused with its line and reason."""
    from worker.flows import consent

    settings, engine = _context()
    with file.open(encoding="utf-8", newline="") as lines:
        result = consent.import_rows(
            engine,
            lines,
            region=region or settings.default_phone_region,
            types=settings.suppressed_types,
        )
    for line, _value, reason in result.refused or []:
        click.echo(f"line {line}: refused: {reason}", err=True)
    click.echo(
        f"{file.name}: {result.added:,} added, {result.already:,} already on the list, "
        f"{len(result.refused or []):,} refused; {result.suppressed:,} unsent messages suppressed"
    )
    if result.refused:
        sys.exit(1 if not (result.added or result.already) else 0)


@optout.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def optout_export(file: Path | None) -> None:
    """The whole list as CSV (phone in E.164, added_at, source, evidence), to FILE or stdout."""
    from worker.flows import consent

    _, engine = _context()
    lines = consent.export_csv(engine)
    if file is None:
        for line in lines:
            sys.stdout.write(line)
        return
    with file.open("w", encoding="utf-8", newline="") as out:
        out.writelines(lines)
    click.echo(f"wrote {file}")
