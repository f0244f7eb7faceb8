"""Cards served are written off the request path (d3k2.store.served.ServedWriter): queued by the answer,
inserted in batches by the writer thread alone, flushed (by that thread) before feedback and the report,
on close and at exit; a full queue and a failing database drop rows with counts, never the answer; a
forked child starts afresh.

No test waits for time to pass: writes are made visible with flush() / close(), and the thread's own
writes are awaited through Events set by SQLAlchemy event listeners (their timeouts only bound a hang).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from builders import (
    REPO,
    SERVICE,
    STARTUP_SECONDS,
    T0,
    TODAY,
    card,
    fixed_clock,
    gunicorn_env,
    hook_request,
    post,
    ruleset,
    samples,
    sandbox_feedback,
    settings,
    stop,
)
from builders import value as metric
from d3k2.core.hooks import parse_feedback
from d3k2.http.app import create_app
from d3k2.http.metrics import metrics_of
from d3k2.store import served as sv
from d3k2.store.feedback import FeedbackStore
from d3k2.store.schema import StoreUnavailable, cards_served, feedback
from d3k2.store.served import DROPPED_AFTER_RETRIES, DROPPED_AT_CLOSE, DROPPED_QUEUE_FULL, WRITE_ERROR
from fhir_server import free_port
from postgres import running_postgres

WAIT = 30.0  # bounds a hang only; every wait below ends on an Event


def new_store(url: str, **options: Any) -> FeedbackStore:
    """A store whose writer thread does not write on its own unless a test asks (interval: an hour)."""
    options = {"interval": 3600.0, **options}
    store = FeedbackStore(url, clock=fixed_clock(), served_options=options)
    store.migrate()
    return store


@pytest.fixture
def store(db_url: str) -> Iterator[FeedbackStore]:
    s = new_store(db_url)
    yield s
    s.close()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'd3k2.sqlite3'}"


def served_uuids(store: FeedbackStore) -> list[str]:
    with store.engine.connect() as connection:
        return list(connection.scalars(select(cards_served.c.card_uuid).order_by(cards_served.c.id)))


def answer(i: int) -> list[dict[str, Any]]:
    return [card(f"a-{i}", "A"), card(f"b-{i}", "B", "info")]


class Commits:
    """Counts the transactions that insert cards served; ``written`` is set at each one."""

    def __init__(self, store: FeedbackStore) -> None:
        self.count = 0
        self.written = threading.Event()
        self._inserting = False
        event.listen(store.engine, "before_cursor_execute", self._before)
        event.listen(store.engine, "commit", self._commit)

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO cards_served"):
            self._inserting = True

    def _commit(self, _conn: Any) -> None:
        if self._inserting:
            self._inserting = False
            self.count += 1
            self.written.set()


def settled(store: FeedbackStore) -> None:
    """Wait for the batch the writer thread is committing ("commit" events fire before the commit)."""
    assert store.served.flush(WAIT) is True


class FailInserts:
    """Makes the next ``times`` inserts into cards_served fail as a database would."""

    def __init__(self, store: FeedbackStore, times: int) -> None:
        self.left = times
        self.failed = threading.Event()
        event.listen(store.engine, "before_cursor_execute", self._before)

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.left and statement.startswith("INSERT INTO cards_served"):
            self.left -= 1
            self.failed.set()
            raise OperationalError(statement, None, Exception("disk I/O error"))


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def __call__(self, kind: str, rows: int) -> None:
        self.seen.append((kind, rows))


# ---------------------------------------------------------------- queue, flush, batches


def test_enqueued_rows_are_in_the_database_after_flush(store: FeedbackStore) -> None:
    assert store.enqueue_cards(SERVICE, [card("c1", "A"), card("c2", "B", "info"), {"uuid": ""}]) == 2
    assert store.enqueue_cards(SERVICE, [{"indicator": "info"}]) == 0  # no uuid: nothing to record
    assert served_uuids(store) == []  # the writer waits for its interval (an hour here)
    assert store.served.queued == 2
    assert store.flush() is True
    assert served_uuids(store) == ["c1", "c2"]
    with store.engine.connect() as connection:
        row = connection.execute(select(cards_served).where(cards_served.c.card_uuid == "c2")).one()
    assert (row.service_id, row.rule_id, row.indicator, row.served_at) == (SERVICE, "B", "info", T0)
    assert store.served.queued == 0
    stats = store.served.stats
    assert (stats.enqueued, stats.written, stats.batches, stats.dropped) == (2, 2, 1, 0)


def test_answers_are_written_in_few_transactions(store: FeedbackStore) -> None:
    commits = Commits(store)
    for i in range(1000):
        store.enqueue_cards(SERVICE, answer(i))
    store.flush()
    assert commits.count == 4  # 2,000 rows in batches of 500, not 1,000 transactions
    assert len(served_uuids(store)) == 2000


def test_batches_are_stored_as_sqlalchemy_stores_them(store: FeedbackStore) -> None:
    """The writer hands its rows to the driver's executemany (sv.insert_served); what lands must be
    what SQLAlchemy's insert(cards_served) writes: the same values read back, whatever the backend."""
    from sqlalchemy import insert

    paris = timezone(timedelta(hours=1))
    served = [T0, T0 + timedelta(microseconds=7), datetime(2026, 11, 24, 23, 30, 0, 123456, tzinfo=paris)]
    odd = [
        {"uuid": "no-source"},
        {"uuid": "no-topic", "source": {"label": "x"}, "indicator": "info"},
        {"uuid": "x" * 300, "source": {"topic": {"code": "r" * 300}}, "indicator": "warning" * 5},
        {"uuid": 7, "source": {"topic": {"code": "not a row: its uuid is not a string"}}},
    ]
    rows = [row for i, at in enumerate(served) for row in sv.served_rows(SERVICE, [*answer(i), *odd], at)]
    with store.engine.begin() as connection:
        sv.insert_served(connection, rows)
    columns = [c for c in cards_served.c if c.name != "id"]
    # The text in the database too: SQLite keeps served_at as text, which report --since compares as text.
    as_text = "SELECT CAST(served_at AS TEXT) FROM cards_served ORDER BY id"
    with store.engine.connect() as connection:
        written = connection.execute(select(*columns).order_by(cards_served.c.id)).all()
        written_text = connection.exec_driver_sql(as_text).all()
    with store.engine.begin() as connection:
        connection.execute(cards_served.delete())
        connection.execute(insert(cards_served), rows)
    with store.engine.connect() as connection:
        reference = connection.execute(select(*columns).order_by(cards_served.c.id)).all()
        reference_text = connection.exec_driver_sql(as_text).all()
    assert written == reference and len(written) == 3 * 5
    assert written_text == reference_text
    assert {row.served_at for row in written} == {at.astimezone(UTC) for at in served}


