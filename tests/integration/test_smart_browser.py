"""The "Why this card?" app in a real browser (Debian Chromium via Playwright), launched as an EHR does:
the EHR calls the patient-view hook, takes the card's smart link, registers a launch context carrying the
link's appContext, and opens the link's URL with iss and launch. The authorization server (authlib, in
tests/smart_ehr.py) approves, and the page must show the charts and the explain report, with no script or
CSP error. Screenshots go to artifacts/.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from test_preview_browser import ARTIFACTS, browser  # noqa: F401 (browser is a fixture)
from test_smart import PATIENT, TODAY, record
from werkzeug.serving import make_server

import smart_ehr
from builders import CARDS, ruleset
from d3k2.config import Settings
from d3k2.http.app import create_app
from fhir_server import FhirServer

pytestmark = pytest.mark.browser
READS = " ".join(
    f"patient/{r}.read"
    for r in ("Patient", "Observation", "MedicationStatement", "MedicationRequest", "Condition")
)


@pytest.fixture(scope="module")
def running(
    fhir_server: FhirServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, smart_ehr.Ehr]]:
    fhir_server.load(record())
    holder: dict[str, Any] = {}
    server = make_server("127.0.0.1", 0, lambda environ, start: holder["app"](environ, start), threaded=True)
    base = f"http://127.0.0.1:{server.server_port}"
    with smart_ehr.running(fhir_server.base_url) as ehr:
        ehr.redirect_uri = f"{base}/smart/callback"
        settings = Settings(
            env="test",
            cards_dir=CARDS,
            data_dir=tmp_path_factory.mktemp("smart-browser"),
            auth="off",
            smart_app_url=f"{base}/smart",
            smart_client_id=smart_ehr.CLIENT_ID,
            fhir_timeout=5.0,
            fhir_budget=10.0,
        )
        holder["app"] = app = create_app(settings, ruleset())
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield base, ehr
        finally:
            server.shutdown()
            thread.join()
            server.server_close()
            app.extensions["d3k2"].fetcher.close()


def smart_link_of_a_card(base: str, ehr: smart_ehr.Ehr) -> dict[str, Any]:
    """The EHR's hook call: no prefetch, its FHIR server and a token for d3k2 to read with."""
    ehr.tokens["cds-service-token"] = {"patient": PATIENT, "scope": READS}
    hook = {
        "hook": "patient-view",
        "hookInstance": "4b1c2a5e-smart-browser",
        "fhirServer": ehr.fhir_base,
        "fhirAuthorization": {
            "access_token": "cds-service-token",
            "token_type": "Bearer",
            "scope": READS,
            "subject": "d3k2",
        },
        "context": {"patientId": PATIENT, "userId": "Practitioner/1"},
    }
    answer = requests.post(
        f"{base}/cds-services/d3k2-patient-view", json=hook, headers={"X-D3K2-Today": TODAY}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    links = [
        link
        for card in answer.json()["cards"]
        for link in card["links"]
        if link["type"] == "smart"
        and json.loads(link["appContext"]) == {"rule": "vitd-deficient", "patient": PATIENT}
    ]
    assert links, answer.json()
    return links[0]


def test_a_card_link_opens_the_app_with_charts_and_the_report(
    browser: Any,  # noqa: F811 (the fixture imported above)
    running: tuple[str, smart_ehr.Ehr],
) -> None:
    base, ehr = running
    link = smart_link_of_a_card(base, ehr)
    launch = ehr.register_launch(PATIENT, link["appContext"])
    context = browser.new_context(
        viewport={"width": 1200, "height": 1000}, extra_http_headers={"X-D3K2-Today": TODAY}
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(f"{link['url']}?{urlencode({'iss': ehr.fhir_base, 'launch': launch})}")
    page.wait_for_selector("body[data-state=ready]")
    assert page.url == f"{base}/smart/"
    assert page.locator("#chart-1 svg circle").count() == 3
    assert page.locator("#chart-1 rect.band-deficient").count() == 1
    assert page.locator(".lanes .lane").count() == 1
    focused = page.locator("#focused-rule")
    assert focused.get_attribute("data-rule") == "vitd-deficient"
    assert "fired" in focused.inner_text()
    assert "warfarin" in page.locator("#medications").inner_text()
    assert page.locator("#cards li").count() >= 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "smart-app.png"), full_page=True)

    page.fill("#wi-vitd", "50")
    page.select_option("#wi-warfarin", "off")
    page.keyboard.press("Enter")
    page.wait_for_selector(".whatif-on")
    assert "vitd=50" in page.locator(".whatif-on").inner_text()
    assert "silent" in page.locator("#focused-rule").inner_text()
    page.screenshot(path=str(ARTIFACTS / "smart-app-whatif.png"), full_page=True)
    assert errors == []
    context.close()
