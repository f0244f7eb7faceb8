"""Feedback storage (SQLAlchemy 2): the cards served and what clinicians did with them.

SQLite in WAL mode under the data dir by default; PostgreSQL (psycopg 3) when D3K2_DATABASE_URL names
one. The schema belongs to the Alembic migrations in ``d3k2/migrations``; ``migrate()`` brings a
database to head. Feedback names only a card uuid, so every served card is recorded with its rule
(``source.topic.code``): the governance report joins the two.

Cards served are written off the request path. A hook answer only queues its rows
(``FeedbackStore.enqueue_cards``, a few microseconds); after its response is sent, the answering thread
writes the queue when it is due (``ServedWriter.write_due``: ``due_rows`` rows, or the oldest
``due_age`` seconds old), up to ``batch_rows`` rows per transaction. One daemon thread per store and
process (``ServedWriter``, started on the first answer, restarted in a forked child) writes what is left
when answers stop (rows ``interval`` seconds old) and retries failed batches. Feedback is
written synchronously, as before; ``record_feedback`` and ``report`` first flush this process's queue,
so feedback that follows an answer of the same process by a millisecond still finds its card's rule.
Feedback on a card served by another worker whose batch is not written yet is stored without a rule;
``report`` takes the rule from ``cards_served`` then (the row lands within a batch interval).

What can be lost, and when (feedback rows never: they are written before the POST is answered):

- SIGKILL, OOM kill or a crash of a worker: the cards-served rows not yet written (under load the last
  ``due_age`` seconds of answers; after the last answer, what the thread has not written yet: it looks
  every ``interval`` seconds and writes rows ``interval`` old, so at most 2 × ``interval``; plus
  whatever was queued while the database was failing). A graceful
  stop (gunicorn's worker_exit hook in docker/gunicorn.conf.py, atexit, ``FeedbackStore.close``) writes
  the queue first.
- The database failing: a batch is retried with exponential backoff, then dropped after
  ``max_attempts`` failures; meanwhile answers keep queueing up to ``capacity`` rows, and the rows of an
  answer that finds the queue full are dropped. A stop while the database is down drops what is queued.
- Every drop is counted (``ServedWriter.stats``, the ``listener``: metrics) and logged with counts only.

The feedback of a lost card stays stored, attributed to no rule ("unknown card" in the report).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
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
    func,
    insert,
    select,
    text,
)
from sqlalchemy import DateTime as SqlDateTime
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from d3k2.core.errors import BadRequest, D3K2Error
from d3k2.core.hooks import FeedbackItem

log = logging.getLogger("d3k2.store.feedback")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MAX_CARD_UUID = 128
MAX_SERVICE_ID = 128
MAX_RULE_ID = 128
MAX_INDICATOR = 16
TOP_REASONS = 3
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


def utcnow() -> datetime:
    return datetime.now(UTC)


def database_url(raw: str) -> URL:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (SQLAlchemy's default is psycopg2)."""
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 5.0})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.get_backend_name() == "postgresql":
        # A short connect timeout: a database that is down must cost a feedback POST seconds, not minutes.
        return create_engine(
            url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args={"connect_timeout": 3}
        )
    # No pre-ping: a SQLite file has no connection that can go stale, and the ping costs a query per answer.
    return create_engine(url)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL survives a crash or restart of the process; only an OS crash or power loss
        # can drop the last commits. It saves an fsync on every answer (about 0.25 ms of ~1.3 ms).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


def _parse_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def feedback_row(service_id: str, item: FeedbackItem, received_at: datetime) -> dict[str, Any]:
    """One feedback item as a row; ``dedup_key`` hashes everything that makes two items different."""
    if len(item.card) > MAX_CARD_UUID:
        raise BadRequest(f"feedback card must be at most {MAX_CARD_UUID} characters")
    reason = item.overrideReason.reason if item.overrideReason else None
    comment = _text(item.overrideReason.userComment) if item.overrideReason else None
    outcome_at = _parse_time(item.outcomeTimestamp)
    accepted = sorted({suggestion.id for suggestion in item.acceptedSuggestions})
    row = {
        "service_id": service_id,
        "card_uuid": item.card,
        "rule_id": None,
        "outcome": item.outcome,
        "accepted_suggestions": accepted,
        "override_reason_system": _text(reason.system) if reason else None,
        "override_reason_code": _text(reason.code) if reason else None,
        "override_reason_display": _text(reason.display) if reason else None,
        "override_comment": comment,
        "outcome_at": outcome_at,
        "received_at": received_at,
    }
    identity = [
        service_id,
        item.card,
        item.outcome,
        outcome_at.isoformat() if outcome_at else item.outcomeTimestamp,
        accepted,
        row["override_reason_system"],
        row["override_reason_code"],
        comment,
    ]
    row["dedup_key"] = hashlib.sha256(orjson.dumps(identity)).hexdigest()
    return row


