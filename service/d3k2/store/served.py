"""Cards served, written off the request path by one background thread per store and process.

A hook answer only queues its rows (``ServedWriter.enqueue``: microseconds, never a database call, never
a wait; a full queue drops the new rows and counts them). The writer thread, started by the first
enqueue in each process, inserts them in batches of up to ``batch_rows`` rows once ``batch_rows`` are
queued or the oldest row is ``interval`` seconds old, and retries a failed batch with exponential
backoff (by default for about five minutes: 0.5, 1, 2, 4, 8, then every 15 s, 25 attempts in all). Its
connections are bounded in time (d3k2.store.schema), and it is the only thread that writes them: a
database that is down or frozen stalls this thread, never an answer. ``flush`` asks the thread to write
what is queued now and waits for it (feedback and the report, so that feedback on a card this process
has just served finds its rule); while a failed batch waits for its retry a flush neither retries it
nor uses up one of its attempts (each feedback POST flushes: in an outage they used up the retries in
seconds and the rows were dropped). ``close`` writes the queue and stops the thread.

gunicorn builds the app in each worker, so the thread is the worker's own. A store built before a fork
(--preload) is noticed by its process id: the child's first enqueue begins a queue and thread of its
own, and the parent's queued rows stay the parent's to write.

What can be lost, and when (feedback rows never: they are written before the POST is answered):

- SIGKILL, OOM kill or a crash of a worker: the rows not yet written (about the last ``interval``
  seconds of answers, plus whatever was queued while the database was failing). A graceful stop
  (gunicorn's worker_exit hook in docker/gunicorn.conf.py, atexit, ``FeedbackStore.close``) writes the
  queue first.
- The database failing: a batch is retried with exponential backoff, then dropped after
  ``max_attempts`` failures; meanwhile answers keep queueing up to ``capacity`` rows, and the rows of an
  answer that finds the queue full are dropped. A stop while the database is down drops what is queued.
- Every drop is counted (``ServedWriter.stats``, the ``listener``: metrics) and logged with counts only.

The feedback of a lost card stays stored, attributed to no rule ("unknown card" in the report).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Dialect, insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from d3k2.store.schema import MAX_CARD_UUID, MAX_INDICATOR, MAX_RULE_ID, MAX_SERVICE_ID, cards_served

log = logging.getLogger("d3k2.store.served")


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


def insert_served(connection: Connection, rows: list[dict[str, Any]]) -> None:
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


def describe_error(exc: BaseException) -> str:
    """An error for the log: its class and the driver's first line (no SQL, no parameters)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


@dataclass
class WriterStats:
    """Counts of this process's writer (begun anew in a forked child). Rows: enqueued = written +
    dropped + still queued."""

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

# Held only while a thread is started (microseconds): a fork in that instant would leave it held in the
# child, and gunicorn forks from its master, which answers nothing.
_start_lock = threading.Lock()
# Writers whose thread was started and that are not closed yet: written and stopped at exit.
_started: set[ServedWriter] = set()


