"""The card preview page in a real browser: headless Debian Chromium driven by Playwright for Python.

Needs the Debian packages chromium and chromium-driver (/usr/bin/chromium) and the playwright package from
the dev extras; Playwright's own browser download (`playwright install`) is never used. Without them these
tests say so loudly on stderr and are skipped; .ci/run installs Chromium so CI always runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builders import CARDS, FIXTURES, REPO, off_the_network, ruleset, serving
from d3k2.config import Settings
from d3k2.http.app import create_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "artifacts"
FIXTURE = "patient-view/sandbox-patient-view"
IMG = '<img src=x onerror="window.__xss=1">'
SCRIPT = "<script>window.__xss=2</script>"

MISSING = [
    need
    for need, present in (
        (
            "Playwright for Python (`.venv/bin/pip install -e '.[dev]'`, which pins it)",
            importlib.util.find_spec("playwright") is not None,
        ),
        (
            "Chromium at /usr/bin/chromium (as root: `apt-get install -y chromium chromium-driver`; "
            "never `playwright install`)",
            CHROMIUM.is_file(),
        ),
    )
    if not present
]


def skip_without_browser(config: pytest.Config) -> None:
    """Skip loudly when Chromium or Playwright is missing; where CI installed them (D3K2_REQUIRE_BROWSER=1)
    a missing one fails instead, so that no browser test is skipped unnoticed."""
    if not MISSING:
        return
    if os.environ.get("D3K2_REQUIRE_BROWSER") == "1":
        pytest.fail("browser tests are required (D3K2_REQUIRE_BROWSER=1) but need " + " and ".join(MISSING))
    _announce_missing(config)
    pytest.skip("browser tests need " + " and ".join(MISSING))


def _announce_missing(config: pytest.Config) -> None:
    """Print past pytest's output capture: a skipped browser test must not go unnoticed."""
    banner = "\n".join(
        [
            "",
            "!" * 100,
            "!!! BROWSER TESTS SKIPPED: the card preview page is NOT tested in a browser on this machine.",
            *(f"!!! missing: {need}" for need in MISSING),
            "!" * 100,
            "",
        ]
    )
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        sys.stderr.write(banner + "\n")
        return
    with capture.global_and_fixture_disabled():
        sys.stderr.write(banner + "\n")
        sys.stderr.flush()


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    skip_without_browser(request.config)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        env="dev",
        cards_dir=CARDS,
        data_dir=tmp_path_factory.mktemp("preview"),
        auth="off",
        preview=True,
        fhir_budget=2.0,
    )
    app = create_app(settings, ruleset())
    with serving(app) as base:
        yield base
    app.extensions["d3k2.store"].close()
    app.extensions["d3k2"].fetcher.close()


