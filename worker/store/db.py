"""Engine construction and transactions for SQLite and PostgreSQL.

SQLite: WAL, a busy timeout, and every transaction opened with `BEGIN IMMEDIATE` so a
claim (`UPDATE … RETURNING`) holds the write lock from its first statement; SQLAlchemy
drops `FOR UPDATE SKIP LOCKED` on SQLite, and this is what makes claims safe there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any, TypeAlias

import orjson
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    Row,
    String,
    Table,
    Text,
    any_,
    bindparam,
    cast,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import ColumnElement

# A row of any columns: SQLAlchemy types a row by its columns (Row[int, str, ...]), and
# `Row[Any]` is a row of exactly one.
AnyRow: TypeAlias = Row[*tuple[Any, ...]]


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's `begin` event issue BEGIN itself (pysqlite's own is deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, poolclass=NullPool, connect_args={"timeout": 60}, hide_parameters=True
        )
        event.listen(engine, "connect", sqlite_connect)
        event.listen(engine, "begin", sqlite_begin)
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


class NoSchema(RuntimeError):
    """The database lacks our tables: `cascade db upgrade` never ran against it."""


def require_schema(url: str) -> None:
    """Raise NoSchema, naming the database (password masked), before anything needs a table.
    A SQLite file that is not there is reported, not created."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from worker.core.redact import mask_url

    problem = NoSchema(f"{mask_url(url)} has no cascade schema; run `cascade db upgrade`")
    file = make_url(url).database if url.startswith("sqlite") else None
    if file not in (None, "", ":memory:") and not os.path.exists(file):
        raise problem
    if not {"alembic_version", "messages"} <= set(inspect(get_engine(url)).get_table_names()):
        raise problem


def among(
    conn: Connection | Engine, column: ColumnElement[Any], values: Collection[Any]
) -> ColumnElement[bool]:
    """`column IN (values)`, sent to PostgreSQL as one array: rendering and parsing an IN list
    of 1,000 keys took more client CPU (≈20 ms) than the statement took to run."""
    if conn.dialect.name == "postgresql":
        # Text, not VARCHAR(n): a cast to VARCHAR(n) cuts a longer value to a prefix that
        # may match a stored one.
        kind = Text() if isinstance(column.type, String) else column.type
        literal = bindparam(None, array_literal(list(values)), type_=Text)
        return column == any_(cast(literal, ARRAY(kind)))
    return column.in_(values)


def array_literal(values: Sequence[Any]) -> str:
    """A PostgreSQL array literal (`{1,2,NULL}`, `{"a","b\\"c"}`) of driver-ready values, for
    one text parameter cast to the array type: psycopg dumps a list element by element in
    Python, 2.5 ms for a batch's 1,000 keys and 1,000 message ids against 0.8 ms this way."""
    if all(type(v) is int for v in values):
        return "{" + ",".join(map(str, values)) + "}"
    return "{" + ",".join(map(_element, values)) + "}"


def _element(value: Any) -> str:
    """One element: NULL unquoted, every other value quoted, its quotes and backslashes
    escaped, so no text (`NULL`, braces, commas, blanks) is read as anything but itself."""
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
    # and then take more than `limit` rows. The UPDATE joins on the key alone: repeating the
    # filter there let the planner, misled by a burst of fresh rows, scan every ready row once
    # per chosen row (33 s for 1,000 of 22,000 measured). FOR UPDATE has already re-checked
    # the filter on each row it locked.
    chosen = (
        select(table.c.pk)
        .where(*where)
        .order_by(*order_by)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("chosen")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    stmt = update(table).where(table.c.pk == chosen.c.pk).values(values).returning(*returning)
    with engine.begin() as conn:
        return list(conn.execute(stmt).all())


def insert_or_skip(conn: Connection, table: Table) -> Any:
    """An INSERT of this dialect, which both give `on_conflict_do_nothing`."""
    return (postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert)(table)


def insert_new(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], key: str
) -> set[Any]:
    """Insert the rows whose `key` is not taken yet; answer the keys actually inserted.

    PostgreSQL: COPY into a temporary table, then one `INSERT … SELECT … ON CONFLICT DO
    NOTHING`. A multi-row INSERT spends most of its time binding parameters in Python
    (≈0.7 s per 1,000 messages measured here, against ≈0.05 s this way).
    """
    if not rows:
        return set()
    if conn.dialect.name != "postgresql":
        stmt = (
            sqlite_insert(table)
            .on_conflict_do_nothing(index_elements=[key])
            .returning(table.c[key])
        )
        return set(conn.execute(stmt, list(rows)).scalars())
    columns = ", ".join(rows[0])
    staging = f"_intake_{table.name}"
    with _raw_cursor(conn, f"INSERT INTO {table.name} via COPY") as cursor:
        # Made afresh each time and gone at commit: nothing outlives a schema change.
        cursor.execute(f"DROP TABLE IF EXISTS pg_temp.{staging}")
        cursor.execute(
            f"CREATE TEMP TABLE {staging} ON COMMIT DROP "
            f"AS SELECT {columns} FROM {table.name} WITH NO DATA"
        )
        _copy(cursor, staging, table, rows)
        cursor.execute(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {staging} "
            f"ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
        )
        return {found[0] for found in cursor.fetchall()}


