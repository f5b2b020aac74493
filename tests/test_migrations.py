"""The Alembic migrations, on both backends: they build what the models declare."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from worker.store.db import make_engine
from worker.store.models import Base

# Migration 0006 made messages.provider_message_id unique through a partial index on
# PostgreSQL only; SQLite keeps the table-level UNIQUE of 0001, which answers the same.
KNOWN = {"sqlite": [("add_index", "ix_messages_provider_message_id")]}


def _differences(url: str) -> list[tuple[Any, ...]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    return [(d[0], getattr(d[1], "name", d[1])) for d in diff]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_migrations_build_the_schema_the_models_declare(
    backend: str, database_factory: Callable[[str], str]
) -> None:
    assert _differences(database_factory(backend)) == KNOWN.get(backend, [])
