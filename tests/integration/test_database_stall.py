"""A hook answer never waits on the database: a PostgreSQL server frozen with SIGSTOP stalls only the
cards-served writer. Hook calls keep answering, feedback is refused with 503 within its timeouts, and
once the server is thawed (SIGCONT) the rows queued meanwhile reach it.

The durations asserted are bounds on a hang, far above what each call takes; none is a speed claim.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text

from builders import SERVICE, fixed_clock, hook_request, post, ruleset, sandbox_feedback, settings
from d3k2.http.app import create_app
from d3k2.store.feedback import FeedbackStore
from d3k2.store.schema import CONNECT_TIMEOUT, STATEMENT_TIMEOUT
from postgres import PostgresServer, running_postgres

ANSWER_BOUND = 2.0  # seconds: a hook call waiting on the frozen server would take CONNECT_TIMEOUT or forever
HANG = 60.0  # bounds the waits for the writer, which do end on their own


def server_pids(server: PostgresServer) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer, autovacuum, ...)."""
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
        if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
            children.append(int(entry.name))
    return [postmaster, *children]


@contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    """The postmaster is stopped first, so that it starts no process meanwhile, and continued last, so
    that it reaps no child (whose pid could then be gone) before each is continued."""
    pids = server_pids(server)
    for pid in pids:
        signal_if_running(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(pids):
            signal_if_running(pid, signal.SIGCONT)


def signal_if_running(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError):  # a backend that ended since it was listed
        os.kill(pid, signum)


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def hook_call(client: Any) -> Any:
    """One hook call, its response closed as a server closes it once sent (where work could follow)."""
    answer = post(client, f"/cds-services/{SERVICE}", hook_request())
    answer.close()
    return answer


def served_in_database(url: str) -> list[str]:
    with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT) as connection:
        return [row[0] for row in connection.execute("SELECT card_uuid FROM cards_served")]


def test_a_frozen_postgresql_stalls_only_the_cards_served_writer(tmp_path: Path) -> None:
    with running_postgres() as server:
        url = server.create_database()
        # The writer tries often and never gives a batch up, so that the freeze's rows must arrive.
        options = {"interval": 0.05, "backoff": 0.05, "max_backoff": 0.5, "max_attempts": 1_000_000}
        store = FeedbackStore(url, clock=fixed_clock(), served_options=options)
        app = create_app(settings(tmp_path, database_url=url), ruleset(), store)
        client = app.test_client()
        try:
            before = hook_call(client)
            served = [c["uuid"] for c in before.get_json()["cards"]]
            assert served and store.flush() is True

            with frozen(server):
                errors = store.served.stats.write_errors
                for _ in range(5):
                    answer, took = timed(lambda: hook_call(client))
                    assert answer.status_code == 200 and took < ANSWER_BOUND
                    served += [c["uuid"] for c in answer.get_json()["cards"]]
                # The writer is up against the frozen server: its connection attempt times out.
                with store.served._cond:
                    assert store.served._cond.wait_for(lambda: store.served.stats.write_errors > errors, HANG)
                answer, took = timed(lambda: hook_call(client))
                assert answer.status_code == 200 and took < ANSWER_BOUND
                served += [c["uuid"] for c in answer.get_json()["cards"]]

                feedback, took = timed(
                    lambda: post(client, f"/cds-services/{SERVICE}/feedback", sandbox_feedback("accepted"))
                )
                assert (feedback.status_code, feedback.get_json()["error"]) == (503, "database-unavailable")
                # It may wait for the writer's batch (flush_timeout), then connects (CONNECT_TIMEOUT).
                assert took < store._flush_timeout + CONNECT_TIMEOUT + ANSWER_BOUND
                assert client.get("/readyz").status_code == 503
                assert store.served.stats.dropped == 0

            deadline = time.monotonic() + HANG
            while not store.flush():  # an attempt begun while frozen may still fail once
                assert time.monotonic() < deadline, "the queued rows never reached the thawed server"
            assert sorted(served_in_database(url)) == sorted(served)
            assert client.get("/readyz").status_code == 200
        finally:
            store.close()


def test_postgresql_connections_carry_the_statement_timeout(postgres_url: str) -> None:
    store = FeedbackStore(postgres_url)
    try:
        with store.engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == f"{int(STATEMENT_TIMEOUT)}s"
    finally:
        store.close()


def test_sqlite_connections_wait_for_a_lock_no_longer_than_the_statement_timeout(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'data' / 'd3k2.sqlite3'}")
    try:
        with store.engine.connect() as connection:
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() == int(STATEMENT_TIMEOUT * 1000)
    finally:
        store.close()
