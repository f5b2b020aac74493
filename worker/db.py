"""Engine construction and transactions for SQLite and PostgreSQL.

SQLite: WAL, a busy timeout, and every transaction opened with `BEGIN IMMEDIATE` so a
claim (`UPDATE … RETURNING`) holds the write lock from its first statement; SQLAlchemy
drops `FOR UPDATE SKIP LOCKED` on SQLite, and this is what makes claims safe there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, create_engine, event, select, update
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import ColumnElement


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's `begin` event issue BEGIN itself (pysqlite's own is deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, poolclass=NullPool, connect_args={"timeout": 60}, hide_parameters=True
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # hide_parameters: a database error must not carry phone numbers or texts into logs.
    return create_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True, hide_parameters=True)


@lru_cache(maxsize=4)
def _engine_for(url: str, pid: int) -> Engine:
    return make_engine(url)


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL per process: a forked pool child never reuses its parent's sockets."""
    if url is None:
        from config import get_settings

        url = get_settings().database_url
    return _engine_for(url, os.getpid())


def claim_rows(
    engine: Engine,
    table: Table,
    *,
    where: Sequence[ColumnElement[bool]],
    order_by: Sequence[ColumnElement[Any]],
    limit: int,
    values: dict[str, Any],
    returning: Sequence[ColumnElement[Any]],
) -> list[Row[Any]]:
    """Take up to `limit` rows in one statement and commit before the caller does any I/O.

    PostgreSQL: `FOR UPDATE SKIP LOCKED` lets concurrent claimers pass each other. SQLite
    drops that clause, and the `BEGIN IMMEDIATE` of every transaction serialises claims.
    """
    # A materialised CTE runs once: PostgreSQL may re-run an IN (…LIMIT…) subquery per row
    # and then take more than `limit` rows.
    chosen = (
        select(table.c.pk)
        .where(*where)
        .order_by(*order_by)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("chosen")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    stmt = (
        update(table).where(table.c.pk == chosen.c.pk, *where).values(values).returning(*returning)
    )
    with engine.begin() as conn:
        return list(conn.execute(stmt))
