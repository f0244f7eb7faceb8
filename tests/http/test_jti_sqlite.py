"""Issue 24, item 10 on one machine: the SQLite jti store keeps its connection (a new one per claim, with a
delete of expired rows each time, cost 1.4 ms of every authenticated call) and deletes expired claims in
batches, at most once per EXPIRE_EVERY seconds. The PostgreSQL store: tests/integration/test_jti_shared.py."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from d3k2.http.jti import EXPIRE_EVERY, JtiStore
from jwt_keys import ISSUER, NOW


def rows(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:  # `with` on a connection alone does not close it
        return int(conn.execute("SELECT count(*) FROM jti").fetchone()[0])


def test_the_store_keeps_one_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Any] = []
    connect = sqlite3.connect

    def counting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(args)
        return connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counting)
    store = JtiStore(tmp_path / "jti.sqlite3")
    try:
        for n in range(50):
            assert store.claim(ISSUER, f"j{n}", NOW + 300, NOW + n)
        assert len(opened) == 1
    finally:
        store.close()


def test_expired_claims_are_deleted_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "jti.sqlite3"
    store = JtiStore(path)
    try:
        for n in range(5):
            assert store.claim(ISSUER, f"old-{n}", NOW + 10, NOW)
        assert store.claim(ISSUER, "late", NOW + 300, NOW + EXPIRE_EVERY / 2)  # within the batch interval
        assert rows(path) == 6
        assert store.claim(ISSUER, "later", NOW + 300, NOW + EXPIRE_EVERY + 1)  # the next batch
        assert rows(path) == 2
    finally:
        store.close()
