"""Replay protection for bearer tokens: each ``(iss, jti)`` pair is remembered until its token expires.

Two stores, one contract (``claim``), chosen by ``open_jti_store``:

- ``JtiStore``: a SQLite file (WAL mode) that every worker process of one machine shares.
- ``PostgresJtiStore``: the ``jti_claims`` table of the feedback database (migration 0002) when that is
  PostgreSQL, so that every instance behind a load balancer refuses a token another one has seen. When
  PostgreSQL fails, is frozen (a claim waits at most ``CLAIM_TIMEOUT``) or is being reconnected to (in a
  background thread), the local file takes the claims (each machine still refuses its own replays;
  answers keep flowing), for at least ``RETRY_AFTER`` seconds, and the log says so.

A claim is one statement on a connection the store keeps (a new connection, a delete of expired rows and
an fsync on every call cost 1.4 ms, most of an authenticated call): an upsert that takes a key that is new
or whose token has expired, and refuses one still live. Expired rows are deleted in batches, at most once
per ``EXPIRE_EVERY`` seconds. The SQLite file is not fsynced per claim (WAL, synchronous=NORMAL): a crash
of the machine itself may forget the last claims, of tokens that expire within minutes anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from d3k2.config import Settings
from d3k2.core.errors import D3K2Error
from d3k2.store.schema import CONNECT_TIMEOUT, sqlite_wal

log = logging.getLogger("d3k2.http.jti")

EXPIRE_EVERY = 60.0  # seconds of token time between two deletes of expired rows
RETRY_AFTER = 5.0  # seconds on the local file after PostgreSQL failed, before trying it again
STATEMENT_TIMEOUT_MS = 1000
CLAIM_TIMEOUT = 0.5  # seconds a claim may wait for PostgreSQL before the local file takes it


class ReplayStoreUnavailable(D3K2Error):
    """The local jti file cannot be read or written (disk full, a directory not writable, a lock held for
    longer than its timeout): the token cannot be checked for replay, so the call is refused, as a 503 the
    EHR may retry, never a 500 or a token let through unchecked."""

    status = 503
    code = "replay-store-unavailable"


def _key(iss: str, jti: str) -> str:
    return hashlib.sha256(f"{iss}\n{jti}".encode()).hexdigest()


class JtiStore:
    """Seen ``jti`` values until their token expires: SQLite in WAL mode, shared by every worker process."""

    _CLAIM = (
        "INSERT INTO jti (key, expires) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE jti.expires < ?"
    )

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._next_expiry = 0.0

    def _connection(self) -> sqlite3.Connection:
        # One per process: a connection inherited through a fork (gunicorn --preload) is the parent's.
        if self._conn is None or self._pid != os.getpid():
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, timeout=5.0, isolation_level=None, check_same_thread=False)
            try:
                sqlite_wal(conn, 5.0)
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS jti (key TEXT PRIMARY KEY, expires INTEGER NOT NULL)"
                )
                conn.execute("CREATE INDEX IF NOT EXISTS jti_expires ON jti (expires)")
            except BaseException:
                conn.close()  # not left for the garbage collector (Python 3.13 warns of it in a later test)
                raise
            self._conn, self._pid = conn, os.getpid()
            # Closed with the store: a store dropped without close() (an app a test built, a worker's app
            # replaced) leaves no open database behind (Python 3.13 warns of one).
            weakref.finalize(self, conn.close).atexit = False
        return self._conn

    def claim(self, iss: str, jti: str, expires: float, now: float) -> bool:
        """Record the pair; False when it was recorded before and has not expired (a replay)."""
        with self._lock:
            try:
                conn = self._connection()
                if now >= self._next_expiry:
                    conn.execute("DELETE FROM jti WHERE expires < ?", (int(now),))
                    self._next_expiry = now + EXPIRE_EVERY
                taken = conn.execute(self._CLAIM, (_key(iss, jti), int(expires) + 1, int(now))).rowcount
            except (sqlite3.Error, OSError) as exc:
                log.warning("jti store: the file %s failed (%s)", self._path, type(exc).__name__)
                raise ReplayStoreUnavailable(
                    "bearer tokens cannot be checked for replay just now (its store failed); retry later"
                ) from exc
            return taken == 1

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


class _BoundedConnection(psycopg.Connection[Any]):
    """Every wait for the server bounded by ``CLAIM_TIMEOUT``: a frozen PostgreSQL (SIGSTOP) takes a query
    into its kernel's buffers and never answers, and its statement_timeout is its own to enforce."""

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        return super().wait(gen, interval, CLAIM_TIMEOUT if timeout is None else timeout)


