"""The feedback database: its tables and column types, the engine that reaches it, and migrations.

SQLite in WAL mode under the data dir by default; PostgreSQL (psycopg 3) when D3K2_DATABASE_URL names
one. The schema belongs to the Alembic migrations in ``d3k2/store/migrations``; ``upgrade`` brings a
database to head. Every connection is bounded in time (``CONNECT_TIMEOUT``, ``STATEMENT_TIMEOUT``): a
database that is down, frozen or locked costs its caller seconds, never a hang.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Dialect,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    text,
)
from sqlalchemy import DateTime as SqlDateTime
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from d3k2.core.errors import D3K2Error

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MAX_CARD_UUID = 128
MAX_SERVICE_ID = 128
MAX_RULE_ID = 128
MAX_INDICATOR = 16
# Seconds. libpq's connect_timeout covers the whole start-up (a frozen server accepts the TCP connection
# in its kernel and never answers); 2 is libpq's minimum.
CONNECT_TIMEOUT = 3
# Seconds a statement may run (PostgreSQL's statement_timeout) or wait for SQLite's write lock.
STATEMENT_TIMEOUT = 5.0
# Held while migrating PostgreSQL so that workers starting together do not race to create tables.
_PG_MIGRATION_LOCK = 0x64336B32


class StoreUnavailable(D3K2Error):
    """The feedback database cannot be reached or is busy: retry later; card requests are unaffected."""

    status = 503
    code = "database-unavailable"


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend; SQLite keeps no offset, so it stores naive UTC."""

    impl = SqlDateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_ID = BigInteger().with_variant(Integer(), "sqlite")
metadata = MetaData()
cards_served = Table(
    "cards_served",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("card_uuid", String(MAX_CARD_UUID), nullable=False),
    Column("service_id", String(128), nullable=False),
    Column("rule_id", String(128)),
    Column("indicator", String(16)),
    Column("served_at", UtcDateTime(), nullable=False),
)
feedback = Table(
    "feedback",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("dedup_key", String(64), nullable=False, unique=True),
    Column("service_id", String(128), nullable=False),
    Column("card_uuid", String(MAX_CARD_UUID), nullable=False),
    Column("rule_id", String(128)),
    Column("outcome", String(16), nullable=False),
    Column("accepted_suggestions", JSON(), nullable=False),
    Column("override_reason_system", Text()),
    Column("override_reason_code", Text()),
    Column("override_reason_display", Text()),
    Column("override_comment", Text()),
    Column("outcome_at", UtcDateTime()),
    Column("received_at", UtcDateTime(), nullable=False),
)
deployment_keys = Table(
    "deployment_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def database_url(raw: str) -> URL:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (SQLAlchemy's default is psycopg2)."""
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def open_engine(url: URL) -> Engine:
    """The engine of ``url``. Its errors never carry the statement's parameters (``hide_parameters``):
    they are clinicians' comments and reasons, and an error may reach a log."""
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # No pre-ping: a SQLite file has no connection that can go stale.
        engine = create_engine(url, hide_parameters=True, connect_args={"timeout": STATEMENT_TIMEOUT})
        event.listen(engine, "connect", _sqlite_pragmas)
    elif url.get_backend_name() == "postgresql":
        # Not pooled: a pooled connection to a frozen server hangs its next query (its statement_timeout
        # is the frozen server's to enforce), while a new one gives up after connect_timeout. The writer
        # connects once per batch and feedback once per POST: a few milliseconds, off the answer path.
        engine = create_engine(
            url,
            poolclass=NullPool,
            hide_parameters=True,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT,
                "options": f"-c statement_timeout={int(STATEMENT_TIMEOUT * 1000)}",
            },
        )
    else:
        engine = create_engine(url, hide_parameters=True)
    event.listen(engine, "connect", _remember_pid)
    event.listen(engine, "checkout", _refuse_other_process)
    return engine


def sqlite_wal(connection: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode, waiting up to ``timeout`` seconds for the other connections.

    Switching a new file to WAL needs it alone, and SQLite answers "database is locked" at once, without
    its busy handler, when another connection opening it at the same instant holds a lock (several
    workers' first requests on a fresh file): the switch is tried again until it succeeds or time is up.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    sqlite_wal(dbapi_connection, STATEMENT_TIMEOUT)
    cursor = dbapi_connection.cursor()
    try:
        # In WAL mode NORMAL survives a crash or restart of the process; only an OS crash or power loss
        # can drop the last commits. It saves an fsync on every batch.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(STATEMENT_TIMEOUT * 1000)}")
    finally:
        cursor.close()


# A store built before a fork (gunicorn --preload) hands its pooled connections to the child, where using
# them would corrupt the parent's (SQLAlchemy's recipe: the pool then opens a fresh one).
def _remember_pid(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["pid"] = os.getpid()


def _refuse_other_process(_dbapi: Any, record: Any, proxy: Any) -> None:
    pid = os.getpid()
    if record.info["pid"] != pid:
        record.dbapi_connection = proxy.dbapi_connection = None
        raise DisconnectionError(f"connection of process {record.info['pid']}, checked out in {pid}")


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction whose database failures are StoreUnavailable (HTTP 503)."""
    try:
        with engine.begin() as connection:
            yield connection
    except (OperationalError, InterfaceError) as exc:
        raise StoreUnavailable("the feedback database is unavailable; retry later") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable("the feedback database connection was lost; retry later") from exc
        raise


def upgrade(connection: Connection) -> None:
    """Upgrade the schema to the newest migration (a no-op when it is there already)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    elif connection.dialect.name == "sqlite":  # the transaction's first statement (FeedbackStore.migrate)
        # The same for SQLite: every worker of a fresh install migrates at startup, and without the write
        # lock taken first two of them create the same tables ("table ... already exists"). IMMEDIATE
        # takes it at once (waiting busy_timeout for another migrator) and keeps the DDL in one
        # transaction, which Python's sqlite3 would otherwise commit statement by statement.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
