"""The "Why this card?" SMART app against a real SMART EHR: authlib's authorization server (PKCE S256
required, scopes and launch checked) and the local FHIR server (sekmet-fhir) behind a front that serves
.well-known/smart-configuration (tests/smart_ehr.py). d3k2 runs in Flask's test client; the EHR on a port.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

import smart_ehr
from builders import CARDS, ruleset
from d3k2.config import Settings
from d3k2.http.app import create_app
from fhir_server import FhirServer

PATIENT = "smart-pt-1"
TODAY = "2026-11-24"
APP_URL = "http://localhost/smart"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _put(resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
    }


def _lab(oid: str, code: str, day: str, value: float, unit: str) -> dict[str, Any]:
    return _put(
        {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "effectiveDateTime": day,
            "valueQuantity": {
                "value": value,
                "unit": unit,
                "system": "http://unitsofmeasure.org",
                "code": unit,
            },
        }
    )


def _statement(sid: str, code: str, text: str, **extra: Any) -> dict[str, Any]:
    return _put(
        {
            "resourceType": "MedicationStatement",
            "id": sid,
            "status": "active",
            "medicationCodeableConcept": {
                "coding": [{"system": RX, "code": code, "display": text}],
                "text": text,
            },
            "subject": {"reference": f"Patient/{PATIENT}"},
            **extra,
        }
    )


def record() -> dict[str, Any]:
    """Three years of low 25(OH)D, eGFR and calcium, a vitamin D3 product, and warfarin."""
    entries = [
        _put(
            {
                "resourceType": "Patient",
                "id": PATIENT,
                "birthDate": "1961-04-02",
                "name": [{"family": "Test"}],
            }
        ),
        _lab("smart-vitd-1", "62292-8", "2024-02-10", 14, "ng/mL"),
        _lab("smart-vitd-2", "62292-8", "2025-01-15", 45, "nmol/L"),
        _lab("smart-vitd-3", "1989-3", "2026-10-01", 19, "ng/mL"),
        _lab("smart-egfr-1", "33914-3", "2025-01-15", 72, "mL/min/{1.73_m2}"),
        _lab("smart-egfr-2", "33914-3", "2026-10-01", 66, "mL/min/{1.73_m2}"),
        _lab("smart-ca-1", "17861-6", "2026-10-01", 9.4, "mg/dL"),
        _statement("smart-warfarin", "855332", "warfarin sodium 5 MG Oral Tablet"),
        _statement(
            "smart-d3",
            "857466",
            "Cholecalciferol 5000 UNT Oral Tablet",
            effectivePeriod={"start": "2025-02-01", "end": "2025-08-01"},
            status="completed",
            dosage=[
                {
                    "text": "1 tablet once daily",
                    "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                    "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}],
                }
            ],
        ),
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.fixture(scope="module")
def ehr(fhir_server: FhirServer) -> Iterator[smart_ehr.Ehr]:
    fhir_server.load(record())
    with smart_ehr.running(fhir_server.base_url) as running:
        running.redirect_uri = f"{APP_URL}/callback"
        running.standalone_patient = PATIENT
        yield running


@pytest.fixture
def app(ehr: smart_ehr.Ehr, tmp_path: Any) -> Iterator[Any]:
    settings = Settings(
        env="test",
        cards_dir=CARDS,
        data_dir=tmp_path,
        auth="off",
        smart_app_url=APP_URL,
        smart_client_id=smart_ehr.CLIENT_ID,
        fhir_timeout=5.0,
        fhir_budget=10.0,
    )
    application = create_app(settings, ruleset())
    yield application
    application.extensions["d3k2"].fetcher.close()


@pytest.fixture(autouse=True)
def _reset(ehr: smart_ehr.Ehr) -> None:
    ehr.withhold.clear()
    ehr.code_ttl = 60.0


def authorize(location: str) -> str:
    """What the browser does at the authorization server: follow the authorize URL, get the callback."""
    answer = requests.get(location, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    callback = answer.headers["Location"]
    assert callback.startswith(f"{APP_URL}/callback?")
    return callback.removeprefix("http://localhost")


def launch(client: Any, ehr: smart_ehr.Ehr, app_context: str | None = '{"rule":"vitd-deficient"}') -> Any:
    token = ehr.register_launch(PATIENT, app_context)
    started = client.get("/smart/launch", query_string={"iss": ehr.fhir_base, "launch": token})
    assert started.status_code == 302, started.get_data(as_text=True)
    return started


def test_ehr_launch_reads_the_record_and_explains(app: Any, ehr: smart_ehr.Ehr) -> None:
    client = app.test_client()
    started = launch(client, ehr)
    params = parse_qs(urlsplit(started.headers["Location"]).query)
    assert params["code_challenge_method"] == ["S256"] and params["aud"] == [ehr.fhir_base]
    assert params["response_type"] == ["code"] and params["client_id"] == [smart_ehr.CLIENT_ID]
    scope = params["scope"][0].split()
    assert "launch" in scope and "patient/Observation.rs" in scope and "patient/Condition.rs" in scope
    done = client.get(authorize(started.headers["Location"]))
    assert done.status_code == 303 and done.headers["Location"] == f"{APP_URL}/"
    page = client.get("/smart/", headers={"X-D3K2-Today": TODAY})
    html = page.get_data(as_text=True)
    assert page.status_code == 200, html
    assert "<svg" in html and "band-deficient" in html
    # 45 nmol/L is drawn at 18 ng/mL, the value the rules use.
    assert ">18<" in html and "45 nmol/L" in html
    assert "Cholecalciferol 5000 UNT Oral Tablet" in html and "warfarin" in html
    assert 'id="focused-rule"' in html and 'data-rule="vitd-deficient"' in html
    assert "fired" in html and "silent" in html
    assert {"Observation", "MedicationStatement", "Condition"} <= set(ehr.reads)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["Cache-Control"] == "no-store"


def test_what_if_changes_the_cards(app: Any, ehr: smart_ehr.Ehr) -> None:
    client = app.test_client()
    client.get(authorize(launch(client, ehr).headers["Location"]))
    page = client.get(
        "/smart/", query_string={"vitd": "50", "warfarin": "off"}, headers={"X-D3K2-Today": TODAY}
    )
    html = page.get_data(as_text=True)
    assert page.status_code == 200, html
    assert "vitd=50" in html and "not the patient's record" in html, html[:3000]
    bad = client.get("/smart/", query_string={"egfr": "many"}, headers={"X-D3K2-Today": TODAY})
    assert bad.status_code == 400 and "A what-if value was not understood" in bad.get_data(as_text=True)


def test_standalone_launch_uses_the_configured_server(ehr: smart_ehr.Ehr, tmp_path: Any) -> None:
    settings = Settings(
        env="test",
        cards_dir=CARDS,
        data_dir=tmp_path,
        auth="off",
        smart_app_url=APP_URL,
        smart_client_id=smart_ehr.CLIENT_ID,
        smart_iss=ehr.fhir_base,
        fhir_budget=10.0,
        fhir_timeout=5.0,
    )
    application = create_app(settings, ruleset())
    client = application.test_client()
    started = client.get("/smart/launch")
    assert started.status_code == 302
    assert "launch/patient" in parse_qs(urlsplit(started.headers["Location"]).query)["scope"][0].split()
    client.get(authorize(started.headers["Location"]))
    page = client.get("/smart/", headers={"X-D3K2-Today": TODAY})
    assert page.status_code == 200 and "focused-rule" not in page.get_data(as_text=True)
    application.extensions["d3k2"].fetcher.close()


def test_iss_off_the_allow_list_is_never_fetched(app: Any) -> None:
    answer = app.test_client().get(
        "/smart/launch", query_string={"iss": "https://fhir.elsewhere.example/r4", "launch": "x"}
    )
    assert answer.status_code == 403
    assert "This FHIR server is not allowed" in answer.get_data(as_text=True)


def test_launch_without_iss(app: Any) -> None:
    answer = app.test_client().get("/smart/launch")
    assert answer.status_code == 400 and "No FHIR server named" in answer.get_data(as_text=True)


def test_bad_state_is_refused_before_any_exchange(app: Any, ehr: smart_ehr.Ehr) -> None:
    client = app.test_client()
    callback = authorize(launch(client, ehr).headers["Location"])
    codes = len(ehr.codes)
    forged = callback.replace("state=", "state=forged")
    answer = client.get(forged)
    assert answer.status_code == 400
    assert "does not match this launch" in answer.get_data(as_text=True)
    assert len(ehr.codes) == codes  # the code was not exchanged


def test_callback_without_a_launch(app: Any) -> None:
    answer = app.test_client().get("/smart/callback?code=abc&state=def")
    assert answer.status_code == 400 and "expired or was never started" in answer.get_data(as_text=True)


def test_expired_code_is_a_clear_page(app: Any, ehr: smart_ehr.Ehr) -> None:
    client = app.test_client()
    callback = authorize(launch(client, ehr).headers["Location"])
    ehr.code_ttl = -1.0
    answer = client.get(callback)
    html = answer.get_data(as_text=True)
    assert answer.status_code == 400
    assert "refused the code" in html and "invalid_grant" in html
    assert client.get("/smart/").status_code == 401


def test_missing_scope_is_a_clear_page(app: Any, ehr: smart_ehr.Ehr) -> None:
    ehr.withhold.add("patient/Condition")
    client = app.test_client()
    answer = client.get(authorize(launch(client, ehr).headers["Location"]))
    html = answer.get_data(as_text=True)
    assert answer.status_code == 403
    assert "Not enough access was granted" in html and "Condition" in html


def test_refused_authorization(app: Any, ehr: smart_ehr.Ehr) -> None:
    client = app.test_client()
    launch(client, ehr)
    answer = client.get("/smart/callback?error=access_denied&state=x")
    assert answer.status_code == 403 and "access_denied" in answer.get_data(as_text=True)


def test_no_session(app: Any) -> None:
    answer = app.test_client().get("/smart/")
    assert answer.status_code == 401 and "launch it from a card" in answer.get_data(as_text=True)


def test_token_and_patient_never_logged(
    app: Any, ehr: smart_ehr.Ehr, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    client.get(authorize(launch(client, ehr).headers["Location"]))
    assert client.get("/smart/", headers={"X-D3K2-Today": TODAY}).status_code == 200
    tokens = list(ehr.tokens)
    assert tokens
    # d3k2's records and its libraries' (the test EHR, werkzeug and authlib, logs what it likes).
    ours = [r for r in caplog.records if not r.name.startswith(("werkzeug", "smart-ehr", "authlib"))]
    assert ours
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
    for token in tokens:
        assert token not in logged
    assert PATIENT not in logged


def test_cards_link_to_the_app_only_when_configured(app: Any, tmp_path: Any) -> None:
    from builders import FIXTURES

    body = (FIXTURES / "patient-view" / "deficient" / "request.json").read_bytes()
    headers = {"Content-Type": "application/json", "X-D3K2-Today": TODAY}
    on = app.test_client().post("/cds-services/d3k2-patient-view", data=body, headers=headers).get_json()
    smart = [link for card in on["cards"] for link in card["links"] if link["type"] == "smart"]
    assert smart and all(link["url"] == f"{APP_URL}/launch" for link in smart)
    assert '{"rule":"vitd-deficient","patient":"pt-deficient"}' in {link["appContext"] for link in smart}
    off_settings = Settings(
        env="test", cards_dir=CARDS, data_dir=tmp_path / "off", auth="off", smart_app_url=APP_URL, smart=False
    )
    off = create_app(off_settings, ruleset())
    answer = off.test_client().post("/cds-services/d3k2-patient-view", data=body, headers=headers).get_json()
    assert all(link["type"] == "absolute" for card in answer["cards"] for link in card["links"])
    assert off.test_client().get("/smart/launch").status_code == 404
    off.extensions["d3k2"].fetcher.close()
