"""Feedback persistence: round trips on SQLite and on a real PostgreSQL server, idempotency, restarts,
a database that is down (503 for feedback, 200 for cards), and the governance report on known data."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from builders import (
    SERVICE,
    T0,
    card,
    close,
    hook_request,
    make_app,
    post,
    refused_port,
    rows,
    sandbox_feedback,
)
from d3k2.core.hooks import FeedbackItem, parse_feedback
from d3k2.store.feedback import FeedbackStore
from d3k2.store.schema import StoreUnavailable, cards_served, feedback
from d3k2.tools.cli import main
from postgres import running_postgres

# ---------------------------------------------------------------- the store


def test_sandbox_feedback_round_trip(store: FeedbackStore) -> None:
    store.record_cards(
        SERVICE,
        [card("6f0d1a8e-3c2b-4b7a-9a51-2f9e0c7d4b11", "vitd-low"), card("other", "kidney-advanced", "info")],
    )
    names = ["accepted", "overridden", "overridden.no-reason", "accepted.order-sign"]
    results = [store.record_feedback(SERVICE, parse_feedback(sandbox_feedback(n)).feedback) for n in names]
    assert [r.new for r in results] == [(True,), (True,), (True,), (True,)]

    served = rows(store, cards_served)
    assert [(r["card_uuid"], r["rule_id"], r["indicator"], r["served_at"]) for r in served] == [
        ("6f0d1a8e-3c2b-4b7a-9a51-2f9e0c7d4b11", "vitd-low", "warning", T0),
        ("other", "kidney-advanced", "info", T0),
    ]
    stored = rows(store, feedback)
    accepted, overridden, dismissed, accepted_sign = stored
    assert accepted["service_id"] == SERVICE
    assert accepted["rule_id"] == "vitd-low"
    assert accepted["outcome"] == "accepted"
    assert accepted["accepted_suggestions"] == ["b7e4c0d2-58a1-4f3e-8c6d-0a9b1e2f3c44"]
    assert accepted["outcome_at"] == datetime(2026, 11, 24, 19, 11, 36, 72000, tzinfo=UTC)
    assert accepted["received_at"] == T0
    assert accepted["override_reason_code"] is None
    assert (
        overridden["outcome"],
        overridden["override_reason_code"],
        overridden["override_reason_system"],
    ) == (
        "overridden",
        "clinician-judgement",
        "http://example.org/d3k2/override-reason",
    )
    assert overridden["accepted_suggestions"] == []
    # A plain "Dismiss" on a card this store never served: stored, rule unknown.
    assert (dismissed["card_uuid"], dismissed["rule_id"], dismissed["override_reason_code"]) == (
        "1c9e7f20-4d6b-4a8e-b3f5-7e2d9c0a6b55",
        None,
        None,
    )
    assert accepted_sign["outcome_at"] == datetime(2026, 11, 24, 19, 12, 4, 383000, tzinfo=UTC)


def test_identical_feedback_is_stored_once(store: FeedbackStore) -> None:
    items = parse_feedback(sandbox_feedback("overridden")).feedback
    assert store.record_feedback(SERVICE, items).new == (True,)
    again = store.record_feedback(SERVICE, items, received_at=T0 + timedelta(minutes=5))
    assert (again.new, again.duplicates) == ((False,), 1)
    assert len(rows(store, feedback)) == 1


def test_feedback_differing_in_any_field_is_stored_again(store: FeedbackStore) -> None:
    base = sandbox_feedback("overridden")["feedback"][0]
    variants = [
        base,
        {**base, "outcomeTimestamp": "2026-11-24T19:11:45.000Z"},
        {**base, "overrideReason": {"reason": {"code": "patient-declined", "system": "x"}}},
        {**base, "overrideReason": {**base["overrideReason"], "userComment": "on warfarin"}},
        {**base, "outcome": "accepted", "overrideReason": None, "acceptedSuggestions": [{"id": "s1"}]},
    ]
    result = store.record_feedback(SERVICE, parse_feedback({"feedback": variants}).feedback)
    assert result.new == (True,) * 5
    # The same timestamp written with an offset is the same moment: a duplicate.
    same = {**base, "outcomeTimestamp": "2026-11-24T20:11:44.866+01:00"}
    assert store.record_feedback(SERVICE, parse_feedback({"feedback": [same]}).feedback).new == (False,)
    assert rows(store, feedback)[3]["override_comment"] == "on warfarin"


def test_older_feedback_shapes_are_stored(store: FeedbackStore) -> None:
    bare = {"card": "c1", "outcome": "overridden", "overrideReason": {"code": "r1", "system": "s"}}
    listed = {"card": "c2", "outcome": "overridden", "overrideReasons": [{"code": "r2", "system": "s"}]}
    flat = {"card": "c3", "outcome": "accepted", "acceptedSuggestions": ["s1", "s2"]}
    store.record_feedback(SERVICE, parse_feedback({"feedback": [bare, listed, flat]}).feedback)
    stored = rows(store, feedback)
    assert [r["override_reason_code"] for r in stored] == ["r1", "r2", None]
    assert stored[2]["accepted_suggestions"] == ["s1", "s2"]
    assert stored[0]["outcome_at"] is None


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    s = FeedbackStore(f"sqlite:///{tmp_path / 'new' / 'dir' / 'fb.sqlite3'}")
    try:
        s.migrate()
        with s.engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        s.close()
    assert (tmp_path / "new" / "dir" / "fb.sqlite3").exists()


def test_migrate_twice_is_a_no_op(store: FeedbackStore) -> None:
    store.migrate()
    with store.engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM d3k2_alembic_version")).scalar()
        assert version == "0003_card_uuid_key"


# ---------------------------------------------------------------- the report


def load_known_data(store: FeedbackStore) -> None:
    day1, day2 = T0, T0 + timedelta(days=1)
    store.record_cards("d3k2-order-select", [card("a1", "A"), card("b1", "B", "info")], served_at=day1)
    store.record_cards("d3k2-order-select", [card("a2", "A"), card("a3", "A")], served_at=day1)
    store.record_cards("d3k2-order-select", [card("a1", "A")], served_at=day2)  # a replay: same card
    store.record_cards("d3k2-order-select", [card("a4", "A"), card("b2", "B", "info")], served_at=day2)

    def give(items: list[dict[str, Any]], at: datetime) -> None:
        store.record_feedback("d3k2-order-select", parse_feedback({"feedback": items}).feedback, at)

    reason = {"system": "http://example.org/d3k2/override-reason"}
    give([{"card": "a1", "outcome": "accepted", "acceptedSuggestions": [{"id": "s"}]}], day1)
    give(
        [
            {
                "card": "a2",
                "outcome": "overridden",
                "overrideReason": {"reason": {**reason, "code": "judgement"}},
            },
            {
                "card": "a3",
                "outcome": "overridden",
                "overrideReason": {"reason": {**reason, "code": "judgement"}},
            },
            {"card": "b1", "outcome": "overridden"},
        ],
        day1,
    )
    give(
        [
            {
                "card": "a4",
                "outcome": "overridden",
                "overrideReason": {"reason": {**reason, "code": "declined"}},
            },
            {
                "card": "a4",
                "outcome": "overridden",
                "outcomeTimestamp": "2026-11-25T10:00:00Z",
                "overrideReason": {"reason": {**reason, "code": "already-taking"}},
            },
            {
                "card": "a1",
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "s"}],
                "outcomeTimestamp": "x",
            },
            {"card": "zz", "outcome": "accepted"},
        ],
        day2,
    )
    # Sent twice: counted once.
    give(
        [
            {
                "card": "a2",
                "outcome": "overridden",
                "overrideReason": {"reason": {**reason, "code": "judgement"}},
            }
        ],
        day2,
    )


def test_report_on_known_data(store: FeedbackStore) -> None:
    load_known_data(store)
    report = {r.rule: r for r in store.report().rules}
    assert list(report) == ["A", "B", None]
    a = report["A"]
    assert (a.served, a.shown, a.accepted, a.overridden, a.feedback) == (5, 4, 1, 3, 6)
    assert a.acceptance_rate == 0.25
    assert [(r.code, r.count) for r in a.top_reasons] == [
        ("judgement", 2),
        ("already-taking", 1),
        ("declined", 1),
    ]
    b = report["B"]
    assert (b.served, b.shown, b.accepted, b.overridden, b.feedback) == (2, 2, 0, 1, 1)
    assert [(r.label, r.count) for r in b.top_reasons] == [("(no reason given)", 1)]
    unknown = report[None]
    assert (unknown.served, unknown.shown, unknown.accepted, unknown.feedback) == (0, 0, 1, 1)
    assert unknown.acceptance_rate is None


def test_report_since_counts_only_the_later_day(store: FeedbackStore) -> None:
    load_known_data(store)
    report = {r.rule: r for r in store.report(since=T0 + timedelta(hours=12)).rules}
    a = report["A"]
    assert (a.served, a.shown, a.accepted, a.overridden, a.feedback) == (2, 2, 1, 1, 3)
    assert [(r.code, r.count) for r in a.top_reasons] == [("already-taking", 1), ("declined", 1)]
    assert (report["B"].shown, report["B"].feedback) == (1, 0)


def test_cli_report_text_and_json(tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = FeedbackStore(f"sqlite:///{data / 'd3k2.sqlite3'}")
    try:
        s.migrate()
        load_known_data(s)
    finally:
        s.close()
    runner = CliRunner()
    env = {"D3K2_DATA_DIR": str(data), "D3K2_DATABASE_URL": ""}
    as_json = runner.invoke(main, ["feedback", "report", "--format", "json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    rules = {r["rule"]: r for r in json.loads(as_json.output)["rules"]}
    assert (rules["A"]["shown"], rules["A"]["accepted"], rules["A"]["acceptance_rate"]) == (4, 1, 0.25)
    assert rules["A"]["top_reasons"][0] == {
        "code": "judgement",
        "system": "http://example.org/d3k2/override-reason",
        "count": 2,
        "display": None,
    }
    as_text = runner.invoke(main, ["feedback", "report", "--since", "2026-11-25"], env=env)
    assert as_text.exit_code == 0, as_text.output
    lines = as_text.output.splitlines()
    assert lines[0] == "Feedback per rule since 2026-11-25 (activity: 2026-11-25 to 2026-11-25)"
    assert lines[2].split()[:5] == ["rule", "shown", "served", "accepted", "accept%"]
    assert lines[3].split() == [
        *("A", "2", "2", "1", "50.0", "0", "1", "50.0"),
        *("already-taking", "(1),", "declined", "(1)"),
    ]
    missing = runner.invoke(main, ["feedback", "report"], env={**env, "D3K2_DATA_DIR": str(tmp_path / "no")})
    assert missing.exit_code == 1
    assert "no feedback database" in missing.output
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- over HTTP


def test_http_feedback_round_trip(db_url: str, tmp_path: Path) -> None:
    app = make_app(tmp_path, db_url)
    try:
        client = app.test_client()
        answer = post(client, f"/cds-services/{SERVICE}", hook_request())
        assert answer.status_code == 200
        cards = answer.get_json()["cards"]
        assert cards
        first = cards[0]
        item = {
            "card": first["uuid"],
            "outcome": "overridden",
            "outcomeTimestamp": "2026-11-24T19:11:44.866Z",
            "overrideReason": {"reason": {"code": "clinician-judgement", "system": "http://example.org"}},
        }
        sent = post(client, f"/cds-services/{SERVICE}/feedback", {"feedback": [item]})
        assert (sent.status_code, sent.get_json()) == (
            200,
            {"received": 1, "stored": 1, "duplicates": 0, "persisted": True},
        )
        again = post(client, f"/cds-services/{SERVICE}/feedback", {"feedback": [item]})
        assert (again.status_code, again.get_json()["duplicates"]) == (200, 1)
        report = {r.rule: r for r in app.extensions["d3k2.store"].report().rules}
        topic = first["source"]["topic"]["code"]
        assert (report[topic].shown, report[topic].overridden) == (1, 1)
        assert sum(r.shown for r in report.values()) == len(cards)
    finally:
        close(app)


def test_restart_keeps_feedback(tmp_path: Path) -> None:
    item = sandbox_feedback("overridden")
    first = make_app(tmp_path)
    try:
        client = first.test_client()
        assert post(client, f"/cds-services/{SERVICE}/feedback", item).get_json()["stored"] == 1
    finally:
        close(first)
    second = make_app(tmp_path, at=T0 + timedelta(hours=1))
    try:
        client = second.test_client()
        assert post(client, f"/cds-services/{SERVICE}/feedback", item).get_json()["duplicates"] == 1
        stored = rows(second.extensions["d3k2.store"], feedback)
        assert [(r["card_uuid"], r["received_at"]) for r in stored] == [
            ("6f0d1a8e-3c2b-4b7a-9a51-2f9e0c7d4b11", T0)
        ]
    finally:
        close(second)


def test_postgres_going_down_gives_503_for_feedback_and_200_for_cards(tmp_path: Path) -> None:
    with running_postgres() as server:
        app = make_app(tmp_path, server.create_database())
        try:
            client = app.test_client()
            item = sandbox_feedback("accepted")
            assert post(client, f"/cds-services/{SERVICE}/feedback", item).status_code == 200
            assert client.get("/readyz").status_code == 200

            server.stop()
            answer = post(client, f"/cds-services/{SERVICE}", hook_request())
            assert answer.status_code == 200
            assert answer.get_json()["cards"]
            down = post(client, f"/cds-services/{SERVICE}/feedback", sandbox_feedback("overridden"))
            assert down.status_code == 503
            assert down.mimetype == "application/json"
            assert down.get_json()["error"] == "database-unavailable"
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.get_json()["checks"]["rules"] == "ok"
            assert client.get("/healthz").status_code == 200

            server.start()
            back = post(client, f"/cds-services/{SERVICE}/feedback", sandbox_feedback("overridden"))
            assert (back.status_code, back.get_json()["stored"]) == (200, 1)
        finally:
            close(app)


def test_database_down_at_startup(tmp_path: Path) -> None:
    app = make_app(tmp_path, f"postgresql://d3k2@127.0.0.1:{refused_port()}/d3k2")
    try:
        client = app.test_client()
        answer = post(client, f"/cds-services/{SERVICE}", hook_request())
        assert answer.status_code == 200
        assert answer.get_json()["cards"]
        down = post(client, f"/cds-services/{SERVICE}/feedback", sandbox_feedback("accepted"))
        assert (down.status_code, down.get_json()["error"]) == (503, "database-unavailable")
        assert client.get("/readyz").get_json()["status"] == "not-ready"
    finally:
        close(app)


def test_card_recording_pauses_after_a_failure(tmp_path: Path) -> None:
    s = FeedbackStore(f"postgresql://d3k2@127.0.0.1:{refused_port()}/d3k2", pause_after_failure=60.0)
    try:
        with pytest.raises(StoreUnavailable):
            s.record_cards(SERVICE, [card("c", "A")])
        with pytest.raises(StoreUnavailable, match="paused"):
            s.record_cards(SERVICE, [card("c", "A")])
    finally:
        s.close()


def test_feedback_card_id_too_long_is_400(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    try:
        body = {"feedback": [{"card": "x" * 200, "outcome": "overridden"}]}
        answer = post(app.test_client(), f"/cds-services/{SERVICE}/feedback", body)
        assert answer.status_code == 400
    finally:
        close(app)


# ---------------------------------------------------------------- NUL, hidden parameters, error logs

NUL_COMMENT = "patient declined\x00 see Quillfeather note"


@pytest.mark.parametrize(
    "item",
    [
        {"card": "c1", "outcome": "overridden", "overrideReason": {"userComment": NUL_COMMENT}},
        {"card": "c1\x00", "outcome": "overridden"},
        {"card": "c1", "outcome": "overridden", "overrideReason": {"reason": {"code": "judg\x00ement"}}},
    ],
    ids=["comment", "card", "reason-code"],
)
def test_nul_in_feedback_is_400_on_every_database(
    db_url: str, tmp_path: Path, item: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL refuses NUL in text: it was a 500 whose log line quoted the comment."""
    app = make_app(tmp_path, db_url)
    try:
        answer = post(app.test_client(), f"/cds-services/{SERVICE}/feedback", {"feedback": [item]})
        assert answer.status_code == 400, answer.get_json()
        assert "NUL" in answer.get_json()["detail"]
        assert rows(app.extensions["d3k2.store"], feedback) == []
    finally:
        close(app)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_database_errors_hide_the_statement_parameters(postgres_url: str) -> None:
    """An item that reaches PostgreSQL with a NUL (past the request model) fails without quoting it."""
    s = FeedbackStore(postgres_url)
    try:
        s.migrate()
        item = FeedbackItem(card="c1", outcome="overridden", overrideReason={"userComment": NUL_COMMENT})
        with pytest.raises(Exception) as raised:
            s.record_feedback(SERVICE, [item])
        assert "Quillfeather" not in str(raised.value)
        assert "hidden" in str(raised.value)
    finally:
        s.close()


def test_an_unhandled_error_logs_its_class_and_frames_not_its_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(tmp_path)

    def failing(*_args: Any, **_kwargs: Any) -> None:
        try:
            raise KeyError("reason text: Quillfeather")
        except KeyError as exc:
            raise RuntimeError("comment: Quillfeather declined") from exc

    monkeypatch.setattr(app.extensions["d3k2.store"], "record_feedback", failing)
    try:
        with caplog.at_level(logging.DEBUG):
            item = {"card": "c1", "outcome": "overridden"}
            answer = post(app.test_client(), f"/cds-services/{SERVICE}/feedback", {"feedback": [item]})
    finally:
        close(app)
    assert answer.status_code == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "builtins.RuntimeError at " in message
    assert "caused by builtins.KeyError at " in message
    assert "failing" in message
    assert errors[0].exc_info is None
    for record in caplog.records:
        assert "Quillfeather" not in record.getMessage()
