"""HTTP edge: every status the service answers, the four prefetch states, and the FHIR fallback
against a real local FHIR server (sekmet-fhir), with a bearer token and paging."""

from __future__ import annotations

import copy
import io
import json
import logging
from dataclasses import replace
from typing import Any

import pytest
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

import d3k2.http.api
from builders import CARDS, TODAY, ruleset, sandbox_request, topics
from d3k2.config import Settings
from d3k2.core.errors import BadRequest, PrefetchUnavailable, Unauthorized
from d3k2.http.app import create_app, error_answer
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
    return sandbox_request(name)


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
    assert {"kidney-advanced", "granulomatous"} <= set(topics(body))
    # Kidney disease and sarcoidosis keep K2 off whatever else is found: no warfarin/K2 card (CLINICAL.md 6a).
    assert "vka-k2" not in topics(body)
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


def test_a_single_feedback_item_without_its_list_is_accepted(client) -> None:
    item = {"card": "c1", "outcome": "accepted"}
    response = post(client, "/cds-services/d3k2-patient-view/feedback", item)
    assert response.status_code == 200
    assert response.get_json()["received"] == 1


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
    # The server's Patient has no birthDate: the value is shown without a dose (CLINICAL.md 3a).
    assert set(topics(response.get_json())) == {"vka-k2", "vitd-low-age-unknown"}


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
    assert set(topics({"cards": cards})) == {"vka-k2", "vitd-low-age-unknown"}  # no birthDate on the server
    deficient = next(c for c in cards if c["source"]["topic"]["code"] == "vitd-low-age-unknown")
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
    # Without the sandbox patient's kidney disease and sarcoidosis K2 would be suggested (25(OH)D 18 ng/mL),
    # so the warfarin/K2 card shows when the referenced Medication is read as warfarin.
    empty = {"resourceType": "Bundle", "type": "searchset"}
    body["prefetch"]["egfr"] = body["prefetch"]["conditions"] = empty
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


# ---------------------------------------------------------------- how the body is read


class Unreadable(io.BytesIO):
    """A request body whose connection is lost: every read fails, as gunicorn's NoMoreData does."""

    def read(self, size: int | None = -1) -> bytes:
        raise ConnectionResetError("connection lost")

    readline = read  # type: ignore[assignment]


def _call() -> bytes:
    return json.dumps(sandbox_request("patient-view.request.json")).encode()