def test_a_full_batch_wakes_the_writer(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path), batch_rows=10)
    try:
        commits = Commits(store)
        for i in range(4):
            store.enqueue_cards(SERVICE, answer(i))
        assert not commits.written.is_set()  # 8 rows: the writer keeps gathering
        store.enqueue_cards(SERVICE, answer(4))  # 10: a batch
        assert commits.written.wait(WAIT)
        assert store.flush() is True
        assert len(served_uuids(store)) == 10
        assert commits.count == 1
    finally:
        store.close()


def test_the_writer_writes_what_its_interval_gathered(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path), interval=0.001)
    try:
        commits = Commits(store)
        store.enqueue_cards(SERVICE, [card("c1", "A")])
        assert commits.written.wait(WAIT)
        settled(store)
        assert served_uuids(store) == ["c1"]
    finally:
        store.close()


def test_rows_are_cut_to_the_columns_sizes(store: FeedbackStore) -> None:
    long = {"uuid": "u" * 300, "indicator": "i" * 40, "source": {"topic": {"code": "r" * 300}}}
    store.enqueue_cards("s" * 300, [long])
    assert store.flush() is True  # PostgreSQL would reject the whole batch otherwise
    with store.engine.connect() as connection:
        row = connection.execute(select(cards_served)).one()
    assert (len(row.card_uuid), len(row.service_id), len(row.rule_id), len(row.indicator)) == (
        128,
        128,
        128,
        16,
    )