def insert_new_by_copy(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    key: str,
    meanwhile: Callable[[], None] | None = None,
) -> set[Any]:
    """`insert_new` betting that every key is new, as in a fresh campaign.

    PostgreSQL: COPY straight into the table, without `insert_new`'s staging table and
    `ON CONFLICT` (≈7 of 16 ms of server time per 1,000 messages, measured), and without
    looking the keys up first (the planner seq-scans an unanalysed table for `= ANY`). A key
    already taken fails the COPY on the unique index: it is undone to its savepoint and the
    rows go through `insert_new`, which skips the taken keys. SQLite: `insert_new`.
    `meanwhile` runs once the rows are sent, while the server is still taking them in
    (`_copy`); it is not run where no COPY is made.
    """
    if not rows:
        return set()
    if conn.dialect.name != "postgresql":
        return insert_new(conn, table, rows, key)
    from psycopg.errors import UniqueViolation

    try:
        with conn.begin_nested(), _raw_cursor(conn, f"COPY {table.name}") as cursor:
            _copy(cursor, table.name, table, rows, meanwhile)
    except DBAPIError as exc:
        if not isinstance(exc.orig, UniqueViolation):
            raise
        return insert_new(conn, table, rows, key)
    return {row[key] for row in rows}


def insert_rows(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows (event history); PostgreSQL takes them by COPY, the cheapest way in."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(table.insert(), list(rows))
        return
    with _raw_cursor(conn, f"COPY {table.name}") as cursor:
        _copy(cursor, table.name, table, rows)


def bulk_update(
    conn: Connection,
    table: Table,
    changes: Mapping[Any, Mapping[str, Any]],
    *,
    only_if: Mapping[str, Any] | None = None,
) -> set[Any]:
    """Write per-row column changes keyed by primary key: one statement per set of columns.

    `only_if` writes only the rows whose columns still hold those values (a claim token),
    with no read before; the answer is the keys written. PostgreSQL gets every row of a
    set in one `UPDATE … FROM unnest(arrays)`: a third of the client CPU of an executemany.
    """
    shapes: dict[tuple[str, ...], list[tuple[Any, Mapping[str, Any]]]] = {}
    for pk, change in changes.items():
        if change:
            shapes.setdefault(tuple(sorted(change)), []).append((pk, change))
    guard = dict(only_if or {})
    if guard and conn.dialect.name != "postgresql":
        # SQLite: the transaction already holds the write lock (BEGIN IMMEDIATE).
        wanted = [pk for rows in shapes.values() for pk, _ in rows]
        held = set(
            conn.execute(
                select(table.c.pk).where(
                    among(conn, table.c.pk, wanted),
                    *(table.c[name] == value for name, value in guard.items()),
                )
            ).scalars()
        )
        shapes = {n: [r for r in rows if r[0] in held] for n, rows in shapes.items()}
    written: set[Any] = set()
    for names, rows in shapes.items():
        if not rows:
            continue
        if conn.dialect.name == "postgresql":
            sql, params = _unnest_update(conn, table, names, rows, guard)
            conn.exec_driver_sql(_BY_KEY)
            written.update(key for (key,) in conn.exec_driver_sql(sql, params))
            conn.exec_driver_sql(_AS_BEFORE)
            continue
        stmt = (
            update(table)
            .where(table.c.pk == bindparam("b_pk"))
            .values({name: bindparam("v_" + name) for name in names})
        )
        conn.execute(
            stmt, [{"b_pk": pk, **{"v_" + k: v for k, v in change.items()}} for pk, change in rows]
        )
        written.update(pk for pk, _ in rows)
    return written


# The rows of a bulk update are found by primary key, an index probe each (a nested loop
# over the key list), priced for a table in memory: at the server's default
# random_page_cost (4, a disk seek a probe), a table of 100,000 rows looked cheaper to read
# whole and hash, and every batch's submit write seq-scanned `messages` (97 of 100 batches
# at 100,000, 47-62 ms each; auto_explain) and locked its rows in the table's order, not in
# key order as every other writer does. Joins are not forced: with the small tables of a
# young database that made a loop over the key list for every row. For the statement
# alone; failed, the transaction's end undoes it.
_BY_KEY = "SET LOCAL random_page_cost = 1.1"
_AS_BEFORE = "SET LOCAL random_page_cost TO DEFAULT"


def _unnest_update(
    conn: Connection,
    table: Table,
    names: tuple[str, ...],
    rows: list[tuple[Any, Mapping[str, Any]]],
    guard: Mapping[str, Any],
) -> tuple[str, dict[str, Any]]:
    """A column holding one value across the rows goes as one parameter, not an array: a
    batch's outcomes share most of theirs (state, times), and arrays cost client CPU."""
    # In key order: with the nested-loop plan it gets (`_BY_KEY`), rows are locked in the
    # order every other writer locks them.
    rows = sorted(rows, key=lambda row: row[0])
    params: dict[str, Any] = {"k": array_literal([key for key, _ in rows])}
    arrays = [f"CAST(%(k)s AS {table.c.pk.type.compile(dialect=conn.dialect)}[])"]
    varying = ["pk"]
    sets = []
    for i, name in enumerate(names):
        column = table.c[name]
        convert = _converter(column)
        values = [convert(change[name]) for _, change in rows]
        kind = column.type.compile(dialect=conn.dialect)
        # Text goes in unbounded and is assigned: an explicit cast to VARCHAR(n) cuts an
        # over-long value silently, where the assignment refuses it as an INSERT would.
        sent = "TEXT" if isinstance(column.type, JSON | String) else kind
        value = f"CAST(%(c{i})s AS {sent})"
        if all(v == values[0] for v in values):
            params[f"c{i}"] = values[0]
        else:
            params[f"c{i}"] = array_literal(values)
            arrays.append(f"CAST(%(c{i})s AS {sent}[])")
            varying.append(name)
            value = f"v.{name}"
        sets.append(
            f"{name} = CAST({value} AS {kind})"
            if isinstance(column.type, JSON)
            else f"{name} = {value}"
        )
    conditions = [f"{table.name}.pk = v.pk"]
    for i, (name, value) in enumerate(guard.items()):
        params[f"g{i}"] = _converter(table.c[name])(value)
        conditions.append(f"{table.name}.{name} = %(g{i})s")
    sql = (
        f"UPDATE {table.name} SET {', '.join(sets)} "
        f"FROM unnest({', '.join(arrays)}) AS v({', '.join(varying)}) "
        f"WHERE {' AND '.join(conditions)} RETURNING {table.name}.pk"
    )
    return sql, params


def _copy(
    cursor: Any,
    target: str,
    table: Table,
    rows: Sequence[dict[str, Any]],
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """COPY rows into `target`, a table with `table`'s columns; `meanwhile` runs after the
    last row is written and before the server is waited for (it works through them in
    parallel: ≈10 ms per 1,000 messages that would otherwise be spent waiting).

    Values are made ready a column at a time (`_copy_column`): psycopg formats an aware
    datetime in ≈0.8 µs, four fifths of a 25-column row's cost (measured), so each distinct
    one is formatted once; a column already of its type costs one pass over its types.
    """
    names = list(rows[0])
    # Transposed in C: the rows as tuples (itemgetter), then zip(*…) into columns.
    tuples = map(itemgetter(*names), rows) if len(names) > 1 else ([row[names[0]]] for row in rows)
    columns = [
        _copy_column(table.c[name], list(column))
        for name, column in zip(names, zip(*tuples, strict=True), strict=True)
    ]
    with cursor.copy(f"COPY {target} ({', '.join(names)}) FROM STDIN") as copy:
        for values in zip(*columns, strict=True):
            copy.write_row(values)
        if meanwhile is not None:
            meanwhile()


_NONE = type(None)


def _copy_column(column: Any, values: list[Any]) -> list[Any]:
    """One column's values as COPY takes them, with the checks `_converter` makes."""
    kind = column.type
    if isinstance(kind, Float | Integer | String):
        want = float if isinstance(kind, Float) else int if isinstance(kind, Integer) else str
        if set(map(type, values)) <= {want, _NONE}:
            return values
    elif isinstance(kind, DateTime) or isinstance(getattr(kind, "impl", None), DateTime):
        texts = {value: timestamp_text(value) for value in set(values)}
        return list(map(texts.__getitem__, values))
    return list(map(_converter(column), values))


def timestamp_text(value: Any) -> Any:
    """An aware datetime as ISO 8601 text, which PostgreSQL reads exactly."""
    return _aware(value).isoformat() if isinstance(value, datetime) else value


def _converter(column: Any) -> Callable[[Any], Any]:
    """Make a value what the driver takes for `column`, with the checks its type would make.

    One Python type per column, too: psycopg cannot send an array mixing int and float.
    """
    kind = column.type
    if isinstance(kind, JSON):
        return lambda v: None if v is None else orjson.dumps(v).decode()
    if isinstance(kind, Float):
        return lambda v: None if v is None else float(v)
    if isinstance(kind, Integer):
        return lambda v: None if v is None else int(v)
    if isinstance(kind, String):
        return lambda v: None if v is None else str(v)
    return _aware


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError("naive datetime given for a UTC column")
    return value


@contextmanager
def _raw_cursor(conn: Connection, statement: str) -> Iterator[Any]:
    """A psycopg cursor whose errors carry no row values (COPY's context quotes the row),
    as `hide_parameters` keeps them out of SQLAlchemy's."""
    import psycopg  # here: only PostgreSQL gets here, and SQLite installs go without it

    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor:
            yield cursor
    except psycopg.Error as exc:
        bare = type(exc)(exc.diag.message_primary or type(exc).__name__)
        raise DBAPIError.instance(
            statement, None, bare, psycopg.Error, hide_parameters=True
        ) from None