def served_rows(
    service_id: str, cards: Sequence[Mapping[str, Any]], served_at: datetime
) -> list[dict[str, Any]]:
    rows = []
    for card in cards:
        uuid = card.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            continue
        source = card.get("source")
        topic = source.get("topic") if isinstance(source, Mapping) else None
        rule = topic.get("code") if isinstance(topic, Mapping) else None
        indicator = card.get("indicator")
        # Cut to the columns' sizes: one over-long value must not fail a whole batch on PostgreSQL.
        rows.append(
            {
                "card_uuid": uuid[:MAX_CARD_UUID],
                "service_id": service_id[:MAX_SERVICE_ID],
                "rule_id": rule[:MAX_RULE_ID] if isinstance(rule, str) else None,
                "indicator": indicator[:MAX_INDICATOR] if isinstance(indicator, str) else None,
                "served_at": served_at,
            }
        )
    return rows


_SERVED_COLUMNS = ("card_uuid", "service_id", "rule_id", "indicator", "served_at")


@dataclass(frozen=True)
class _ServedInsert:
    """The cards-served INSERT compiled once per dialect, with the columns' bind processors."""

    sql: str
    positional: bool
    order: tuple[str, ...]
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]

    @classmethod
    def of(cls, dialect: Dialect) -> _ServedInsert:
        compiled = insert(cards_served).compile(dialect=dialect, column_keys=list(_SERVED_COLUMNS))
        processors = []
        for name in _SERVED_COLUMNS:
            # The dialect's own type (SQLite's DATETIME writes text): the generic one would hand datetimes
            # to sqlite3's default adapter, deprecated in Python 3.12, whose text drops ".000000".
            process = cards_served.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors.append((name, process))
        order = tuple(compiled.positiontup or _SERVED_COLUMNS)
        return cls(str(compiled), dialect.positional, order, tuple(processors))


_served_inserts: dict[tuple[str, str, str], _ServedInsert] = {}