def test_close_writes_the_queue_and_later_rows_are_dropped(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    store = new_store(url)
    events = Events()
    store.served.listener = events
    for i in range(3):
        store.enqueue_cards(SERVICE, answer(i))
    store.close()
    assert store.served.stats.written == 6
    assert store.enqueue_cards(SERVICE, answer(9)) == 0
    assert store.served.stats.dropped_at_close == 2
    assert events.seen == [(DROPPED_AT_CLOSE, 2)]
    store.close()  # twice: nothing more
    again = FeedbackStore(url)
    try:
        assert len(served_uuids(again)) == 6
    finally:
        again.close()


def test_close_writes_every_writer_of_the_process(tmp_path: Path) -> None:
    first = new_store(f"sqlite:///{tmp_path / 'one.sqlite3'}")
    second = new_store(f"sqlite:///{tmp_path / 'two.sqlite3'}")
    inherited = new_store(f"sqlite:///{tmp_path / 'three.sqlite3'}")
    first.enqueue_cards(SERVICE, answer(1))
    second.enqueue_cards(SERVICE, answer(2))
    inherited.enqueue_cards(SERVICE, answer(3))
    inherited.served._pid = -1  # another process's writer (as inherited by a fork): not this one's
    inherited_cond = inherited.served._cond
    sv.close_served_writers()  # what atexit and gunicorn's worker_exit hook call
    assert (len(served_uuids(first)), len(served_uuids(second))) == (2, 2)
    assert served_uuids(inherited) == []
    for store in (first, second, inherited):
        store.close()
    with inherited_cond:  # the "other process's" thread, here in this one: woken, it sees it is not the owner
        inherited_cond.notify_all()


def test_a_store_closed_by_nobody_has_its_rows_written_at_exit(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    store = new_store(url)
    store.enqueue_cards(SERVICE, answer(0))
    writer = store.served
    del store
    gc.collect()
    sv.close_served_writers()  # atexit
    assert writer._thread is not None and not writer._thread.is_alive()
    check = FeedbackStore(url)
    try:
        assert len(served_uuids(check)) == 2
    finally:
        check.close()


def test_close_of_a_writer_that_never_started_starts_nothing(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path))
    writer = store.served
    assert writer.flush() is True  # nothing queued: nothing to wait for, no thread
    store.close()
    assert writer.enqueue([]) is True
    assert store.enqueue_cards(SERVICE, answer(1)) == 0  # closed: no thread is started for it
    assert (writer._thread, writer.stats.dropped_at_close) == (None, 2)


# ---------------------------------------------------------------- feedback and the report


def test_feedback_on_a_card_of_this_process_finds_its_rule(store: FeedbackStore) -> None:
    store.enqueue_cards(SERVICE, [card("6f0d1a8e-3c2b-4b7a-9a51-2f9e0c7d4b11", "vitd-low")])
    items = parse_feedback(sandbox_feedback("accepted")).feedback
    assert store.record_feedback(SERVICE, items).new == (True,)
    with store.engine.connect() as connection:
        assert connection.scalar(select(feedback.c.rule_id)) == "vitd-low"


def test_report_attributes_feedback_whose_card_was_written_later(db_url: str) -> None:
    """Worker A served the card; its batch is not written when worker B stores the feedback."""
    a, b = new_store(db_url), new_store(db_url)
    try:
        a.enqueue_cards(SERVICE, [card("6f0d1a8e-3c2b-4b7a-9a51-2f9e0c7d4b11", "vitd-low")])
        b.record_feedback(SERVICE, parse_feedback(sandbox_feedback("overridden")).feedback)
        b.record_feedback(SERVICE, parse_feedback(sandbox_feedback("overridden.no-reason")).feedback)
        with b.engine.connect() as connection:
            assert list(connection.scalars(select(feedback.c.rule_id))) == [None, None]
        a.flush()
        rules = {r.rule: r for r in b.report().rules}
        assert list(rules) == ["vitd-low", None]
        vitd = rules["vitd-low"]
        assert (vitd.served, vitd.shown, vitd.overridden, vitd.feedback) == (1, 1, 1, 1)
        assert [(r.code, r.count) for r in vitd.top_reasons] == [("clinician-judgement", 1)]
        # The other item names a card nobody served: still unknown.
        assert (rules[None].feedback, rules[None].overridden) == (1, 1)
        later = {r.rule: r for r in b.report(since=T0 - timedelta(days=1)).rules}
        assert later["vitd-low"].overridden == 1
        assert b.report(since=T0 + timedelta(days=1)).rules == []
        as_json = b.report().to_json()["rules"][0]
        assert as_json["rule"] == "vitd-low"
        assert as_json["acceptance_rate"] == 0.0
    finally:
        a.close()
        b.close()


def test_report_keeps_the_top_reasons_of_late_attributed_feedback(store: FeedbackStore) -> None:
    reasons = ["a", "b", "c", "d"]
    store.enqueue_cards(SERVICE, [card(f"c-{r}", "A") for r in reasons])
    items = [
        {"card": f"c-{r}", "outcome": "overridden", "overrideReason": {"reason": {"code": r, "system": "s"}}}
        for r in reasons
    ]
    store.record_feedback(SERVICE, parse_feedback({"feedback": items}).feedback)
    (rule,) = store.report().rules
    assert (rule.rule, rule.overridden, [r.code for r in rule.top_reasons]) == ("A", 4, ["a", "b", "c"])
    assert store.record_cards(SERVICE, [{"uuid": ""}]) == 0


def make_app(tmp_path: Path, **options: Any) -> Flask:
    s = settings(tmp_path)
    options = {"interval": 3600.0, **options}
    store = FeedbackStore(s.database, clock=fixed_clock(), served_options=options)
    return create_app(s, ruleset(), store)


def test_http_feedback_right_after_an_answer_is_attributed(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    store = app.extensions["d3k2.store"]
    try:
        client = app.test_client()
        cards = post(client, f"/cds-services/{SERVICE}", hook_request()).get_json()["cards"]
        assert cards
        assert store.served.queued == len(cards)  # the answer only queued them
        item = {"card": cards[0]["uuid"], "outcome": "accepted"}
        assert post(client, f"/cds-services/{SERVICE}/feedback", {"feedback": [item]}).status_code == 200
        with store.engine.connect() as connection:
            assert connection.scalar(select(feedback.c.rule_id)) == cards[0]["source"]["topic"]["code"]
        assert sorted(served_uuids(store)) == sorted(c["uuid"] for c in cards)
    finally:
        store.close()


class Writers:
    """The threads that run INSERT INTO cards_served."""

    def __init__(self, store: FeedbackStore) -> None:
        self.names: set[str] = set()
        event.listen(store.engine, "before_cursor_execute", self._before)

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO cards_served"):
            self.names.add(threading.current_thread().name)


def test_only_the_writer_thread_writes_cards_served(tmp_path: Path) -> None:
    app = make_app(tmp_path, batch_rows=2)
    store = app.extensions["d3k2.store"]
    writers = Writers(store)
    try:
        client = app.test_client()
        for _ in range(3):  # full batches: the thread is woken while answers are sent
            answer_ = post(client, f"/cds-services/{SERVICE}", hook_request())
            assert answer_.status_code == 200
            answer_.close()
        item = {"card": answer_.get_json()["cards"][0]["uuid"], "outcome": "accepted"}
        assert post(client, f"/cds-services/{SERVICE}/feedback", {"feedback": [item]}).status_code == 200
        store.enqueue_cards(SERVICE, answer(0))
        store.close()  # the last rows, at close
        assert writers.names == {"d3k2-cards-served-writer"}
        assert store.served.stats.written == store.served.stats.enqueued
    finally:
        store.close()


def test_an_answer_never_waits_for_a_hung_write(tmp_path: Path) -> None:
    app = make_app(tmp_path, batch_rows=1)
    store = app.extensions["d3k2.store"]
    entered, release = threading.Event(), threading.Event()

    def hang(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO cards_served") and not release.is_set():
            entered.set()
            release.wait(WAIT)

    event.listen(store.engine, "before_cursor_execute", hang)
    try:
        client = app.test_client()
        first = post(client, f"/cds-services/{SERVICE}", hook_request())  # a full batch: the thread hangs
        assert entered.wait(WAIT)
        uuids = [c["uuid"] for c in first.get_json()["cards"]]
        for _ in range(3):  # answered while the writer hangs (a bound on a hang, not a speed)
            again = post(client, f"/cds-services/{SERVICE}", hook_request())
            assert again.status_code == 200
            uuids += [c["uuid"] for c in again.get_json()["cards"]]
        assert store.served.flush(timeout=0.001) is False  # the thread is still in its write
        release.set()
        assert store.flush() is True
        assert sorted(served_uuids(store)) == sorted(uuids)
    finally:
        release.set()
        store.close()


def test_a_flush_during_the_backoff_neither_retries_nor_uses_an_attempt(store: FeedbackStore) -> None:
    """Each feedback POST flushes: in an outage those flushes used up a batch's attempts in seconds."""
    writer = store.served
    writer.backoff, writer.max_attempts = 3600.0, 2
    FailInserts(store, times=1)
    store.enqueue_cards(SERVICE, answer(0))
    assert store.flush() is False  # the first attempt, which fails
    for _ in range(5):
        assert store.flush() is False  # at once: the retry is an hour away and keeps its attempts
    assert (writer.queued, writer.stats.write_errors, writer.stats.dropped) == (2, 1, 0)
    writer.close()  # the thread's own last attempt, which succeeds
    assert served_uuids(store) == ["a-0", "b-0"]


def test_while_answers_flow_the_thread_writes_only_full_batches(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path), batch_rows=4)
    entered, release = threading.Event(), threading.Event()

    def hang_once(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO cards_served") and not entered.is_set():
            entered.set()
            release.wait(WAIT)

    event.listen(store.engine, "before_cursor_execute", hang_once)
    writer = store.served
    try:
        store.enqueue_cards(SERVICE, answer(0))
        store.enqueue_cards(SERVICE, answer(1))  # 4 rows: a batch, which the thread starts writing
        assert entered.wait(WAIT)
        for i in range(2, 5):  # 6 more while it writes
            store.enqueue_cards(SERVICE, answer(i))
        release.set()
        with writer._cond:
            assert writer._cond.wait_for(lambda: writer.stats.batches == 2, WAIT)
            assert len(writer._pending) == 2  # one more full batch; the other 2 rows gather on
        assert store.flush() is True
        assert (writer.stats.batches, len(served_uuids(store))) == (3, 10)
    finally:
        release.set()
        store.close()


# ---------------------------------------------------------------- losses: counted, never the answer


def test_a_full_queue_drops_rows_and_counts_them(
    store: FeedbackStore, caplog: pytest.LogCaptureFixture
) -> None:
    writer = store.served
    writer.capacity, writer._warn_every = 5, 3600.0
    events = Events()
    writer.listener = events
    with caplog.at_level(logging.WARNING, logger="d3k2.store.served"):
        assert store.enqueue_cards(SERVICE, answer(0) + answer(1)) == 4
        assert store.enqueue_cards(SERVICE, answer(2)) == 0
        assert store.enqueue_cards(SERVICE, answer(3)) == 0
    assert (writer.stats.dropped_queue_full, writer.stats.enqueued, writer.queued) == (4, 8, 4)
    assert events.seen == [(DROPPED_QUEUE_FULL, 2), (DROPPED_QUEUE_FULL, 2)]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["cards served: queue full (5 rows), dropped 2 rows since the last warning"]
    store.flush()
    assert len(served_uuids(store)) == 4


def test_the_writer_survives_a_database_error_and_retries(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path), interval=0.001, backoff=0.001)
    try:
        failing = FailInserts(store, times=2)
        commits = Commits(store)
        events = Events()
        store.served.listener = events
        store.enqueue_cards(SERVICE, answer(0))
        assert commits.written.wait(WAIT)
        settled(store)
        assert failing.left == 0
        assert len(served_uuids(store)) == 2
        stats = store.served.stats
        assert (stats.write_errors, stats.written, stats.dropped) == (2, 2, 0)
        assert events.seen == [(WRITE_ERROR, 2), (WRITE_ERROR, 2)]
    finally:
        store.close()


def test_a_batch_is_dropped_after_its_last_attempt(
    store: FeedbackStore, caplog: pytest.LogCaptureFixture
) -> None:
    failing = FailInserts(store, times=3)
    writer = store.served
    writer.max_attempts, writer.backoff = 3, 0.001
    events = Events()
    writer.listener = events
    store.enqueue_cards(SERVICE, answer(0))
    with caplog.at_level(logging.WARNING, logger="d3k2.store.served"):
        assert store.flush() is False  # the first attempt; the thread retries twice more, then drops
        with writer._cond:
            assert writer._cond.wait_for(lambda: writer.stats.dropped_after_retries == 2, WAIT)
    assert (failing.left, writer.queued) == (0, 0)
    assert (writer.stats.write_errors, writer.stats.dropped_after_retries) == (3, 2)
    assert events.seen == [(WRITE_ERROR, 2)] * 3 + [(DROPPED_AFTER_RETRIES, 2)]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1] == (
        "cards served: dropped a batch of 2 rows after 3 failed attempts (Exception: disk I/O error)"
    )
    assert "a-0" not in " ".join(messages)  # counts only, no card ids
    store.enqueue_cards(SERVICE, answer(1))
    assert store.flush() is True  # the next batch goes through
    assert served_uuids(store) == ["a-1", "b-1"]


def test_rows_queued_through_a_postgres_outage_are_all_written(tmp_path: Path) -> None:
    """PostgreSQL stopped while answers queue cards and feedback POSTs (each a flush) fail with 503: with
    the default five attempts, the flushes used them up and the batch was dropped. Now the thread's own
    retries, seconds apart, outlast the outage and every row is written once the server is back."""
    with running_postgres() as server:
        store = new_store(server.create_database(), backoff=1.0, max_backoff=8.0, max_attempts=5)
        writer = store.served
        try:
            store.enqueue_cards(SERVICE, answer(0))
            assert store.flush() is True
            server.stop()
            for i in range(1, 11):
                store.enqueue_cards(SERVICE, answer(i))
                with pytest.raises(StoreUnavailable):
                    store.record_feedback(SERVICE, parse_feedback(sandbox_feedback("accepted")).feedback)
            assert writer.stats.write_errors >= 1
            assert writer.stats.dropped == 0
            server.start()
            with writer._cond:
                assert writer._cond.wait_for(lambda: writer.stats.written == 22, WAIT)
            assert writer.stats.dropped == 0
            assert sorted(served_uuids(store)) == sorted(
                uuid for i in range(11) for uuid in (f"a-{i}", f"b-{i}")
            )
        finally:
            store.close()


def test_close_drops_what_a_failing_database_cannot_take(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path), backoff=3600.0)
    FailInserts(store, times=1000)
    events = Events()
    store.served.listener = events
    store.enqueue_cards(SERVICE, answer(0))
    store.close()
    assert store.served.stats.dropped_at_close == 2
    assert events.seen[-1] == (DROPPED_AT_CLOSE, 2)


