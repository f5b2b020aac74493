"""What the `cascade` commands share: the console, the settings and the checked engine."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson
from rich.console import Console

from config import Settings

console = Console(soft_wrap=True)  # paths and ids must stay whole when piped


def load_settings() -> Settings:
    from pydantic import ValidationError

    from config import get_settings
    from config.settings import EnvFileMissing

    try:
        return get_settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        ]
        raise click.ClickException("invalid settings:\n" + "\n".join(lines)) from None
    except EnvFileMissing as exc:
        raise click.ClickException(str(exc)) from None


def checked_engine(settings: Settings | None = None) -> Any:
    """The engine of a database that has our schema, or one line saying it has not."""
    from worker.store.db import NoSchema, get_engine, require_schema

    url = (settings or load_settings()).database_url
    try:
        require_schema(url)
    except NoSchema as exc:
        raise click.ClickException(str(exc)) from None
    return get_engine(url)


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