def _insert_served(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """``INSERT INTO cards_served`` of ``rows`` as SQLAlchemy's ``execute(insert(cards_served), rows)``
    binds them, given to the driver's executemany directly: the rows of one answer share their
    served_at, which is converted once instead of once per row (a quarter of the batch's time)."""
    dialect = connection.dialect
    key = (dialect.name, dialect.driver, dialect.paramstyle)
    statement = _served_inserts.get(key)
    if statement is None:
        statement = _served_inserts[key] = _ServedInsert.of(dialect)
    converted: dict[tuple[str, Any], Any] = {}
    bound = []
    for row in rows:
        values = dict(row)
        for name, process in statement.processors:
            raw = (name, values[name])
            value = converted.get(raw, converted)
            if value is converted:
                value = converted[raw] = process(values[name])
            values[name] = value
        bound.append(tuple(values[name] for name in statement.order) if statement.positional else values)
    connection.exec_driver_sql(statement.sql, bound)


def _describe(exc: BaseException) -> str:
    """An error for the log: its class and the driver's first line (no SQL, no parameters)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


@dataclass
class WriterStats:
    """Counts of this process's writer (reset in a forked child). Rows: enqueued = written + dropped +
    still queued."""

    enqueued: int = 0
    written: int = 0
    batches: int = 0
    write_errors: int = 0  # failed batch attempts (each retried or, the last one, dropped)
    dropped_queue_full: int = 0
    dropped_after_retries: int = 0
    dropped_at_close: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_queue_full + self.dropped_after_retries + self.dropped_at_close


# What the writer reports to its listener (kind, rows): a batch that failed (it is retried), rows dropped.
WRITE_ERROR = "write-error"
DROPPED_QUEUE_FULL = "dropped-queue-full"
DROPPED_AFTER_RETRIES = "dropped-after-retries"
DROPPED_AT_CLOSE = "dropped-at-close"
Listener = Callable[[str, int], None]

# Guards starting a writer thread; made anew in a forked child (the parent may have held it).
_start_lock = threading.Lock()
_writers: weakref.WeakSet[ServedWriter] = weakref.WeakSet()
_stores: weakref.WeakSet[FeedbackStore] = weakref.WeakSet()


class ServedWriter:
    """Inserts cards-served rows in batches from a daemon thread; see the module docstring.

    ``enqueue`` is all a hook answer pays for. ``flush`` writes what is queued in the calling thread;
    ``close`` writes it and stops the thread. The writer holds the engine, not the store: a store that
    is dropped without ``close`` (tests) lets its thread write what is left and end."""

    def __init__(
        self,
        engine: Engine,
        prepare: Callable[[], Callable[[], None] | None] = lambda: None,
        *,
        batch_rows: int = 500,
        interval: float = 1.0,
        due_rows: int = 200,
        due_age: float = 0.1,
        capacity: int = 50_000,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 15.0,
        idle_check: float = 5.0,
        warn_every: float = 10.0,
    ) -> None:
        self._engine = engine
        self._prepare = prepare  # gives the store's ensure_schema while the store lives
        self.batch_rows = batch_rows
        self.interval = interval
        self.due_rows = due_rows
        self.due_age = due_age
        self.capacity = capacity
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._idle_check = idle_check
        self._warn_every = warn_every
        self.listener: Listener | None = None
        self._closing = False
        self._abandoned = False
        self._begin_process(os.getpid())
        _writers.add(self)

    def _begin_process(self, pid: int) -> None:
        """State of the process ``pid``: at construction, and in a forked child, where the parent's
        thread does not exist, its locks may be held, and its queued rows are the parent's to write."""
        self._pid = pid
        self._cond = threading.Condition(threading.Lock())
        self._write_lock = threading.Lock()
        self._pending: deque[dict[str, Any]] = deque()
        self._first_at: float | None = None  # when the queue last went from empty to not empty
        self._retry: list[dict[str, Any]] = []
        self._attempts = 0
        self._thread: threading.Thread | None = None
        self._next_warning = 0.0
        self._unwarned_drops = 0
        self.stats = WriterStats()

    def _adopt(self, start: bool) -> None:
        """Begin this process's state if it is another's (a fork); with ``start``, start the thread."""
        with _start_lock:
            if self._pid != os.getpid():
                self._begin_process(os.getpid())
            if start and self._thread is None and not self._closing:
                thread = threading.Thread(
                    target=self._run, args=(self._cond,), name="d3k2-cards-served-writer", daemon=True
                )
                thread.start()
                self._thread = thread

    @property
    def queued(self) -> int:
        """Rows waiting to be written (queued, or a failed batch waiting for its retry)."""
        return len(self._pending) + len(self._retry)

    def enqueue(self, rows: Sequence[dict[str, Any]]) -> bool:
        """Queue rows for the writer thread; False when they were dropped (queue full, or closed)."""
        if not rows:
            return True
        if self._thread is None or self._pid != os.getpid():
            self._adopt(start=True)
        count = len(rows)
        with self._cond:
            self.stats.enqueued += count
            closed = self._closing
            before = len(self._pending)
            accepted = not closed and before + count <= self.capacity
            if accepted:
                if before == 0:
                    self._first_at = time.monotonic()
                self._pending.extend(rows)
                # Wake the writer for a full batch only: it looks for old rows on its own every
                # `interval`. A thread woken at every new batch (≈ 10 times a second under load) made
                # every answer 100 µs slower on this 2-core VM, on the other core, though it wrote nothing.
                if before < self.batch_rows <= before + count:
                    self._cond.notify()
            elif closed:
                self.stats.dropped_at_close += count
            else:
                self.stats.dropped_queue_full += count
        if closed:  # an answer finishing while the process stops
            log.warning("cards served: %d rows of an answer after close not recorded", count)
            self._notify(DROPPED_AT_CLOSE, count)
        elif not accepted:
            self._dropped(DROPPED_QUEUE_FULL, count)
        return accepted

    def _run(self, cond: threading.Condition) -> None:
        """The thread. ``cond`` is its process's: state begun anew (after a fork) is not its own."""

        def waiting() -> bool:
            return cond is self._cond and not self._closing and not self._abandoned

        delay: float | None = None  # set after a failed write: the pause before its retry
        while True:
            with cond:
                if delay is not None:  # back off; only close() cuts it short
                    until = time.monotonic() + delay
                    while waiting() and (left := until - time.monotonic()) > 0:
                        cond.wait(left)
                else:
                    while waiting() and not self._pending and not self._retry:
                        # Rows are not announced: look every `interval` (and a store dropped without
                        # close() must be noticed).
                        cond.wait(min(self._idle_check, self.interval))
                    # Gather until the oldest queued row is `interval` old; a full batch, or a failed
                    # write of an answer (a retry), wakes it early. Under load the answers write first.
                    while (
                        waiting()
                        and self._pending
                        and not self._retry
                        and len(self._pending) < self.batch_rows
                    ):
                        left = (self._first_at or 0.0) + self.interval - time.monotonic()
                        if left <= 0:
                            break
                        cond.wait(left)
                    if waiting() and not self._retry and not self._due_for_thread():
                        continue  # the answers wrote the queue meanwhile: what is queued now is young
                stopping = self._closing or self._abandoned
            if cond is not self._cond:
                return
            try:
                delay = self._write_all(only_due=not stopping)
            except Exception:  # a bug: keep the thread (and the rows) alive
                log.exception("cards-served writer: unexpected error")
                delay = self.backoff
            if stopping:
                return

    def _due_for_thread(self) -> bool:
        """A full batch, or rows ``interval`` old: the caller holds ``_cond``."""
        if len(self._pending) >= self.batch_rows:
            return True
        first = self._first_at
        return bool(self._pending) and first is not None and time.monotonic() - first >= self.interval

    def _write_all(self, only_due: bool = False) -> float | None:
        """Write batches until the queue is empty (None) or one fails (the pause before retrying).
        With ``only_due`` (the thread, while answers flow), stop when what is left is neither a full
        batch nor old: the answers write it."""
        with self._write_lock:
            while True:
                if only_due and not self._retry:
                    with self._cond:
                        if not self._due_for_thread():
                            return None
                written, ok = self._write_batch()
                if not ok:
                    return min(self.backoff * 2.0 ** max(self._attempts - 1, 0), self.max_backoff)
                if not written:
                    return None

    def _write_batch(self) -> tuple[int, bool]:
        """One transaction; the caller holds ``_write_lock``. (rows written, success)."""
        if self._retry:
            batch = self._retry
        else:
            with self._cond:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.batch_rows))]
                if not self._pending:
                    self._first_at = None
            if not batch:
                return 0, True
        try:
            ensure_schema = self._prepare()
            if ensure_schema is not None:
                ensure_schema()
            with self._engine.begin() as connection:
                _insert_served(connection, batch)
        except Exception as exc:
            self._attempts += 1
            self.stats.write_errors += 1
            if self._attempts >= self.max_attempts:
                self._retry, self._attempts = [], 0
                self.stats.dropped_after_retries += len(batch)
                log.error(
                    "cards served: dropped a batch of %d rows after %d failed attempts (%s)",
                    len(batch),
                    self.max_attempts,
                    _describe(exc),
                )
                self._notify(WRITE_ERROR, len(batch))
                self._notify(DROPPED_AFTER_RETRIES, len(batch))
            else:
                self._retry = batch
                log.warning(
                    "cards served: writing a batch of %d rows failed (attempt %d of %d, retrying): %s",
                    len(batch),
                    self._attempts,
                    self.max_attempts,
                    _describe(exc),
                )
                self._notify(WRITE_ERROR, len(batch))
            return 0, False
        self._retry, self._attempts = [], 0
        self.stats.written += len(batch)
        self.stats.batches += 1
        return len(batch), True

    def write_due(self) -> None:
        """Called by an answer after its response is sent (``Response.call_on_close``): write the queue
        in this thread when it is due — ``due_rows`` rows, or its oldest row ``due_age`` seconds old.

        Under load the answers write every batch this way and the thread only writes what is left when
        traffic stops. A thread writing alongside the answers would cost more than the rows: SQLite
        gives up the GIL at every step, and each time the answering thread has to hand it over and
        wait to get it back (140 µs per answer, measured, against ≈ 12 µs for the rows themselves).
        Never waits: when the thread is writing, or retrying after a failure, this leaves it to it.
        """
        pending = len(self._pending)
        if not pending or self._retry or self._pid != os.getpid():
            return
        first = self._first_at
        if pending < self.due_rows and (first is None or time.monotonic() - first < self.due_age):
            return
        if not self._write_lock.acquire(blocking=False):
            return
        try:
            for _ in range(-(-pending // self.batch_rows)):
                written, ok = self._write_batch()
                if not ok:  # the thread retries it, with its backoff
                    with self._cond:
                        self._cond.notify()
                    break
                if not written:
                    break
        except Exception:  # a bug: the rows stay queued for the thread; the answer was sent already
            log.exception("cards-served writer: unexpected error writing after an answer")
        finally:
            self._write_lock.release()

    def flush(self, timeout: float | None = None) -> bool:
        """Write, in this thread, the rows queued before the call: True when they are all in the
        database. One attempt per batch: after a failure the rest stays queued for the writer thread,
        which retries. ``timeout`` bounds the wait for a batch the thread is writing."""
        if self._pid != os.getpid():
            self._adopt(start=False)
        if not self._write_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            # The batches queued now (a failed one first); rows queued meanwhile wait for the thread.
            batches = bool(self._retry) + -(-len(self._pending) // self.batch_rows)
            return all(self._write_batch()[1] for _ in range(batches))
        finally:
            self._write_lock.release()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the thread (idempotent). Rows that cannot be written now (the
        database fails, or the thread is stuck past ``timeout``) are dropped and counted; rows queued
        after close are dropped too."""
        if self._pid != os.getpid():
            self._adopt(start=False)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self.flush(timeout)
            with self._write_lock:
                left = self.queued
                self._retry = []
        else:  # still writing (a hung database): its batch is its own; what waits behind it is lost
            left = len(self._pending)
        with self._cond:
            self._pending.clear()
        if left:
            self.stats.dropped_at_close += left
            log.error("cards served: %d rows not written at close (the database failed)", left)
            self._notify(DROPPED_AT_CLOSE, left)

    def abandon(self) -> None:
        """The store is gone without close(): the thread writes what is queued and ends (no lock is
        taken here, so that a garbage collection may call it anywhere)."""
        self._abandoned = True

    def _dropped(self, kind: str, rows: int) -> None:
        """Warn at most once per ``warn_every`` seconds: a database down for long must not flood the log."""
        self._unwarned_drops += rows
        now = time.monotonic()
        if now >= self._next_warning:
            log.warning(
                "cards served: queue full (%d rows), dropped %d rows since the last warning",
                self.capacity,
                self._unwarned_drops,
            )
            self._unwarned_drops = 0
            self._next_warning = now + self._warn_every
        self._notify(kind, rows)

    def _notify(self, kind: str, rows: int) -> None:
        listener = self.listener
        if listener is None:
            return
        try:
            listener(kind, rows)
        except Exception:
            log.exception("cards-served writer: the listener failed")


def close_served_writers(timeout: float = 10.0) -> None:
    """Write and stop every writer of this process: at exit, and from gunicorn's worker_exit hook."""
    pid = os.getpid()
    for writer in list(_writers):
        if writer._pid == pid:
            writer.close(timeout)


def _after_fork_in_child() -> None:
    """A child does not inherit threads, and connections shared with the parent must not be used:
    new locks, fresh pools (``dispose(close=False)`` leaves the parent's connections to the parent)."""
    global _start_lock
    _start_lock = threading.Lock()
    for store in list(_stores):
        store.engine.dispose(close=False)
    for writer in list(_writers):
        writer._begin_process(os.getpid())


atexit.register(close_served_writers)
os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class Stored:
    new: tuple[bool, ...]  # per item: stored now (True) or a duplicate of one stored before (False)

    @property
    def received(self) -> int:
        return len(self.new)

    @property
    def stored(self) -> int:
        return sum(self.new)

    @property
    def duplicates(self) -> int:
        return self.received - self.stored


@dataclass(frozen=True)
class ReasonCount:
    code: str | None  # None: overridden without a reason (the sandbox's plain "Dismiss")
    system: str | None
    count: int

    @property
    def label(self) -> str:
        return self.code or "(no reason given)"


@dataclass(frozen=True)
class RuleReport:
    rule: str | None  # None: feedback on cards this store never saw served
    served: int = 0
    shown: int = 0
    accepted: int = 0
    overridden: int = 0
    feedback: int = 0
    top_reasons: list[ReasonCount] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.shown if self.shown else None


@dataclass(frozen=True)
class Report:
    since: datetime | None
    rules: list[RuleReport]

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "rules": [
                {**asdict(rule), "acceptance_rate": rule.acceptance_rate, "rule": rule.rule}
                for rule in self.rules
            ],
        }

    def to_text(self) -> str:
        header = f"Feedback per rule since {self.since.isoformat()}" if self.since else "Feedback per rule"
        head = ("rule", "shown", "served", "accepted", "overridden", "accept%", "top override reasons")
        lines = [header, ""]
        table = [head]
        for rule in self.rules:
            rate = rule.acceptance_rate
            table.append(
                (
                    rule.rule or "(unknown card)",
                    str(rule.shown),
                    str(rule.served),
                    str(rule.accepted),
                    str(rule.overridden),
                    f"{rate * 100:.1f}" if rate is not None else "-",
                    ", ".join(f"{r.label} ({r.count})" for r in rule.top_reasons) or "-",
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        for row in table:
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:], strict=True)
            ]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        if not self.rules:
            lines.append("(no cards served and no feedback in this period)")
        return "\n".join(lines)


class FeedbackStore:
    """Thread-safe; one per application. Database failures become StoreUnavailable (HTTP 503).

    ``served_options`` go to the cards-served writer (``ServedWriter``: batch_rows, interval, capacity,
    max_attempts, backoff, ...); ``flush_timeout`` bounds how long feedback and the report wait for a
    batch that the writer is writing."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        pause_after_failure: float = 10.0,
        flush_timeout: float = 5.0,
        served_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = database_url(url)
        self.engine = _engine(self.url)
        self._clock = clock
        self._pause_after_failure = pause_after_failure
        self._cards_paused_until = 0.0
        self._schema_ready = False
        self._lock = threading.Lock()
        self._flush_timeout = flush_timeout
        self.served = ServedWriter(
            self.engine, weakref.WeakMethod(self.ensure_schema), **(served_options or {})
        )
        # Dropped without close(): its writer writes what is queued and ends.
        weakref.finalize(self, self.served.abandon)
        _stores.add(self)

    @property
    def display_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def sqlite_path(self) -> Path | None:
        if self.url.get_backend_name() != "sqlite" or not self.url.database:
            return None
        return Path(self.url.database)

    def close(self) -> None:
        """Write the cards served still queued, stop the writer, close the connections."""
        self.served.close()
        self.engine.dispose()

    def flush(self) -> bool:
        """Write this process's queued cards served now; True when all of them are in the database."""
        return self.served.flush(self._flush_timeout)

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as connection:
                yield connection
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable("the feedback database is unavailable; retry later") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise StoreUnavailable("the feedback database connection was lost; retry later") from exc
            raise

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (a no-op when it is there already)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._lock, self._connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            self._schema_ready = True

    def ensure_schema(self) -> None:
        """Migrate once; a database that was down at startup is migrated when it comes back."""
        if not self._schema_ready:
            self.migrate()

    def ping(self) -> None:
        self.ensure_schema()
        with self._connect() as connection:
            connection.execute(select(func.count()).select_from(cards_served).where(cards_served.c.id < 0))

    def enqueue_cards(
        self, service_id: str, cards: Sequence[Mapping[str, Any]], served_at: datetime | None = None
    ) -> int:
        """Queue the cards of one answer for the background writer (the hook answer's path): never
        touches the database, never raises for it. The number of rows queued (0: none, or dropped)."""
        rows = served_rows(service_id, cards, served_at or self._clock())
        return len(rows) if rows and self.served.enqueue(rows) else 0

    def record_cards(
        self, service_id: str, cards: Sequence[Mapping[str, Any]], served_at: datetime | None = None
    ) -> int:
        """Insert now, synchronously (tools and tests; answers use ``enqueue_cards``). After a
        failure, recording pauses briefly so that a database that hangs cannot add its connect timeout
        to every call."""
        rows = served_rows(service_id, cards, served_at or self._clock())
        if not rows:
            return 0
        if time.monotonic() < self._cards_paused_until:
            raise StoreUnavailable("card recording is paused after a database failure")
        try:
            self.ensure_schema()
            with self._connect() as connection:
                connection.execute(insert(cards_served), rows)
        except StoreUnavailable:
            self._cards_paused_until = time.monotonic() + self._pause_after_failure
            raise
        return len(rows)

    def record_feedback(
        self, service_id: str, items: Sequence[FeedbackItem], received_at: datetime | None = None
    ) -> Stored:
        """Store each item once: an item already stored (same card, outcome, time, suggestions, reason)
        is a duplicate and is skipped."""
        now = received_at or self._clock()
        rows = [feedback_row(service_id, item, now) for item in items]
        self.ensure_schema()
        # The card may have been served a moment ago by this process: its row must be there to look up.
        self.flush()
        new: list[bool] = []
        with self._connect() as connection:
            cards = {row["card_uuid"] for row in rows}
            rules = dict(
                connection.execute(
                    select(cards_served.c.card_uuid, cards_served.c.rule_id)
                    .where(cards_served.c.card_uuid.in_(cards))
                    .distinct()
                ).all()
            )
            statement = self._insert_ignoring_duplicates(connection)
            for row in rows:
                row["rule_id"] = rules.get(row["card_uuid"])
                new.append(connection.execute(statement, row).first() is not None)
        return Stored(tuple(new))

    def _insert_ignoring_duplicates(self, connection: Connection) -> Any:
        # RETURNING tells a stored row from a skipped duplicate on both backends (rowcount does not).
        if connection.dialect.name == "postgresql":
            on_pg = postgresql.insert(feedback).on_conflict_do_nothing(index_elements=["dedup_key"])
            return on_pg.returning(feedback.c.id)
        if connection.dialect.name == "sqlite":
            on_sqlite = sqlite.insert(feedback).on_conflict_do_nothing(index_elements=["dedup_key"])
            return on_sqlite.returning(feedback.c.id)
        raise D3K2Error(f"unsupported database {connection.dialect.name!r}: use SQLite or PostgreSQL")

    def report(self, since: datetime | None = None) -> Report:
        """Per rule: cards served and shown (distinct uuids), cards accepted / overridden (distinct
        uuids with that outcome), feedback items, and the most frequent override reasons.

        Feedback stored without a rule takes its card's rule from ``cards_served`` when the card's row
        is there now: another worker's batch may have been written after the feedback."""
        self.ensure_schema()
        self.flush()
        shown_filter = [cards_served.c.served_at >= since] if since else []
        served_rule = (
            select(func.max(cards_served.c.rule_id))
            .where(cards_served.c.card_uuid == feedback.c.card_uuid)
            .scalar_subquery()
        )
        resolved = (
            select(
                func.coalesce(feedback.c.rule_id, served_rule).label("rule_id"),
                feedback.c.card_uuid,
                feedback.c.outcome,
                feedback.c.override_reason_system,
                feedback.c.override_reason_code,
            )
            .where(*([feedback.c.received_at >= since] if since else []))
            .subquery("resolved")
        )
        by_rule: dict[str | None, dict[str, Any]] = {}

        def entry(rule: str | None) -> dict[str, Any]:
            return by_rule.setdefault(rule, {"rule": rule, "top_reasons": []})

        with self._connect() as connection:
            for rule, served, shown in connection.execute(
                select(
                    cards_served.c.rule_id,
                    func.count(),
                    func.count(cards_served.c.card_uuid.distinct()),
                )
                .where(*shown_filter)
                .group_by(cards_served.c.rule_id)
            ):
                entry(rule).update(served=served, shown=shown)
            for rule, outcome, items, cards in connection.execute(
                select(
                    resolved.c.rule_id,
                    resolved.c.outcome,
                    func.count(),
                    func.count(resolved.c.card_uuid.distinct()),
                ).group_by(resolved.c.rule_id, resolved.c.outcome)
            ):
                row = entry(rule)
                row["feedback"] = row.get("feedback", 0) + items
                if outcome in ("accepted", "overridden"):
                    row[outcome] = cards
            reasons = connection.execute(
                select(
                    resolved.c.rule_id,
                    resolved.c.override_reason_system,
                    resolved.c.override_reason_code,
                    func.count(),
                )
                .where(resolved.c.outcome == "overridden")
                .group_by(
                    resolved.c.rule_id, resolved.c.override_reason_system, resolved.c.override_reason_code
                )
            ).all()
        # Sorted here, not in SQL: SQLite and PostgreSQL order NULLs differently.
        for rule, system, code, items in sorted(reasons, key=lambda r: (-r[3], r[2] or "", r[1] or "")):
            top = entry(rule)["top_reasons"]
            if len(top) < TOP_REASONS:
                top.append(ReasonCount(code=code, system=system, count=items))
        rules = [RuleReport(**values) for values in by_rule.values()]
        rules.sort(key=lambda r: (r.rule is None, r.rule or ""))
        return Report(since=since, rules=rules)