class ServedWriter:
    """Inserts cards-served rows in batches from a daemon thread; see the module docstring.

    ``enqueue`` is all a hook answer pays for. ``flush`` has the thread write what is queued and waits;
    ``close`` has it write the queue and stop. ``prepare`` runs before each batch (the store's
    ``ensure_schema``: a database that was down at startup is migrated when it is back)."""

    def __init__(
        self,
        engine: Engine,
        prepare: Callable[[], None] = lambda: None,
        *,
        batch_rows: int = 500,
        interval: float = 1.0,
        capacity: int = 50_000,
        max_attempts: int = 25,
        backoff: float = 0.5,
        max_backoff: float = 15.0,
        warn_every: float = 10.0,
    ) -> None:
        self._engine = engine
        self._prepare = prepare
        self.batch_rows = batch_rows
        self.interval = interval
        self.capacity = capacity
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._warn_every = warn_every
        self.listener: Listener | None = None
        self._closing = False
        self._begin_process(os.getpid())

    def _begin_process(self, pid: int) -> None:
        """State of the process ``pid``: at construction, and in a forked child, where the parent's
        thread does not exist, its lock may be held, and its queued rows are the parent's to write."""
        self._pid = pid
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[dict[str, Any]] = deque()
        self._first_at: float | None = None  # when the queue last went from empty to not empty
        self._batch: list[dict[str, Any]] = []  # taken from the queue: being written, or waiting to retry
        self._attempts = 0
        self._backing_off = False  # the thread waits for the retry of a failed batch
        self._flush_wanted = False
        # Rows accepted in this process, and how many of them (in queue order) are written or dropped:
        # a flush waits for the second to reach what the first was when it was called.
        self._accepted = 0
        self._settled = 0
        self._thread: threading.Thread | None = None
        self._next_warning = 0.0
        self._unwarned_drops = 0
        self.stats = WriterStats()

    def _own_process(self, start: bool) -> None:
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
                _started.add(self)

    @property
    def queued(self) -> int:
        """Rows not written yet (queued, being written, or a failed batch waiting for its retry)."""
        return len(self._pending) + len(self._batch)

    def enqueue(self, rows: Sequence[dict[str, Any]]) -> bool:
        """Queue rows for the writer thread; False when they were dropped (queue full, or closed)."""
        if not rows:
            return True
        if self._thread is None or self._pid != os.getpid():
            self._own_process(start=True)
        count = len(rows)
        with self._cond:
            self.stats.enqueued += count
            closed = self._closing
            before = len(self._pending)
            accepted = not closed and before + count <= self.capacity
            if accepted:
                self._pending.extend(rows)
                self._accepted += count
                # The thread is woken twice per batch at most: to time the batch by its first row, and
                # when it is full. Woken by every answer, it cost each one 100 µs on a 2-core VM. All
                # waiters: a flush waiting on the same condition must not take the thread's wake-up.
                if before == 0:
                    self._first_at = time.monotonic()
                    self._cond.notify_all()
                elif before < self.batch_rows <= before + count:
                    self._cond.notify_all()
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
        delay: float | None = None  # set after a failed write: the pause before its retry
        try:
            while True:
                with cond:
                    self._wait(cond, delay)
                    if cond is not self._cond:
                        return
                    stopping = self._closing
                    # Woken by a full batch while answers flow: only full batches, the rest gathers on.
                    first = self._first_at
                    old = first is not None and time.monotonic() - first >= self.interval
                    full_only = not (delay is not None or stopping or self._flush_wanted or old)
                    self._flush_wanted = False
                try:
                    delay = self._write_queued(full_only)
                except Exception:  # a bug: keep the thread (and the rows) alive
                    log.exception("cards-served writer: unexpected error")
                    delay = self.backoff
                if stopping:
                    return
        finally:
            with cond:  # a flush waiting for this thread must not wait for its timeout
                cond.notify_all()

    def _wait(self, cond: threading.Condition, delay: float | None) -> None:
        """Until there is something to write: a full batch, rows ``interval`` old, a flush, close, or
        (after a failure) the end of the backoff. The caller holds ``cond``."""

        def waiting() -> bool:
            return cond is self._cond and not self._closing and not self._flush_wanted

        if delay is not None:
            until = time.monotonic() + delay
            self._backing_off = True  # what a flush reads: this pause is the retry's, not to be cut
            try:
                while waiting() and (left := until - time.monotonic()) > 0:
                    cond.wait(left)
            finally:
                self._backing_off = False
            return
        while waiting() and len(self._pending) < self.batch_rows:
            if not self._pending:
                cond.wait()  # the first row queued wakes it
                continue
            left = (self._first_at or 0.0) + self.interval - time.monotonic()
            if left <= 0:
                return
            cond.wait(left)

    def _write_queued(self, full_only: bool = False) -> float | None:
        """Write the batches queued now (a failed one first; with ``full_only``, full ones only); None,
        or after a failure the pause before its retry. Rows queued meanwhile wait for the next pass."""
        with self._cond:
            pending = len(self._pending)
            full = pending // self.batch_rows if full_only else -(-pending // self.batch_rows)
            batches = bool(self._batch) + full
        for _ in range(batches):
            # A batch dropped after its last attempt needs no pause: the next one begins its own retries.
            if not self._write_batch() and self._batch:
                return min(self.backoff * 2.0 ** max(self._attempts - 1, 0), self.max_backoff)
        return None

    def _write_batch(self) -> bool:
        """One transaction, in the writer thread; False when it failed."""
        with self._cond:
            if not self._batch:
                take = min(len(self._pending), self.batch_rows)
                self._batch = [self._pending.popleft() for _ in range(take)]
                if not self._pending:
                    self._first_at = None
            batch = self._batch
        if not batch:
            return True
        try:
            self._prepare()
            with self._engine.begin() as connection:
                insert_served(connection, batch)
        except Exception as exc:
            self._failed(batch, exc)
            return False
        with self._cond:
            self._batch, self._attempts = [], 0
            self.stats.written += len(batch)
            self.stats.batches += 1
            self._settled += len(batch)
            self._cond.notify_all()
        return True

    def _failed(self, batch: list[dict[str, Any]], exc: Exception) -> None:
        self._attempts += 1
        dropped = self._attempts >= self.max_attempts
        if dropped:
            log.error(
                "cards served: dropped a batch of %d rows after %d failed attempts (%s)",
                len(batch),
                self.max_attempts,
                describe_error(exc),
            )
            self._notify(WRITE_ERROR, len(batch))
            self._notify(DROPPED_AFTER_RETRIES, len(batch))
        else:
            log.warning(
                "cards served: writing a batch of %d rows failed (attempt %d of %d, retrying): %s",
                len(batch),
                self._attempts,
                self.max_attempts,
                describe_error(exc),
            )
            self._notify(WRITE_ERROR, len(batch))
        # Counted last: a flush returns on this count, and by then the failure is logged and reported.
        with self._cond:
            self.stats.write_errors += 1
            # The flush that asked for this attempt has its answer; the retry keeps its backoff.
            self._flush_wanted = False
            if dropped:
                self._batch, self._attempts = [], 0
                self.stats.dropped_after_retries += len(batch)
                self._settled += len(batch)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Have the thread write the rows queued before the call, now, and wait: True when they are all
        in the database. One attempt per batch; after a failure the rows stay queued for the thread's
        retries. While a failed batch waits for its retry, False at once: the retry keeps its backoff
        and its attempts. ``timeout`` bounds the wait (a batch that hangs)."""
        if self._pid != os.getpid():
            self._own_process(start=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._backing_off:  # the database is failing: the thread retries on its own schedule
                return False
            target, errors = self._accepted, self.stats.write_errors
            thread = self._thread
            self._flush_wanted = True
            self._cond.notify_all()
            while self._settled < target and self.stats.write_errors == errors:
                left = None if deadline is None else deadline - time.monotonic()
                if thread is None or not thread.is_alive() or (left is not None and left <= 0):
                    return False
                self._cond.wait(left)
            return self.stats.write_errors == errors

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the thread (idempotent). Rows that cannot be written now (the
        database fails, or the thread is stuck past ``timeout``) are dropped and counted; rows queued
        after close are dropped too."""
        if self._pid != os.getpid():
            self._own_process(start=False)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            if thread is None or not thread.is_alive():
                left = self.queued
                self._batch = []
            else:  # still writing (a hung database): its batch is its own; what waits behind it is lost
                left = len(self._pending)
            self._pending.clear()
            self._settled += left
            self.stats.dropped_at_close += left
            self._cond.notify_all()
        _started.discard(self)
        if left:
            log.error("cards served: %d rows not written at close (the database failed)", left)
            self._notify(DROPPED_AT_CLOSE, left)

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
    """Write and stop every writer of this process, and close its idle connections (its store may never
    be closed): at exit, and from gunicorn's worker_exit hook."""
    pid = os.getpid()
    for writer in list(_started):
        if writer._pid == pid:
            writer.close(timeout)
            writer._engine.dispose()


atexit.register(close_served_writers)