def test_close_does_not_wait_forever_for_a_hung_write(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path), batch_rows=2)
    entered, release = threading.Event(), threading.Event()

    def hang(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO cards_served") and not release.is_set():
            entered.set()
            release.wait(WAIT)

    event.listen(store.engine, "before_cursor_execute", hang)
    store.enqueue_cards(SERVICE, answer(0))  # a full batch: the thread writes it, and hangs
    assert entered.wait(WAIT)
    store.enqueue_cards(SERVICE, answer(1))
    assert store.served.flush(timeout=0.001) is False  # the thread holds the batch
    thread = store.served._thread
    assert thread is not None
    store.served.close(timeout=0.001)
    assert store.served.stats.dropped_at_close == 2  # what waited behind the hung batch
    release.set()
    thread.join(WAIT)
    assert served_uuids(store) == ["a-0", "b-0"]
    store.close()


def test_an_unexpected_error_keeps_the_thread_alive(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = new_store(sqlite_url(tmp_path), interval=0.001, backoff=0.001)
    writer = store.served
    real = writer._write_queued
    calls = []

    def broken_once(full_only: bool = False) -> float | None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(full_only)

    writer._write_queued = broken_once  # type: ignore[method-assign]
    commits = Commits(store)
    try:
        with caplog.at_level(logging.ERROR, logger="d3k2.store.served"):
            store.enqueue_cards(SERVICE, answer(0))
            assert commits.written.wait(WAIT)
            settled(store)
        assert "cards-served writer: unexpected error" in caplog.text
        assert len(served_uuids(store)) == 2
    finally:
        store.close()


def test_a_failing_listener_is_logged_not_raised(
    store: FeedbackStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_kind: str, _rows: int) -> None:
        raise RuntimeError("listener bug")

    store.served.listener = broken
    store.served.capacity = 1
    with caplog.at_level(logging.ERROR, logger="d3k2.store.served"):
        assert store.enqueue_cards(SERVICE, answer(0)) == 0
    assert "the listener failed" in caplog.text


def test_errors_are_described_without_sql_or_parameters() -> None:
    wrapped = OperationalError("INSERT INTO cards_served VALUES (?)", ("secret",), Exception("locked\nmore"))
    assert sv.describe_error(wrapped) == "Exception: locked"
    assert sv.describe_error(RuntimeError()) == "RuntimeError"


def test_http_answers_survive_a_full_queue_and_failures_reach_metrics(tmp_path: Path) -> None:
    app = make_app(tmp_path, capacity=1)
    store = app.extensions["d3k2.store"]
    try:
        client = app.test_client()
        answer_ = post(client, f"/cds-services/{SERVICE}", hook_request())
        assert answer_.status_code == 200
        cards = answer_.get_json()["cards"]
        assert len(cards) > 1  # more rows than the queue holds: all dropped, the answer unaffected
        store.served.capacity = 100
        assert post(client, f"/cds-services/{SERVICE}", hook_request()).status_code == 200
        FailInserts(store, times=1)
        assert store.flush() is False
        found = samples(metrics_of(app).exposition().decode())
        assert metric(found, "d3k2_store_errors_total", operation="record_cards_dropped") == len(cards)
        assert metric(found, "d3k2_store_errors_total", operation="record_cards") == 1
        assert metric(found, "d3k2_cards_record_seconds_count") == 2
    finally:
        store.close()


def test_a_bug_in_recording_never_costs_the_answer(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    store = app.extensions["d3k2.store"]

    def broken(*_args: Any) -> int:
        raise RuntimeError("a bug")

    store.enqueue_cards = broken
    try:
        assert post(app.test_client(), f"/cds-services/{SERVICE}", hook_request()).status_code == 200
        found = samples(metrics_of(app).exposition().decode())
        assert metric(found, "d3k2_store_errors_total", operation="record_cards") == 1
    finally:
        store.close()


# ---------------------------------------------------------------- fork safety


def test_a_writer_from_another_process_starts_afresh(store: FeedbackStore) -> None:
    """As after a fork: the parent's thread and queue are not this process's."""
    writer = store.served
    store.enqueue_cards(SERVICE, answer(0))
    parent_thread, parent_cond = writer._thread, writer._cond
    assert parent_thread is not None
    writer._pid = -1
    store.enqueue_cards(SERVICE, answer(1))
    assert writer._thread is not parent_thread
    assert writer.queued == 2  # the parent's rows are the parent's to write
    with parent_cond:  # here the "parent's" thread still runs: woken, it sees it is not the owner
        parent_cond.notify_all()
    parent_thread.join(WAIT)
    assert not parent_thread.is_alive()
    assert writer.queued == 2
    second_cond = writer._cond
    writer._pid = -1
    assert store.flush() is True  # flush adopts too, and writes only this process's rows
    assert served_uuids(store) == []
    with second_cond:
        second_cond.notify_all()
    store.enqueue_cards(SERVICE, answer(2))
    store.flush()
    assert served_uuids(store) == ["a-2", "b-2"]


def test_a_pooled_connection_of_another_process_is_not_used(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path))
    try:
        with store.engine.connect() as connection:
            inherited = connection.connection.dbapi_connection
            connection.connection._connection_record.info["pid"] = -1  # as if opened before a fork
        with store.engine.connect() as connection:
            assert connection.connection.dbapi_connection is not inherited
        with store.engine.connect() as connection:  # the new one is this process's: kept
            fresh = connection.connection.dbapi_connection
        with store.engine.connect() as connection:
            assert connection.connection.dbapi_connection is fresh
    finally:
        store.close()
        inherited.close()  # a real child leaves it to its parent; here the parent is this process


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_writes_its_rows_and_not_its_parents(tmp_path: Path) -> None:
    store = new_store(sqlite_url(tmp_path))
    try:
        store.enqueue_cards(SERVICE, [card("parent", "A")])
        parent_thread = store.served._thread
        assert parent_thread is not None
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code, never return into pytest
            code = 1
            try:
                queued = store.enqueue_cards(SERVICE, [card("child", "B")]) == 1
                fresh = store.served.queued == 1  # its own row only: the parent's is the parent's
                started = store.served._thread not in (None, parent_thread)
                store.close()
                code = 0 if (fresh, queued, started) == (True, True, True) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert served_uuids(store) == ["child"]
        store.flush()
        assert served_uuids(store) == ["child", "parent"]
    finally:
        store.close()


# ---------------------------------------------------------------- gunicorn: a graceful stop loses nothing

GUNICORN_TEST_CONF = """
exec(open({conf!r}).read())
preload_app = True  # the app (and its store) is built in the master, before the workers fork


def post_worker_init(worker):
    # The writer would wait an hour: only the exit hooks can have written the rows.
    worker.wsgi.extensions["d3k2.store"].served.interval = 3600.0
"""


def test_gunicorn_workers_write_their_queues_when_stopped(tmp_path: Path) -> None:
    conf = tmp_path / "gunicorn.test.conf.py"
    conf.write_text(GUNICORN_TEST_CONF.format(conf=str(REPO / "docker" / "gunicorn.conf.py")))
    port = free_port()
    env = gunicorn_env(tmp_path, port, workers=2)
    (tmp_path / "metrics").mkdir()  # preloading builds the app (and its metrics) before on_starting
    log_path = tmp_path / "gunicorn.log"
    base = f"http://127.0.0.1:{port}"
    served: list[str] = []
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", str(conf), "d3k2.http.wsgi:app"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            wait_until_up(base, process, log_path)
            for _ in range(6):
                body = post_json(f"{base}/cds-services/{SERVICE}", hook_request())
                served += [c["uuid"] for c in body["cards"]]
        finally:
            stop(process, timeout=30)
    assert process.returncode == 0, log_path.read_text(errors="replace")
    assert served
    check = FeedbackStore(f"sqlite:///{tmp_path / 'data' / 'd3k2.sqlite3'}")
    try:
        assert sorted(served_uuids(check)) == sorted(served)
    finally:
        check.close()


def wait_until_up(base: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    up = threading.Event()
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                if response.status == 200:
                    up.set()
                    break
        except OSError:
            up.wait(0.1)
    if not up.is_set():
        pytest.fail(f"gunicorn did not come up:\n{log_path.read_text(errors='replace')}")


def post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-D3K2-Today": TODAY.isoformat()},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_writers_closed_at_exit_leave_no_idle_connection(tmp_path: Path) -> None:
    """A store nobody closed: the exit hook writes its rows and closes its connections too (Python 3.13
    reports a SQLite connection left to the collector; a hook worker's exit must not leave one open)."""
    store = new_store(sqlite_url(tmp_path))
    store.enqueue_cards(SERVICE, answer(0))
    assert store.flush()
    assert store.engine.pool.checkedin() == 1  # the writer's connection, idle in the pool
    sv.close_served_writers()
    assert store.engine.pool.checkedin() == 0