class Page:
    """A fresh browser context on /preview that records script errors and console errors (a CSP
    violation shows up there)."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1500, "height": 1100})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.route("**/preview/fixtures/*/*", _off_the_network)
        self.page.goto(f"{base_url}/preview")
        self.page.wait_for_selector("body[data-state=ready]")

    def wait_for_run(self, after: int = 0) -> None:
        # A function, not an expression string: the page's CSP forbids eval, which a string would need.
        self.page.wait_for_function(
            """after => Number(document.getElementById('cards').dataset.run || 0) > after
                || document.body.dataset.state === 'error'""",
            arg=after,
        )
        assert self.page.get_attribute("body", "data-state") == "done", self.page.text_content("#error")

    def run_number(self) -> int:
        return int(self.page.get_attribute("#cards", "data-run") or 0)

    def cards(self) -> list[tuple[str, str, str]]:
        found: list[list[str]] = self.page.eval_on_selector_all(
            ".card",
            """cards => cards.map(c => [
                c.dataset.topic, c.className, c.querySelector('.card-summary').textContent])""",
        )
        return [(topic, classes, summary) for topic, classes, summary in found]


def _off_the_network(route: Any) -> None:
    """The fixture as served, its recorded fhirServer moved off the network as builders.fixtures() does,
    so that its golden cards hold whatever listens on this machine."""
    served = route.fetch()
    fixture = served.json()
    fixture["request"] = off_the_network(fixture["request"])
    route.fulfill(response=served, json=fixture)


@pytest.fixture
def preview(browser: Any, base_url: str) -> Iterator[Page]:
    page = Page(browser, base_url)
    yield page
    page.context.close()
    assert page.errors == []


def golden_cards() -> list[dict[str, Any]]:
    expected = json.loads((FIXTURES / FIXTURE / "expected.json").read_text(encoding="utf-8"))
    cards: list[dict[str, Any]] = expected["response"]["cards"]
    return cards


def test_fixture_renders_golden_cards_and_whatif_k2_and_warfarin(preview: Page) -> None:
    page = preview.page
    page.select_option("#fixture", FIXTURE)
    preview.wait_for_run()

    golden = golden_cards()
    assert sorted(preview.cards()) == sorted(
        (c["source"]["topic"]["code"], f"card card-{c['indicator']}", c["summary"]) for c in golden
    )
    source = page.locator('.card[data-topic="granulomatous"] .card-source a')
    assert source.get_attribute("href") == next(
        c["source"]["url"] for c in golden if c["source"]["topic"]["code"] == "granulomatous"
    )
    assert source.get_attribute("rel") == "noopener noreferrer"
    # Markdown: the **bold** of the detail is bold, not asterisks.
    bold = page.text_content('.card[data-topic="granulomatous"] .card-detail strong')
    assert bold == "Sarcoidosis (2019-03-01)"
    # A suggestion button toggles the resource it would create.
    resource = page.locator('.card[data-topic="granulomatous"] pre.resource')
    assert resource.is_hidden()
    page.click('.card[data-topic="granulomatous"] button.suggestion')
    assert resource.is_visible()
    assert '"resourceType": "ServiceRequest"' in (resource.text_content() or "")
    # The explanation: facts read and rules fired or silent.
    assert "Observation/d3k2-vitd-1" in (page.text_content("#explanation") or "")
    fired = page.eval_on_selector_all(
        "#explanation tr.verdict-fired td:nth-child(2)", "cells => cells.map(c => c.textContent)"
    )
    assert "granulomatous" in fired

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "preview.png"), full_page=True)

    # K2 on the list beside the warfarin gives the INR card; without the warfarin it goes.
    before = preview.run_number()
    page.check("#wi-k2-on")
    preview.wait_for_run(before)
    assert "vka-k2-taking" in [topic for topic, _classes, _summary in preview.cards()]
    before = preview.run_number()
    page.check("#wi-warfarin-off")
    preview.wait_for_run(before)
    topics = [topic for topic, _classes, _summary in preview.cards()]
    assert "vka-k2-taking" not in topics
    assert {"granulomatous", "kidney-advanced"} <= set(topics)
    assert "warfarin=off" in (page.text_content("#explanation") or "")
    page.screenshot(path=str(ARTIFACTS / "preview-whatif.png"), full_page=True)


def test_whatif_lab_value_changes_the_cards(preview: Page) -> None:
    page = preview.page
    page.select_option("#fixture", "patient-view/deficient")
    preview.wait_for_run()
    assert "vitd-deficient" in [topic for topic, _c, _s in preview.cards()]
    before = preview.run_number()
    page.fill("#wi-vitd", "50")
    page.select_option("#wi-vitd-unit", "ng/mL")
    preview.wait_for_run(before)
    page.wait_for_selector('.card[data-topic="vitd-target"]')
    assert "vitd-deficient" not in [topic for topic, _c, _s in preview.cards()]


def hostile_bundle() -> dict[str, Any]:
    patient = {"reference": "Patient/xss-1"}
    active = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
    }
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "id": "xss-1",
                    "gender": "female",
                    "birthDate": "1990-01-01",
                }
            },
            {
                "resource": {
                    "resourceType": "Condition",
                    "id": "xss-sarcoid",
                    "clinicalStatus": active,
                    "code": {
                        "coding": [{"system": "http://snomed.info/sct", "code": "31541009"}],
                        # Both on the granulomatous card: pregnancy has no card beside it (it blocks D3).
                        "text": f"{IMG} {SCRIPT}",
                    },
                    "subject": patient,
                }
            },
            {
                "resource": {
                    "resourceType": "Condition",
                    "id": "xss-pregnancy",
                    "clinicalStatus": active,
                    "code": {
                        "coding": [{"system": "http://snomed.info/sct", "code": "77386006"}],
                        "text": SCRIPT,
                    },
                    "subject": patient,
                }
            },
            {
                "resource": {
                    "resourceType": "Medication",
                    "id": "xss-med",
                    "code": {
                        "coding": [
                            {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "855332"}
                        ],
                        "text": SCRIPT,
                    },
                }
            },
            {
                "resource": {
                    "resourceType": "MedicationStatement",
                    "id": "xss-warfarin",
                    "status": "active",
                    "medicationReference": {"reference": "Medication/xss-med", "display": IMG},
                    "subject": patient,
                }
            },
        ],
    }


@pytest.mark.parametrize("how", ["paste", "upload"])
def test_hostile_fhir_text_is_shown_literally_never_run(preview: Page, how: str) -> None:
    page = preview.page
    content = json.dumps(hostile_bundle())
    if how == "paste":
        page.fill("#payload", content)
        page.click("#run")
    else:
        page.set_input_files(
            "#upload",
            files=[{"name": "export.json", "mimeType": "application/json", "buffer": content.encode()}],
        )
    preview.wait_for_run()

    assert page.evaluate("typeof window.__xss") == "undefined"
    injected = page.eval_on_selector_all(
        "#cards img, #cards script, #explanation img, #explanation script, [onerror]", "nodes => nodes.length"
    )
    assert injected == 0
    topics = [topic for topic, _c, _s in preview.cards()]
    # Pregnancy beside granulomatous disease: no "as per prenatal care" card beside the one that blocks D3.
    assert "granulomatous" in topics and "pregnancy-d3" not in topics
    cards_text = page.text_content("#cards") or ""
    explanation = page.text_content("#explanation") or ""
    assert IMG in cards_text
    assert SCRIPT in cards_text
    assert IMG in explanation
    assert SCRIPT in explanation


def test_a_missing_browser_fails_where_ci_requires_it(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "MISSING", ["Debian chromium"])
    monkeypatch.setattr(module, "_announce_missing", lambda config: None)  # no banner for a pretend skip
    monkeypatch.setenv("D3K2_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="D3K2_REQUIRE_BROWSER=1"):
        skip_without_browser(request.config)
    monkeypatch.delenv("D3K2_REQUIRE_BROWSER")
    with pytest.raises(pytest.skip.Exception):
        skip_without_browser(request.config)
