"""Pushed reports (SMSBAT webhooks, BulkGate DLRs) and inbound SMS: stored, then applied.

Stub: helper B implements. Public surface:
    store_reports(engine, reports: list[Report], received_at) -> int
    store_inbound(engine, inbound: list[Inbound]) -> int
    apply_pending(engine, settings) -> dict[str, int]
    list_inbound(engine, limit: int = 100) -> list[dict]
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from config import Settings


def apply_pending(engine: Engine, settings: Settings) -> dict[str, int]:
    return {}


def list_inbound(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    return []