class PostgresJtiStore:
    """Seen ``jti`` values in the feedback database (PostgreSQL), shared by every instance; ``local`` takes
    the claims while PostgreSQL fails or is being reconnected to, so that an auth check never waits for
    more than ``CLAIM_TIMEOUT`` (only a process's first claim waits for a connection)."""

    _CLAIM = (
        "INSERT INTO jti_claims (key, expires) VALUES (%s, %s) "
        "ON CONFLICT (key) DO UPDATE SET expires = EXCLUDED.expires WHERE jti_claims.expires < %s"
    )

    def __init__(self, conninfo: str, local: JtiStore) -> None:
        self._conninfo = conninfo
        self.local = local
        self._closed = False
        self._begin_process()

    def _begin_process(self) -> None:
        # At construction and in a forked child: the parent's connection, lock and thread are not its own.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._connected_once = False
        self._connecting = False
        self._next_expiry = 0.0
        self._local_until = 0.0

    def _connect(self) -> psycopg.Connection[Any]:
        return _BoundedConnection.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )

    def claim(self, iss: str, jti: str, expires: float, now: float) -> bool:
        """Record the pair; False when it was recorded before and has not expired (a replay)."""
        if self._pid != os.getpid():
            self._begin_process()
        with self._lock:
            conn = self._usable()
            if conn is not None:
                try:
                    if now >= self._next_expiry:
                        conn.execute("DELETE FROM jti_claims WHERE expires < %s", (int(now),))
                        self._next_expiry = now + EXPIRE_EVERY
                    cursor = conn.execute(self._CLAIM, (_key(iss, jti), int(expires) + 1, int(now)))
                    return cursor.rowcount == 1
                except psycopg.Error as exc:
                    self._failed(exc)
        return self.local.claim(iss, jti, expires, now)

    def _usable(self) -> psycopg.Connection[Any] | None:
        """The connection, or None while there is none (a reconnection is started, off the caller's
        path). The caller holds the lock."""
        if self._conn is not None:
            return self._conn
        if not self._connected_once:  # the process's first claim: worth its wait, once
            self._connected_once = True
            try:
                self._conn = self._connect()
            except psycopg.Error as exc:
                self._failed(exc)
            return self._conn
        if not self._connecting and time.monotonic() >= self._local_until:
            self._connecting = True
            threading.Thread(target=self._reconnect, name="d3k2-jti-connect", daemon=True).start()
        return None

    def _reconnect(self) -> None:
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            with self._lock:
                self._connecting = False
                self._failed(exc)
            return
        with self._lock:
            self._connecting = False
            if not self._closed:
                self._conn = conn
                return
        # The store was closed while this thread connected: nothing else would ever close this connection
        # (left to the garbage collector, psycopg warns of it in whatever runs then: a failure under pytest).
        with contextlib.suppress(psycopg.Error):
            conn.close()

    def _failed(self, exc: psycopg.Error) -> None:
        """PostgreSQL failed: the local file for ``RETRY_AFTER`` seconds. The caller holds the lock."""
        self._drop_connection()
        self._local_until = time.monotonic() + RETRY_AFTER
        log.warning(
            "jti store: PostgreSQL failed (%s); replays are refused per machine for %g s",
            type(exc).__name__,
            RETRY_AFTER,
        )

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # a connection already broken
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection()
        self.local.close()


def open_jti_store(settings: Settings) -> JtiStore | PostgresJtiStore:
    """The feedback database's table when it is PostgreSQL (shared by every instance), else the file."""
    local = JtiStore(settings.jti_path)
    url = make_url(settings.database)
    if url.get_backend_name() != "postgresql":
        return local
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return PostgresJtiStore(conninfo, local)
