"""Logs of full requests carry a request id but never a JWT, an access token, patient data or resource ids.

A patient-view call with a verified JWT, a fhirAuthorization token, prefetched data and keys fetched from a
loopback FHIR server (a Medication read by its id among them); then feedback, a replayed token, a forged
one and a bad body. Every log record, at DEBUG, is checked as pytest captures it (message, args, extra
fields) and as the JSON formatter writes it.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from d3k2.config import Settings
from d3k2.core.loader import load_ruleset
from d3k2.http.app import create_app
from d3k2.http.logs import JsonFormatter
from jwt_keys import BASE_URL, NOW, SigningKey, es384, write_trust

PATIENT_ID = "zqx-4471-pt"
FAMILY, GIVEN = "Quillfeather", "Xanthippe"
BIRTH_DATE = "1951-03-07"
VITD_VALUE, EGFR_VALUE = 13.579, 24.681
ACCESS_TOKEN = "at-7f3e9c1d-fhir-access-token"
MEDICATION_ID = "zqx-med-9931"
SERVICE = "/cds-services/d3k2-patient-view"


class FhirStub(ThreadingHTTPServer):
    """Answers every search with an empty searchset Bundle and records the Authorization headers."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"


class _Handler(BaseHTTPRequestHandler):
    server: FhirStub
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.authorizations.append(self.headers.get("Authorization"))
        self.server.paths.append(self.path)
        body = b'{"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}'
        if "/Medication/" in self.path:  # the read of a medication a statement points at
            medication = {"resourceType": "Medication", "id": self.path.rsplit("/", 1)[1]}
            body = json.dumps({**medication, "code": {"text": "cholecalciferol 1000 IU"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def fhir_stub() -> Iterator[FhirStub]:
    server = FhirStub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": resource} for resource in resources],
    }


def _observation(oid: str, loinc: str, value: float, unit: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}", "display": f"{GIVEN} {FAMILY}"},
        "effectiveDateTime": "2026-11-01",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def patient_view(fhir_server: str) -> dict[str, Any]:
    """Patient, 25(OH)D and eGFR prefetched; the other keys are fetched from ``fhir_server``."""
    patient = {
        "resourceType": "Patient",
        "id": PATIENT_ID,
        "name": [{"family": FAMILY, "given": [GIVEN]}],
        "gender": "female",
        "birthDate": BIRTH_DATE,
    }
    return {
        "hook": "patient-view",
        "hookInstance": "5b1f0c52-0d7e-4b53-9b1e-logs-no-phi",
        "fhirServer": fhir_server,
        "fhirAuthorization": {
            "access_token": ACCESS_TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "d3k2",
        },
        "context": {"patientId": PATIENT_ID, "userId": "Practitioner/logs-u1"},
        "prefetch": {
            "patient": patient,
            "vitd": _searchset(_observation("logs-vitd-1", "62292-8", VITD_VALUE, "ng/mL")),
            "egfr": _searchset(_observation("logs-egfr-1", "98979-8", EGFR_VALUE, "mL/min/{1.73_m2}")),
            # Points at a Medication nobody sent: it is read from the FHIR server, by its id.
            "medstatements": _searchset(
                {
                    "resourceType": "MedicationStatement",
                    "id": "logs-ms-1",
                    "status": "active",
                    "subject": {"reference": f"Patient/{PATIENT_ID}"},
                    "medicationReference": {"reference": f"Medication/{MEDICATION_ID}"},
                }
            ),
        },
    }


def _texts(record: logging.LogRecord) -> list[str]:
    """Everything a handler could write for the record: message, args and extra fields."""
    texts = [record.getMessage(), repr(record.args), repr(record.msg)]
    texts.extend(repr(value) for value in record.__dict__.values())
    if record.exc_info:
        texts.append(logging.Formatter().formatException(record.exc_info))
    return texts


def test_logs_of_full_requests_hold_no_tokens_and_no_patient_data(
    tmp_path: Path, fhir_stub: FhirStub, caplog: pytest.LogCaptureFixture
) -> None:
    trust = tmp_path / "trust.json"
    write_trust(trust)
    settings = Settings(
        env="test",
        auth="required",
        trust_file=trust,
        public_base_url=BASE_URL,
        data_dir=tmp_path,
        log_level="DEBUG",
    )
    app = create_app(settings, load_ruleset(settings.cards_dir))
    app.extensions["d3k2.http.auth"].clock = lambda: NOW
    client = app.test_client()
    jwt_hook = es384().sign(aud=BASE_URL + SERVICE)
    jwt_feedback = es384().sign(aud=f"{BASE_URL}{SERVICE}/feedback")
    forged = SigningKey(es384().kid, "ES384", es384("forger").private).sign(aud=BASE_URL + SERVICE)
    body = patient_view(fhir_stub.base_url)

    lines = io.StringIO()
    json_handler = logging.StreamHandler(lines)
    json_handler.setFormatter(JsonFormatter())
    json_handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(json_handler)
    try:
        with caplog.at_level(logging.DEBUG):
            headers = {"Authorization": f"Bearer {jwt_hook}", "X-D3K2-Today": "2026-11-24"}
            answer = client.post(SERVICE, json=body, headers=headers)
            feedback = {"feedback": [{"card": "c1", "outcome": "overridden"}]}
            thanks = client.post(
                f"{SERVICE}/feedback", json=feedback, headers={"Authorization": f"Bearer {jwt_feedback}"}
            )
            replayed = client.post(SERVICE, json=body, headers=headers)
            refused = client.post(SERVICE, json=body, headers={"Authorization": f"Bearer {forged}"})
            malformed = client.post(
                SERVICE,
                json={**body, "context": {"patientId": f"{PATIENT_ID}/{FAMILY}"}},
                headers={"Authorization": f"Bearer {es384().sign(aud=BASE_URL + SERVICE)}"},
            )
    finally:
        root.removeHandler(json_handler)
        json_handler.close()

    assert answer.status_code == 200, answer.json
    assert answer.json["cards"]
    assert thanks.status_code == 200, thanks.json
    assert (replayed.status_code, refused.status_code, malformed.status_code) == (401, 401, 400)
    # The fetch really happened, with the token, so its absence from the logs means something.
    assert fhir_stub.authorizations
    assert set(fhir_stub.authorizations) == {f"Bearer {ACCESS_TOKEN}"}
    assert any(path.endswith(f"/Medication/{MEDICATION_ID}") for path in fhir_stub.paths)
    assert len(caplog.records) >= 5

    forbidden = {
        "the hook JWT": jwt_hook,
        "the feedback JWT": jwt_feedback,
        "the forged JWT": forged,
        "a JWT signature": jwt_hook.rsplit(".", 1)[1],
        "the access token": ACCESS_TOKEN,
        "the patient id": PATIENT_ID,
        "the family name": FAMILY,
        "the given name": GIVEN,
        "the birth date": BIRTH_DATE,
        "the 25(OH)D value": str(VITD_VALUE),
        "the eGFR value": str(EGFR_VALUE),
        "a medication id": MEDICATION_ID,
    }
    written = lines.getvalue()
    assert written
    for record in caplog.records:
        for text in _texts(record):
            for what, secret in forbidden.items():
                assert secret not in text, f"{what} logged by {record.name}: {record.getMessage()!r}"
    for what, secret in forbidden.items():
        assert secret not in written, f"{what} in the JSON log output"

    request_lines = [json.loads(line) for line in written.splitlines() if '"event":"request"' in line]
    assert len(request_lines) == 5
    assert all(line.get("request_id") for line in request_lines)
    # The medication read is counted on the request line, by kind, not named.
    assert "medications:1 ok 0 failed" in str(request_lines[0].get("fetched"))
