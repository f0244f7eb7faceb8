"""The jti store in the feedback database (PostgreSQL): one table every instance shares, so a token
replayed on another instance is refused; the local file takes over while PostgreSQL fails. Two separate
d3k2 instances (gunicorn) sharing one PostgreSQL: test_two_instances.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
from test_database_stall import frozen, timed

from builders import refused_port
from d3k2.config import Settings
from d3k2.http import jti
from d3k2.http.jti import CLAIM_TIMEOUT, JtiStore, PostgresJtiStore, open_jti_store
from d3k2.store.feedback import FeedbackStore
from jwt_keys import ISSUER, NOW
from postgres import running_postgres


def migrated(url: str) -> None:
    store = FeedbackStore(url)
    try:
        store.migrate()
    finally:
        store.close()


def test_the_store_is_the_feedback_database_when_it_is_postgresql(tmp_path: Path) -> None:
    pg = open_jti_store(Settings(data_dir=tmp_path, database_url="postgresql://d3k2@127.0.0.1:1/d3k2"))
    sqlite = open_jti_store(Settings(data_dir=tmp_path))
    assert isinstance(pg, PostgresJtiStore)
    assert isinstance(sqlite, JtiStore)
    pg.close()
    sqlite.close()


def test_instances_share_their_claims_in_postgresql(postgres_url: str, tmp_path: Path) -> None:
    migrated(postgres_url)
    settings = [Settings(data_dir=tmp_path / name, database_url=postgres_url) for name in ("a", "b")]
    first, second = (open_jti_store(s) for s in settings)
    try:
        assert first.claim(ISSUER, "j1", NOW + 300, NOW)
        assert not second.claim(ISSUER, "j1", NOW + 300, NOW + 1)  # the other machine's file knows nothing
        assert not first.claim(ISSUER, "j1", NOW + 300, NOW + 2)
        assert second.claim(ISSUER, "j1", NOW + 700, NOW + 400)  # expired: the id may be used again
        assert second.claim("https://other.test", "j1", NOW + 300, NOW + 400)
    finally:
        first.close()
        second.close()


def test_expired_claims_are_deleted_in_batches(postgres_url: str, tmp_path: Path) -> None:
    migrated(postgres_url)
    store = open_jti_store(Settings(data_dir=tmp_path, database_url=postgres_url))
    assert isinstance(store, PostgresJtiStore)
    try:
        for n in range(5):
            assert store.claim(ISSUER, f"old-{n}", NOW + 10, NOW)
        assert store.claim(ISSUER, "late", NOW + 300, NOW + 30)  # within the batch interval: kept
        assert count(postgres_url) == 6
        assert store.claim(ISSUER, "later", NOW + 300, NOW + 61)  # the next batch: the five are gone
        assert count(postgres_url) == 2
    finally:
        store.close()


def count(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM jti_claims").fetchone()
    assert row is not None
    return int(row[0])


def test_postgresql_down_falls_back_to_the_local_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = f"postgresql://d3k2@127.0.0.1:{refused_port()}/d3k2"
    store = open_jti_store(Settings(data_dir=tmp_path, database_url=down))
    try:
        assert store.claim(ISSUER, "j1", NOW + 300, NOW)
        assert not store.claim(ISSUER, "j1", NOW + 300, NOW + 1)  # the file refuses the replay
        assert "jti store: PostgreSQL failed (OperationalError)" in caplog.text
        assert "j1" not in caplog.text
    finally:
        store.close()


def test_a_frozen_postgresql_costs_a_claim_at_most_its_timeout(tmp_path: Path) -> None:
    """SIGSTOP on every PostgreSQL process: the kept connection's query would wait forever (statement_timeout
    is the frozen server's to enforce). The claim gives up after CLAIM_TIMEOUT and the local file takes it
    and the next ones (reconnecting runs in a thread of its own); thawed, the claims are shared again."""
    with running_postgres() as server:
        url = server.create_database()
        migrated(url)
        store = open_jti_store(Settings(data_dir=tmp_path, database_url=url))
        other = open_jti_store(Settings(data_dir=tmp_path / "other", database_url=url))
        assert isinstance(store, PostgresJtiStore)
        try:
            assert store.claim(ISSUER, "before", NOW + 300, NOW)
            with frozen(server):
                for n in range(3):
                    taken, took = timed(lambda n=n: store.claim(ISSUER, f"frozen-{n}", NOW + 300, NOW))
                    assert taken
                    assert took < CLAIM_TIMEOUT + 1.0  # a bound on a hang, not a speed claim
                assert not store.claim(ISSUER, "frozen-0", NOW + 300, NOW)  # the file refuses the replay
            thawed = False
            for n in range(200):  # the background reconnection, once RETRY_AFTER has passed
                key = f"probe-{n}"
                if store.claim(ISSUER, key, NOW + 300, NOW) and not other.claim(ISSUER, key, NOW + 300, NOW):
                    thawed = True  # the claim went to PostgreSQL, where the other store saw it
                    break
                time.sleep(0.1)
            assert thawed
        finally:
            store.close()
            other.close()


def test_a_reconnection_that_ends_after_close_closes_its_connection(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconnecting thread still connecting when the store is closed (a worker stopping, an app a test
    built): its new connection was stored in the closed store, open for good, and psycopg's warning when
    the garbage collector took it failed whatever test ran then."""
    migrated(postgres_url)
    store = open_jti_store(Settings(data_dir=tmp_path, database_url=postgres_url))
    assert isinstance(store, PostgresJtiStore)
    connect, release, made = store._connect, threading.Event(), []

    def slow_connect() -> psycopg.Connection:
        if not made:  # the process's first claim: PostgreSQL fails, the local file takes over
            made.append(None)
            raise psycopg.OperationalError("down for this test")
        assert release.wait(30)
        made.append(connect())
        return made[-1]

    monkeypatch.setattr(jti, "RETRY_AFTER", 0.0)
    monkeypatch.setattr(store, "_connect", slow_connect)
    try:
        assert store.claim(ISSUER, "j1", NOW + 300, NOW)  # failed over to the file
        assert store.claim(ISSUER, "j2", NOW + 300, NOW)  # the file again; a reconnection starts
        [thread] = [t for t in threading.enumerate() if t.name == "d3k2-jti-connect"]
        store.close()
        release.set()
        thread.join(30)
        assert not thread.is_alive() and len(made) == 2
        assert made[1].closed
    finally:
        release.set()
        for conn in made[1:]:
            conn.close()
