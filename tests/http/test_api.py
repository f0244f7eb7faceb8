"""HTTP edge: every status the service answers, the four prefetch states, and the FHIR fallback
against a real local FHIR server (sekmet-fhir), with a bearer token and paging."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest

from builders import CARDS, SANDBOX, TODAY, ruleset, topics
from d3k2.config import Settings
from d3k2.http.app import create_app
from fhir_server import FhirServer

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
HEADERS = {"X-D3K2-Today": TODAY.isoformat()}


def settings(tmp_path, **changes: Any) -> Settings:
    base = Settings(env="test", cards_dir=CARDS, data_dir=tmp_path, fhir_budget=3.0)
    return replace(base, **changes)


@pytest.fixture
def client(tmp_path):
    app = create_app(settings(tmp_path), ruleset())
    with app.test_client() as c:
        yield c


def post(client, path: str, body: Any, **kwargs: Any):
    headers = {**HEADERS, **kwargs.pop("headers", {})}
    return client.post(
        path, data=json.dumps(body), content_type="application/json", headers=headers, **kwargs
    )


def sandbox(name: str) -> dict[str, Any]:
    return json.loads((SANDBOX / name).read_text())


# ---------------------------------------------------------------- discovery and errors


def test_discovery_lists_unique_services_with_sandbox_prefetch_keys(client) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = response.get_json()["services"]
    ids = [s["id"] for s in services]
    assert len(ids) == len(set(ids))
    assert {s["hook"] for s in services} == {
        "patient-view",
        "order-select",
        "order-sign",
        "medication-prescribe",
    }
    patient_view = next(s for s in services if s["id"] == "d3k2-patient-view")
    assert {"patient", "vitd", "egfr", "medstatements", "medrequests", "conditions"} <= set(
        patient_view["prefetch"]
    )
    vitd = patient_view["prefetch"]["vitd"]
    assert "http://loinc.org|62292-8" in vitd and "_sort=-date" in vitd and "_count=" in vitd
    assert "1649-3" not in vitd, "1,25-dihydroxyvitamin D is never 25(OH)D"


def test_sandbox_patient_view_answers_cards(client) -> None:
    response = post(client, "/cds-services/d3k2-patient-view", sandbox("patient-view.request.json"))
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"cards", "systemActions"}
    assert {"vka-k2", "kidney-advanced", "granulomatous"} <= set(topics(body))
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        ("{not json", "application/json", 400, "bad-request"),
        ("[1, 2]", "application/json", 400, "bad-request"),
        ("", "application/json", 400, "bad-request"),
        ('{"hook": "patient-view"}', "application/json", 400, "bad-request"),
        (
            '{"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "a/../b"}}',
            "application/json",
            400,
            "bad-request",
        ),
        (
            '{"hook": "order-sign", "hookInstance": "x", "context": {"patientId": "p"}}',
            "application/json",
            400,
            "bad-request",
        ),
        ("{}", "text/plain", 415, "unsupported-media-type"),
        ("{}", None, 415, "unsupported-media-type"),
    ],
)
def test_bad_requests_get_json_errors(client, body, content_type, status, code) -> None:
    response = client.post("/cds-services/d3k2-patient-view", data=body, content_type=content_type)
    assert response.status_code == status
    payload = response.get_json()
    assert payload["error"] == code and payload["detail"]


def test_unknown_service_is_404(client) -> None:
    response = post(client, "/cds-services/nope", sandbox("patient-view.request.json"))
    assert response.status_code == 404
    assert response.get_json()["error"] == "unknown-service"
    assert post(client, "/cds-services/nope/feedback", {"feedback": []}).status_code == 404


def test_unknown_path_and_wrong_method_are_json(client) -> None:
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.get_json()["error"]
    wrong = client.get("/cds-services/d3k2-patient-view")
    assert wrong.status_code == 405 and wrong.get_json()["error"]


def test_body_over_the_limit_is_413(tmp_path) -> None:
    app = create_app(settings(tmp_path, max_body_bytes=2_000), ruleset())
    with app.test_client() as c:
        response = post(c, "/cds-services/d3k2-patient-view", sandbox("patient-view.request.json"))
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload-too-large"


def test_required_prefetch_without_fhir_server_is_412_naming_keys(client) -> None:
    # 412 when nothing the rules read arrived: here only the Patient and keys sent as "no data".
    body = sandbox("patient-view.request.json")
    del body["fhirServer"]
    del body["prefetch"]["medstatements"]
    body["prefetch"]["conditions"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]}
    body["prefetch"]["vitd"] = body["prefetch"]["egfr"] = None
    response = post(client, "/cds-services/d3k2-patient-view", body)
    assert response.status_code == 412
    payload = response.get_json()
    assert payload["error"] == "prefetch-unavailable"
    assert payload["keys"] == ["medstatements", "conditions"]


def test_required_prefetch_missing_beside_data_answers_what_the_data_supports(client) -> None:
    body = sandbox("patient-view.request.json")
    del body["fhirServer"]
    del body["prefetch"]["medstatements"]
    body["prefetch"]["conditions"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]}
    response = post(client, "/cds-services/d3k2-patient-view", body)
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    # The sandbox patient's eGFR is below 30: that caution stays; no dosing while required data is missing.
    assert topics({"cards": cards}) == ["kidney-advanced", "data-incomplete"]
    assert "medication statements (not prefetched; no FHIR server to ask)" in cards[1]["detail"]
    assert "conditions (the EHR sent an OperationOutcome; no FHIR server to ask)" in cards[1]["detail"]


def test_cors_preflight_allows_the_sandbox_headers(client) -> None:
    response = client.options(
        "/cds-services/d3k2-order-select",
        headers={
            "Origin": "http://127.0.0.1:8000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code in (200, 204)
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_malformed_draft_entries_never_5xx(client) -> None:
    body = sandbox("order-sign.request.json")
    entries = body["context"]["draftOrders"]["entry"]
    entries.extend(
        [None, 5, "x", {"resource": []}, {"resource": {"resourceType": "MedicationRequest", "id": 7}}]
    )
    body["context"]["draftOrders"]["entry"] = entries
    response = post(client, "/cds-services/d3k2-order-sign", body)
    assert response.status_code == 200
    assert "order-k2-vka" in topics(response.get_json())


# ---------------------------------------------------------------- feedback


@pytest.mark.parametrize(
    "name",
    [
        "feedback-accepted.request.json",
        "feedback-accepted.patient-view.request.json",
        "feedback-accepted.order-sign.request.json",
        "feedback-overridden.request.json",
        "feedback-overridden.no-reason.request.json",
    ],
)
def test_recorded_sandbox_feedback_is_accepted(client, name) -> None:
    response = post(client, "/cds-services/d3k2-order-select/feedback", sandbox(name))
    assert response.status_code == 200
    assert response.get_json()["received"] == 1


@pytest.mark.parametrize(
    "item",
    [
        {"card": "c1", "outcome": "overridden", "overrideReason": {"code": "x", "system": "s"}},
        {"card": "c1", "outcome": "overridden", "overrideReasons": [{"code": "x", "system": "s"}]},
        {"card": "c1", "outcome": "accepted", "acceptedSuggestions": ["s1"]},
        {
            "card": "c1",
            "outcome": "overridden",
            "overrideReason": {"reason": {"code": "x", "system": "s"}, "userComment": "seen"},
            "outcomeTimestamp": "2026-11-24T19:00:00Z",
        },
    ],
)
def test_older_and_full_feedback_shapes_are_accepted(client, item) -> None:
    assert post(client, "/cds-services/d3k2-patient-view/feedback", {"feedback": [item]}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"feedback": []},
        {"feedback": [{"card": "c1", "outcome": "maybe"}]},
        {"feedback": [{"outcome": "accepted"}]},
        [],
    ],
)
def test_invalid_feedback_is_400(client, body) -> None:
    response = post(client, "/cds-services/d3k2-patient-view/feedback", body)
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad-request"


# ---------------------------------------------------------------- prefetch states and FHIR fallback


def _transaction(patient_id: str, n_vitd: int = 1) -> dict[str, Any]:
    resources: list[dict[str, Any]] = [{"resourceType": "Patient", "id": patient_id, "gender": "female"}]
    for i in range(n_vitd):
        day = 1 + i
        resources.append(
            {
                "resourceType": "Observation",
                "id": f"{patient_id}-vitd-{i}",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "62292-8"}]},
                "subject": {"reference": f"Patient/{patient_id}"},
                "effectiveDateTime": f"2026-{1 + i // 28:02d}-{1 + (day - 1) % 28:02d}",
                "valueQuantity": {
                    "value": 18,
                    "unit": "ng/mL",
                    "system": "http://unitsofmeasure.org",
                    "code": "ng/mL",
                },
            }
        )
    resources.append(
        {
            "resourceType": "MedicationStatement",
            "id": f"{patient_id}-warf",
            "status": "active",
            "medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": "855332"}],
                "text": "warfarin 5 mg",
            },
            "subject": {"reference": f"Patient/{patient_id}"},
        }
    )
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }


def _request(server: FhirServer, patient_id: str, prefetch: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": f"hi-{patient_id}",
        "fhirServer": server.base_url,
        "context": {"patientId": patient_id, "userId": "Practitioner/1"},
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    if server.token:
        body["fhirAuthorization"] = {
            "access_token": server.token,
            "token_type": "Bearer",
            "scope": "patient/*.read",
        }
    return body


def test_absent_keys_are_fetched_from_the_fhir_server(client, fhir_server: FhirServer) -> None:
    fhir_server.load(_transaction("api-absent"))
    response = post(client, "/cds-services/d3k2-patient-view", _request(fhir_server, "api-absent"))
    assert response.status_code == 200
    assert set(topics(response.get_json())) == {"vka-k2", "vitd-deficient"}


def test_null_key_means_no_data_and_is_not_refetched(client, fhir_server: FhirServer) -> None:
    fhir_server.load(_transaction("api-null"))
    response = post(
        client, "/cds-services/d3k2-patient-view", _request(fhir_server, "api-null", {"medstatements": None})
    )
    assert response.status_code == 200
    assert "vka-k2" not in topics(response.get_json()), "a null key is 'no data': warfarin was not refetched"


@pytest.mark.parametrize(
    "failed",
    [
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]},
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "fatal", "code": "exception"}],
                    },
                    "search": {"mode": "outcome"},
                }
            ],
        },
    ],
)
def test_operation_outcome_key_is_fetched_again(client, fhir_server: FhirServer, failed) -> None:
    fhir_server.load(_transaction("api-oo"))
    body = _request(fhir_server, "api-oo", {"medstatements": copy.deepcopy(failed)})
    response = post(client, "/cds-services/d3k2-patient-view", body)
    assert "vka-k2" in topics(response.get_json())


def test_bearer_token_is_sent_and_paging_is_followed(client, fhir_server_auth: FhirServer) -> None:
    fhir_server_auth.load(_transaction("api-auth", n_vitd=12))
    response = post(client, "/cds-services/d3k2-patient-view", _request(fhir_server_auth, "api-auth"))
    cards = response.get_json()["cards"]
    assert set(topics({"cards": cards})) == {"vka-k2", "vitd-deficient"}
    deficient = next(c for c in cards if c["source"]["topic"]["code"] == "vitd-deficient")
    assert "2026-01-12" in deficient["summary"], "the newest of 12 results (second page) was read"


def test_wrong_token_names_the_missing_data_and_suggests_no_dosing(
    client, fhir_server_auth: FhirServer
) -> None:
    body = _request(fhir_server_auth, "api-auth-wrong")
    body["fhirAuthorization"]["access_token"] = "wrong-token"
    response = post(client, "/cds-services/d3k2-patient-view", body)
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    assert topics({"cards": cards}) == ["data-incomplete"]
    assert "HTTP 401" in cards[0]["detail"]


def test_dead_fhir_server_answers_within_budget(tmp_path) -> None:
    app = create_app(settings(tmp_path, fhir_budget=1.0), ruleset())
    with app.test_client() as c:
        response = post(c, "/cds-services/d3k2-order-sign", sandbox("order-sign.request.json"))
    assert response.status_code == 200
    assert {"order-k2-vka", "data-incomplete"} <= set(topics(response.get_json()))


def test_fhir_server_off_the_allow_list_is_refused(tmp_path) -> None:
    app = create_app(settings(tmp_path, fhir_allowed=("https://ehr.example.org:443",)), ruleset())
    body = sandbox("patient-view.request.json")
    with app.test_client() as c:
        response = post(c, "/cds-services/d3k2-patient-view", body)
    assert response.status_code == 403
    assert response.get_json()["error"] == "fhir-server-not-allowed"


def test_medication_reference_is_read_from_the_fhir_server(client, fhir_server: FhirServer) -> None:
    fhir_server.load(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Medication",
                        "id": "api-medref-warfarin",
                        "code": {"coding": [{"system": RXNORM, "code": "855332"}], "text": "warfarin 5 mg"},
                    },
                    "request": {"method": "PUT", "url": "Medication/api-medref-warfarin"},
                }
            ],
        }
    )
    body = sandbox("patient-view.request.json")
    body["fhirServer"] = fhir_server.base_url
    body["prefetch"]["medstatements"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "resource": {
                    "resourceType": "MedicationStatement",
                    "id": "api-medref-ms",
                    "status": "active",
                    "medicationReference": {"reference": "Medication/api-medref-warfarin"},
                    "subject": {"reference": "Patient/d3k2-pt-1"},
                }
            }
        ],
    }
    response = post(client, "/cds-services/d3k2-patient-view", body)
    assert "vka-k2" in topics(response.get_json())


# ---------------------------------------------------------------- the cyclic collector


@pytest.mark.parametrize("body", ["ok", "malformed", "wrong-hook"])
def test_collector_is_paused_while_answering_and_back_on_after(client, monkeypatch, body: str) -> None:
    import gc

    import d3k2.http.api

    seen: list[bool] = []
    real = d3k2.http.api.call_service

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(d3k2.http.api, "call_service", spy)
    request = sandbox("patient-view.request.json")
    if body == "wrong-hook":
        request["hook"] = "order-sign"
    data = b"{not json" if body == "malformed" else json.dumps(request).encode()
    assert gc.isenabled()
    response = client.post(
        "/cds-services/d3k2-patient-view", data=data, content_type="application/json", headers=HEADERS
    )
    assert response.status_code == {"ok": 200, "malformed": 400, "wrong-hook": 400}[body]
    assert seen == ([] if body == "malformed" else [False])
    assert gc.isenabled()


def test_collector_left_off_by_someone_else_stays_off(client) -> None:
    import gc

    gc.disable()
    try:
        response = post(client, "/cds-services/d3k2-patient-view", sandbox("patient-view.request.json"))
        assert response.status_code == 200
        assert not gc.isenabled()
    finally:
        gc.enable()
