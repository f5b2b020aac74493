"""Outcome callbacks to producing apps. Stub: helper C implements.

Public surface:
    deliver_due(engine, settings) -> dict[str, int]
    list_callbacks(engine, state: str | None = None, limit: int = 100) -> list[dict]
    retry_dead(engine, pks: list[int] | None) -> int
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from config import Settings


def deliver_due(engine: Engine, settings: Settings) -> dict[str, int]:
    return {}


def list_callbacks(
    engine: Engine, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    return []


def retry_dead(engine: Engine, pks: list[int] | None) -> int:
    return 0
