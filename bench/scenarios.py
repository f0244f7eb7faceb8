"""Request bodies for the benchmark scenarios, built deterministically (no randomness, fixed dates).

- typical: patient-view with a realistic prefetch (14 Observations, 2 medications, 2 conditions, ≈ 13 KB)
- history: patient-view whose prefetch holds a 10,000-Observation lab history (≈ 6 MB)
- fallback: patient-view without prefetch; d3k2 fetches every key from a local FHIR server
- order-sign: the recorded sandbox order-sign request (D3+K2 draft) with every prefetch key given
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
EHR = "http://ehr.example/fhir"
PATIENT = "bench-pt-1"
WARFARIN = "warfarin sodium 5 MG Oral Tablet"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
TODAY = date(2026, 11, 24)
TYPICAL = {"vitd": 6, "egfr": 4, "calcium": 4}  # Observations per lab key

# (prefetch key, LOINC code, display, value at step i, unit): the labs the rules read.
LABS: dict[str, tuple[str, str, Any, str]] = {
    "vitd": ("62292-8", "25-hydroxyvitamin D", lambda i: 14 + (i * 7) % 40, "ng/mL"),
    "egfr": ("98979-8", "eGFR (CKD-EPI 2021)", lambda i: 35 + (i * 11) % 60, "mL/min/{1.73_m2}"),
    "calcium": ("17861-6", "Calcium [Mass/volume] in Serum or Plasma", lambda i: 8.6 + (i % 9) / 10, "mg/dL"),
}


def observation(key: str, index: int, patient: str = PATIENT) -> dict[str, Any]:
    code, display, value, unit = LABS[key]
    when = TODAY - timedelta(days=3 + index * 2)
    return {
        "resourceType": "Observation",
        "id": f"{patient}-{key}-{index}",
        "meta": {"lastUpdated": f"{when.isoformat()}T09:30:00Z"},
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": f"{when.isoformat()}T08:15:00Z",
        "issued": f"{when.isoformat()}T09:30:00Z",
        "valueQuantity": {"value": value(index), "unit": unit, "system": UCUM, "code": unit},
    }


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"{EHR}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ],
    }


def patient(patient_id: str = PATIENT) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "name": [{"family": "Bench", "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "1958-04-12",
    }


def medications(patient_id: str = PATIENT) -> list[dict[str, Any]]:
    return [
        {
            "resourceType": "MedicationStatement",
            "id": f"{patient_id}-warfarin",
            "status": "active",
            "medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": "855332", "display": WARFARIN}],
                "text": WARFARIN,
            },
            "subject": {"reference": f"Patient/{patient_id}"},
        },
        {
            "resourceType": "MedicationStatement",
            "id": f"{patient_id}-metformin",
            "status": "active",
            "medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": "861007", "display": "metformin 500 MG Oral Tablet"}],
                "text": "metformin 500 MG Oral Tablet",
            },
            "subject": {"reference": f"Patient/{patient_id}"},
        },
    ]


def conditions(patient_id: str = PATIENT) -> list[dict[str, Any]]:
    def condition(suffix: str, code: str, display: str) -> dict[str, Any]:
        return {
            "resourceType": "Condition",
            "id": f"{patient_id}-{suffix}",
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
            "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "confirmed"}]},
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
            "subject": {"reference": f"Patient/{patient_id}"},
            "onsetDateTime": "2019-03-01",
        }

    return [
        condition("htn", "38341003", "Hypertensive disorder"),
        condition("af", "49436004", "Atrial fibrillation"),
    ]


def prefetch(counts: dict[str, int], patient_id: str = PATIENT) -> dict[str, Any]:
    return {
        "patient": patient(patient_id),
        **{key: _bundle([observation(key, i, patient_id) for i in range(counts[key])]) for key in LABS},
        "pregnancy": _bundle([]),
        "medstatements": _bundle(medications(patient_id)),
        "medrequests": _bundle([]),
        "conditions": _bundle(conditions(patient_id)),
    }


def patient_view(pre: dict[str, Any] | None, fhir_server: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hookInstance": "0b5e3c4e-6f2a-4d7e-9d41-3c3f0d2b9e10",
        "hook": "patient-view",
        "context": {"userId": "Practitioner/example", "patientId": PATIENT},
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
    if pre is not None:
        body["prefetch"] = pre
    return body


def typical() -> dict[str, Any]:
    return patient_view(prefetch(TYPICAL))


def history() -> dict[str, Any]:
    return patient_view(prefetch({"vitd": 4000, "egfr": 3000, "calcium": 3000}))


def fallback(fhir_server: str) -> dict[str, Any]:
    return patient_view(None, fhir_server)


def order_sign() -> dict[str, Any]:
    """The recorded sandbox order-sign, its fhirServer removed and every key prefetched, so nothing is
    fetched: the cost measured is reading the drafts and the prefetch, evaluating and building cards."""
    recorded = REPO / "fixtures" / "order-sign" / "sandbox-order-sign" / "request.json"
    body = json.loads(recorded.read_text(encoding="utf-8"))
    body.pop("fhirServer", None)
    pid = body["context"]["patientId"]
    given = prefetch(TYPICAL, pid)
    body["prefetch"] = {**given, **body.get("prefetch", {})}
    return body


def load_bundle() -> dict[str, Any]:
    """A transaction Bundle putting the typical patient's data on the FHIR server (PUT: reloadable)."""
    resources = [
        patient(),
        *(observation(key, i) for key, count in TYPICAL.items() for i in range(count)),
        *medications(),
        *conditions(),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


def write_all(directory: Path, fhir_server: str | None) -> dict[str, Path]:
    """Write each scenario's body once (compact JSON, as EHRs send it); return the file of each."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies = {"typical": typical(), "history": history(), "order-sign": order_sign()}
    if fhir_server:
        bodies["fallback"] = fallback(fhir_server)
    paths = {}
    for name, body in bodies.items():
        path = directory / f"{name}.json"
        path.write_bytes(json.dumps(body, separators=(",", ":")).encode())
        paths[name] = path
    return paths