def _chunked(body: bytes) -> dict[str, Any]:
    return {
        "input_stream": io.BytesIO(body),
        "headers": {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        "environ_overrides": {"wsgi.input_terminated": True},
    }


def _declared(stream: io.BytesIO, length: str, **environ: Any) -> dict[str, Any]:
    return {
        "input_stream": stream,
        "headers": {"Content-Type": "application/json"},
        "environ_overrides": {"CONTENT_LENGTH": length, **environ},
    }


# What a client may send, and the status and error it gets: never a 500.
BODIES: dict[str, tuple[Any, int, str | None]] = {
    "chunked": (lambda: _chunked(_call()), 200, None),
    "chunked, over the limit": (lambda: _chunked(b" " * 70_000 + _call()), 413, "payload-too-large"),
    "declared, over the limit": (
        lambda: {"data": b" " * 70_000 + _call(), "content_type": "application/json"},
        413,
        "payload-too-large",
    ),
    "shorter than its Content-Length": (
        lambda: _declared(io.BytesIO(_call()[:100]), str(len(_call()))),
        400,
        "bad-request",
    ),
    "connection lost while it is read": (lambda: _declared(Unreadable(), "5000"), 400, "bad-request"),
    "a Content-Length that is not a number": (
        lambda: _declared(io.BytesIO(_call()), "12abc", **{"wsgi.input_terminated": True}),
        200,
        None,
    ),
    "a zero Content-Length": (lambda: _declared(io.BytesIO(_call()), "0"), 400, "bad-request"),
    "a Content-Type with parameters, in mixed case": (
        lambda: {"data": _call(), "headers": {"Content-Type": " Application/FHIR+JSON ; charset=utf-8"}},
        200,
        None,
    ),
    "a Content-Type that only starts like JSON": (
        lambda: {"data": _call(), "headers": {"Content-Type": "application/jsonx"}},
        415,
        "unsupported-media-type",
    ),
    "nested too deep": (
        lambda: {"data": b'{"x":' + b"[" * 200 + b"]" * 200 + b"}", "content_type": "application/json"},
        400,
        "bad-request",
    ),
}


@pytest.mark.parametrize("case", list(BODIES), ids=str)
def test_bodies_as_clients_send_them(tmp_path, case: str) -> None:
    make, status, code = BODIES[case]
    app = create_app(settings(tmp_path, max_body_bytes=64_000), ruleset())
    with app.test_client() as c:
        kwargs = make()
        kwargs["headers"] = {**HEADERS, **kwargs.get("headers", {})}
        response = c.post("/cds-services/d3k2-patient-view", **kwargs)
        unknown = c.post("/cds-services/no-such-service", **{**make(), "headers": kwargs["headers"]})
    assert response.status_code == status
    body = response.get_json()
    if code is None:
        assert "granulomatous" in topics(body)
    else:
        assert body["error"] == code and body["detail"]
    if status == 413:
        assert body["detail"] == "the body is larger than 64000 bytes"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    # The service is looked up before the body is read.
    assert unknown.status_code == 404 and unknown.get_json()["error"] == "unknown-service"


def test_a_service_id_that_is_not_ascii_is_an_unknown_service(client) -> None:
    response = client.post(
        "/cds-services/d3k2-\u00e9t\u00e9", data=_call(), content_type="application/json", headers=HEADERS
    )
    assert response.status_code == 404
    assert response.get_json() == {
        "error": "unknown-service",
        "detail": "no CDS service with id 'd3k2-\u00e9t\u00e9'",
        "service": "d3k2-\u00e9t\u00e9",
    }


def test_a_bug_is_a_logged_500_that_says_nothing_of_the_request(client, monkeypatch, caplog) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(d3k2.http.api, "call_service", broken)
    with caplog.at_level(logging.INFO):
        response = client.post(
            "/cds-services/d3k2-patient-view", data=_call(), content_type="application/json", headers=HEADERS
        )
    assert response.status_code == 500
    assert response.get_json() == {
        "error": "internal-error",
        "detail": "an internal error occurred; it has been logged",
    }
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    bugs = [r for r in caplog.records if r.getMessage().startswith("unhandled error (a bug)")]
    assert len(bugs) == 1
    # The class and the frames it was raised through; never its message (which may quote the request).
    message = bugs[0].getMessage()
    assert message.startswith(
        "unhandled error (a bug) on POST /cds-services/<service_id>: builtins.RuntimeError at "
    )
    assert "broken" in message and "post_service" in message
    assert "a bug" not in message.removeprefix("unhandled error (a bug)")
    assert bugs[0].exc_info is None
    lines = [r for r in caplog.records if r.name == "d3k2.http"]
    assert [getattr(r, "status", None) for r in lines] == [500]


def test_each_call_is_counted_and_timed_once(client) -> None:
    for _ in range(3):
        post(client, "/cds-services/d3k2-patient-view", sandbox("patient-view.request.json"))
    post(client, "/cds-services/no-such-service", sandbox("patient-view.request.json"))
    registry = client.application.extensions["d3k2.http.metrics"].registry
    service = {"service": "d3k2-patient-view", "endpoint": "service"}
    count = registry.get_sample_value("d3k2_requests_total", {**service, "status": "200"})
    timed = registry.get_sample_value("d3k2_request_seconds_count", service)
    unknown = registry.get_sample_value(
        "d3k2_requests_total", {"service": "unknown", "endpoint": "service", "status": "404"}
    )
    assert (count, timed, unknown) == (3.0, 3.0, 1.0)


@pytest.mark.parametrize(
    ("exc", "status", "headers"),
    [
        (BadRequest("x"), 400, {}),
        (PrefetchUnavailable("x", keys=["vitd"]), 412, {}),
        (Unauthorized("bad token"), 401, {"WWW-Authenticate": 'Bearer realm="d3k2", error="invalid_token"'}),
        (RequestEntityTooLarge(), 413, {}),
        (ClientDisconnected(), 400, {}),
        (KeyError("x"), 500, {}),
    ],
)
def test_error_answers(exc: Exception, status: int, headers: dict[str, str]) -> None:
    got_status, body, got_headers = error_answer(exc, 100)
    assert got_status == status and set(body) >= {"error", "detail"}
    assert list(got_headers) == list(headers)
    for name, value in headers.items():
        assert got_headers[name].startswith(value)
