"""Replay protection for bearer tokens: each ``(iss, jti)`` pair is remembered until its token expires, in
SQLite (WAL mode) so that every worker process of one server rejects a replay."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from contextlib import closing
from pathlib import Path


class JtiStore:
    """Seen ``jti`` values until their token expires: SQLite in WAL mode, shared by every worker process."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ready = False
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=5.0, isolation_level=None)

    def _prepare(self) -> None:
        with self._lock:
            if self._ready:
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS jti (key TEXT PRIMARY KEY, expires INTEGER NOT NULL)"
                )
                conn.execute("CREATE INDEX IF NOT EXISTS jti_expires ON jti (expires)")
            self._ready = True

    def claim(self, iss: str, jti: str, expires: float, now: float) -> bool:
        """Record the pair; False when it was recorded before and has not expired (a replay)."""
        self._prepare()
        key = hashlib.sha256(f"{iss}\n{jti}".encode()).hexdigest()
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM jti WHERE expires < ?", (int(now),))
                conn.execute("INSERT INTO jti (key, expires) VALUES (?, ?)", (key, int(expires) + 1))
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")
                return False
            conn.execute("COMMIT")
            return True
