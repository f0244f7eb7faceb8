"""Feedback that reflects decisions: stable card uuids over HTTP (no patient id stored), acceptances where
nothing is applied reported apart, the report per rule and ISO week, and the HTML governance page."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from builders import T0, close, fixed_clock, post, ruleset, sandbox_request, settings
from d3k2.core.hooks import parse_feedback
from d3k2.http.app import create_app
from d3k2.store.feedback import FeedbackStore
from d3k2.store.keys import card_key
from d3k2.store.report import Names, names_of
from d3k2.tools.cli import main
from d3k2.tools.governance import render_html

REASONS = "https://d3k2.dev/fhir/CodeSystem/override-reason"
PV, OS = "d3k2-patient-view", "d3k2-order-select"


def _card(uuid: str, rule: str) -> dict[str, Any]:
    return {"uuid": uuid, "indicator": "warning", "source": {"topic": {"code": rule}}}


def _give(store: FeedbackStore, service: str, items: list[dict[str, Any]], days: int = 0) -> None:
    store.record_feedback(service, parse_feedback({"feedback": items}).feedback, T0 + timedelta(days=days))


def _accept(card: str) -> dict[str, Any]:
    return {"card": card, "outcome": "accepted", "acceptedSuggestions": [{"id": "s"}]}


def _override(card: str, code: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": "overridden"}
    if code:
        item["overrideReason"] = {"reason": {"system": REASONS, "code": code}}
    return item


def seed(store: FeedbackStore) -> None:
    """Two ISO weeks (2026-W48: Tue 24 Nov; 2026-W49: Tue 1 Dec).

    vitd-deficient at patient-view: 4 cards (3 in W48, 1 in W49), one of them served 3 times; 2 "accepted"
    (nothing applied at patient-view), 1 overridden "already-supplemented".
    order-k2-vka at order-select: 2 cards (W48) served 5 times in all; 1 accepted (twice: counted once), 1
    overridden "anticoagulation-team-aware", and again with a plain dismiss."""
    week1, week2 = T0, T0 + timedelta(days=7)
    store.record_cards(PV, [_card("v1", "vitd-deficient"), _card("v2", "vitd-deficient")], served_at=week1)
    store.record_cards(PV, [_card("v1", "vitd-deficient"), _card("v3", "vitd-deficient")], served_at=week1)
    store.record_cards(PV, [_card("v1", "vitd-deficient")], served_at=week1 + timedelta(hours=1))
    store.record_cards(PV, [_card("v4", "vitd-deficient")], served_at=week2)
    for _ in range(4):
        store.record_cards(OS, [_card("k1", "order-k2-vka")], served_at=week1)
    store.record_cards(OS, [_card("k2", "order-k2-vka")], served_at=week1)
    _give(store, PV, [_accept("v1"), _accept("v2"), _override("v3", "already-supplemented")])
    _give(store, PV, [_accept("v4")], days=7)
    _give(store, OS, [_accept("k1"), _override("k2", "anticoagulation-team-aware")])
    _give(store, OS, [{**_accept("k1"), "outcomeTimestamp": "2026-11-24T19:30:00Z"}, _override("k2")], days=1)


@pytest.fixture
def seeded(store: FeedbackStore) -> FeedbackStore:
    seed(store)
    return store


# ---------------------------------------------------------------- the report


def test_report_per_rule_counts_cards_and_sets_not_applied_acceptances_apart(seeded: FeedbackStore) -> None:
    report = seeded.report(names=names_of(ruleset()))
    rules = {r.rule: r for r in report.rules}
    assert list(rules) == ["order-k2-vka", "vitd-deficient"]
    vitd, k2 = rules["vitd-deficient"], rules["order-k2-vka"]
    assert (vitd.shown, vitd.served, vitd.accepted, vitd.not_applied, vitd.overridden, vitd.feedback) == (
        4, 6, 0, 3, 1, 4,
    )  # fmt: skip
    assert (k2.shown, k2.served, k2.accepted, k2.not_applied, k2.overridden, k2.feedback) == (
        2,
        5,
        1,
        0,
        1,
        4,
    )
    assert (vitd.title, k2.title) == ("25(OH)D deficient", "Vitamin K2 order with a vitamin K antagonist")
    assert [(r.label, r.count) for r in vitd.top_reasons] == [("Already on vitamin D", 1)]
    assert [(r.label, r.count) for r in k2.top_reasons] == [
        ("Anticoagulation team aware", 1),
        ("(no reason given)", 1),
    ]
    assert (k2.acceptance_rate, k2.override_rate, vitd.not_applied_rate) == (0.5, 0.5, 0.75)
    assert [(w.week, w.shown, w.accepted, w.not_applied, w.overridden) for w in vitd.weeks] == [
        ("2026-W48", 3, 0, 2, 1),
        ("2026-W49", 1, 0, 1, 0),
    ]
    assert [(w.week, w.shown, w.accepted, w.overridden) for w in report.weeks] == [
        ("2026-W48", 5, 1, 2),
        ("2026-W49", 1, 0, 0),
    ]
    assert (report.first, report.last) == (T0, T0 + timedelta(days=7))


def test_without_the_rule_set_every_acceptance_counts_as_applied(seeded: FeedbackStore) -> None:
    vitd = {r.rule: r for r in seeded.report(names=Names()).rules}["vitd-deficient"]
    assert (vitd.title, vitd.accepted, vitd.not_applied) == (None, 3, 0)


def test_report_text_shows_rates_not_applied_and_weeks(seeded: FeedbackStore) -> None:
    text = seeded.report(names=names_of(ruleset())).to_text().splitlines()
    assert text[0] == "Feedback per rule (activity: 2026-11-24 to 2026-12-01)"
    assert text[2].split() == [
        *("rule", "shown", "served", "accepted", "accept%", "not", "applied", "overridden", "override%"),
        *("top", "override", "reasons"),
    ]
    assert text[3].split() == [
        *("order-k2-vka", "2", "5", "1", "50.0", "0", "1", "50.0"),
        *("Anticoagulation", "team", "aware", "(1),", "(no", "reason", "given)", "(1)"),
    ]
    assert text[4].split()[:8] == ["vitd-deficient", "4", "6", "0", "0.0", "3", "1", "25.0"]
    weeks = text[
        text.index("Per ISO week (all rules; feedback counted in the week its card was first shown)") :
    ]
    assert [line.split() for line in weeks[2:]] == [
        ["week", "shown", "accepted", "not", "applied", "overridden"],
        ["2026-W48", "5", "1", "2", "2"],
        ["2026-W49", "1", "0", "1", "0"],
    ]


def test_report_of_an_empty_period(seeded: FeedbackStore) -> None:
    report = seeded.report(since=T0 + timedelta(days=30))
    assert (report.rules, report.first, report.period) == ([], None, "no activity")
    assert report.to_text().splitlines()[-1] == "(no cards served and no feedback in this period)"
    assert "No cards were served" in render_html(report, T0)


# ---------------------------------------------------------------- stable uuids over HTTP


def _order_select(hook_instance: str, start: str) -> dict[str, Any]:
    request = sandbox_request("order-select.request.json")
    request["hookInstance"] = hook_instance
    draft = request["context"]["draftOrders"]["entry"][0]["resource"]
    draft["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]["start"] = start
    return request


def test_repeated_order_select_calls_are_one_card_each_and_store_no_patient_id(tmp_path: Path) -> None:
    """The sandbox calls order-select on every keystroke (new hookInstance, dates as typed): one card."""
    app = create_app(
        settings(tmp_path), ruleset(), FeedbackStore(settings(tmp_path).database, clock=fixed_clock())
    )
    try:
        client = app.test_client()
        answers = [
            post(
                client,
                "/cds-services/d3k2-order-select",
                _order_select(f"00000000-0000-4000-8000-00000000000{i}", d),
            )
            for i, d in enumerate(["Invalid date", "0202-12-01", "2026-12-01"])
        ]
        uuids = [[c["uuid"] for c in a.get_json()["cards"]] for a in answers]
        assert uuids[0] and uuids[0] == uuids[1] == uuids[2]
        post(client, "/cds-services/d3k2-order-select/feedback", {"feedback": [_accept(uuids[0][0])]})
        report = app.extensions["d3k2.store"].report(names=names_of(ruleset()))
        assert sum(r.shown for r in report.rules) == len(uuids[0])
        assert sum(r.served for r in report.rules) == 3 * len(uuids[0])
        assert sum(r.accepted for r in report.rules) == 1
    finally:
        close(app)
    database = tmp_path / "data" / "d3k2.sqlite3"
    stored = b"".join(p.read_bytes() for p in database.parent.glob("d3k2.sqlite3*"))
    assert uuids[0][0].encode() in stored  # the files are read, and hold what was written
    assert b"d3k2-pt-1" not in stored


def test_two_instances_on_one_database_give_the_same_uuids_and_a_configured_key_others(
    db_url: str, tmp_path: Path
) -> None:
    first = create_app(settings(tmp_path / "a", database_url=db_url), ruleset())
    second = create_app(settings(tmp_path / "b", database_url=db_url), ruleset())
    own = create_app(settings(tmp_path / "own"), ruleset())  # its own SQLite file: its own key
    configured = create_app(settings(tmp_path / "c", database_url=db_url, card_key="k" * 40), ruleset())
    request = _order_select("00000000-0000-4000-8000-000000000001", "2026-12-01")

    def uuids(app: Any) -> list[str]:
        answer = post(app.test_client(), "/cds-services/d3k2-order-select", request)
        return [c["uuid"] for c in answer.get_json()["cards"]]

    try:
        assert uuids(first) and uuids(first) == uuids(second)
        assert not set(uuids(first)) & set(uuids(own))
        assert configured.extensions["d3k2.store"].card_key == b"k" * 40
        assert not set(uuids(configured)) & set(uuids(first))
    finally:
        for app in (first, second, own, configured):
            close(app)


def test_until_its_database_is_reached_a_store_uses_a_key_of_its_own(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'd3k2.sqlite3'}")
    try:
        stand_in = store.card_key  # not migrated: the database has not been reached yet
        assert len(stand_in) == 32 and store.card_key == stand_in
        store.migrate()
        assert store.card_key != stand_in
        with store.engine.connect() as connection:
            assert card_key(connection) == store.card_key
    finally:
        store.close()


# ---------------------------------------------------------------- the HTML page

VOID = {"meta", "link", "br", "hr", "img", "input", "rect", "line", "circle", "path"}


class Page(HTMLParser):
    """Checks nesting (every element closed, in order) and gathers table rows as cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.table: str | None = None
        self.cell: list[str] | None = None
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.append(str(found["id"]))
        if tag == "table":
            self.table = str(found.get("id"))
            self.tables[self.table] = []
        elif tag == "tr" and self.table:
            self.tables[self.table].append([])
        elif tag in ("td", "th") and self.table:
            self.cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.append(str(found["id"]))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self.cell is not None and self.table:
            self.tables[self.table][-1].append(" ".join(" ".join(self.cell).split()))
            self.cell = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def parsed(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert page.problems == [] and page.stack == []
    assert len(page.ids) == len(set(page.ids)), "ids must be unique"
    return page


def test_the_page_is_well_formed_self_contained_and_its_numbers_are_the_reports(
    seeded: FeedbackStore,
) -> None:
    html = render_html(seeded.report(names=names_of(ruleset())), T0)
    page = parsed(html)
    for svg in re.findall(r"<svg\b.*?</svg>", html, flags=re.S):
        ET.fromstring(svg)  # every chart is well-formed XML too
    assert "<script" not in html and not re.search(r"\b(src|href)=", html)
    style = re.search(r"<style>(.*?)</style>", html, flags=re.S)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert style and csp
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    assert csp.group(1).startswith(f"default-src 'none'; style-src 'sha256-{digest}'")
    assert page.tables["table-rules"][1:] == [
        [
            "Vitamin K2 order with a vitamin K antagonist order-k2-vka",
            *("2", "5", "1 (50%)", "0 (0%)", "1 (50%)", "4"),
        ],
        ["25(OH)D deficient vitd-deficient", *("4", "6", "0 (0%)", "3 (75%)", "1 (25%)", "4")],
    ]
    assert page.tables["table-reasons"][1:] == [
        ["Vitamin K2 order with a vitamin K antagonist order-k2-vka", "Anticoagulation team aware", "1"],
        ["(no reason given)", "1"],
        ["25(OH)D deficient vitd-deficient", "Already on vitamin D", "1"],
    ]
    assert page.tables["table-weeks"][1:] == [
        ["2026-W48", "5", "1", "2", "2"],
        ["2026-W49", "1", "0", "1", "0"],
    ]
    assert {"chart-rates", "chart-reasons", "chart-weeks", "period"} <= set(page.ids)
    assert '<strong id="period">2026-11-24 to 2026-12-01</strong>' in html
    assert re.findall(r'data-total="([^"]+)">(\d+)<', html) == [
        ("Cards shown", "6"),
        ("Times sent", "11"),
        ("Accepted (applied)", "1"),
        ("Accepted, not applied", "3"),
        ("Overridden", "2"),
    ]
    # Every chart says what it shows, and every bar has its number beside it (not colour alone).
    assert html.count('role="img"') == 3 and html.count("<title id=") == 3
    assert "75% (3 of 4)" in html and "Accepted at patient-view (not applied by the EHR)" in html


def test_rule_titles_and_reasons_are_escaped(seeded: FeedbackStore) -> None:
    names = Names(rules={"vitd-deficient": "<b>D</b> & co"}, hooks=names_of(ruleset()).hooks)
    html = render_html(seeded.report(names=names), T0)
    parsed(html)
    assert "<b>D</b>" not in html and "&lt;b&gt;D&lt;/b&gt; &amp; co" in html


def seeded_cli(tmp_path: Path) -> dict[str, str]:
    """A seeded SQLite feedback database under ``tmp_path``: the environment the CLI reads it with."""
    data = tmp_path / "data"
    store = FeedbackStore(f"sqlite:///{data / 'd3k2.sqlite3'}")
    try:
        store.migrate()
        seed(store)
    finally:
        store.close()
    return {"D3K2_DATA_DIR": str(data), "D3K2_DATABASE_URL": ""}


def html_page(env: dict[str, str], out: Path) -> Path:
    """``d3k2 feedback report --format html -o out``, which must succeed."""
    result = CliRunner().invoke(main, ["feedback", "report", "--format", "html", "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    return out


def test_cli_writes_the_html_page(tmp_path: Path) -> None:
    env = seeded_cli(tmp_path)
    out = html_page(env, tmp_path / "report.html")
    page = parsed(out.read_text(encoding="utf-8"))
    assert [row[0] for row in page.tables["table-rules"][1:]] == [
        "Vitamin K2 order with a vitamin K antagonist order-k2-vka",
        "25(OH)D deficient vitd-deficient",
    ]
    as_json = CliRunner().invoke(main, ["feedback", "report", "--format", "json"], env=env)
    rules = {r["rule"]: r for r in json.loads(as_json.output)["rules"]}
    assert (rules["vitd-deficient"]["not_applied"], rules["vitd-deficient"]["not_applied_rate"]) == (3, 0.75)
    assert json.loads(as_json.output)["weeks"][1] == {
        "week": "2026-W49",
        "shown": 1,
        "accepted": 0,
        "not_applied": 1,
        "overridden": 0,
    }
