"""The card preview page without a browser (Flask test client): where it is on, the fixture listing, the
explain endpoint with what-ifs, escaping, headers, and that what is sent is never logged."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from builders import CARDS, FIXTURES, TODAY, off_the_network, ruleset
from d3k2.config import ConfigError, Settings, from_env
from d3k2.http.app import create_app
from d3k2.http.logs import JsonFormatter
from d3k2.http.preview import CONTENT_SECURITY_POLICY
from jwt_keys import write_trust

SANDBOX_CASE = "patient-view/sandbox-patient-view"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def make_client(tmp_path: Path, **changes: Any):
    settings = Settings(
        env="dev", cards_dir=CARDS, data_dir=tmp_path, auth="off", fhir_budget=2.0, trust_host_header=True
    )
    return create_app(settings.with_overrides(**changes), ruleset()).test_client()


@pytest.fixture
def client(tmp_path: Path):
    return make_client(tmp_path)


def recorded_request(case: str = SANDBOX_CASE) -> dict[str, Any]:
    request: dict[str, Any] = json.loads((FIXTURES / case / "request.json").read_text(encoding="utf-8"))
    return request


def fixture_request(case: str = SANDBOX_CASE) -> dict[str, Any]:
    return off_the_network(recorded_request(case))


def explain(client, **body: Any):
    body.setdefault("today", TODAY.isoformat())
    return client.post("/preview/explain", data=json.dumps(body), content_type="application/json")


def topics(report: dict[str, Any]) -> list[str]:
    return [card["topic"] for card in report["cards"]]


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    patient = {"resourceType": "Patient", "id": "pv-1", "gender": "female", "birthDate": "1980-05-05"}
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (patient, *resources)],
    }


def vitd(value: float, resource_id: str = "pv-vitd") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": resource_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "62292-8"}], "text": HOSTILE},
        "subject": {"reference": "Patient/pv-1"},
        "effectiveDateTime": "2026-11-01",
        "valueQuantity": {
            "value": value,
            "unit": "ng/mL",
            "system": "http://unitsofmeasure.org",
            "code": "ng/mL",
        },
    }


# ---------------------------------------------------------------- on, off and configuration


def test_page_is_served_in_dev_with_csp_and_no_store(client) -> None:
    response = client.get("/preview")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert csp.startswith("default-src 'self'; script-src 'self'; style-src 'self'")
    assert "unsafe-inline" not in csp
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    html = response.get_data(as_text=True)
    assert f'<option value="{SANDBOX_CASE}"' in html
    # No inline script or style: the CSP would refuse them.
    assert "<script>" not in html
    assert "<style" not in html
    assert " style=" not in html
    assert ' src="/preview/static/preview.js"' in html
    for asset in ("preview.js", "preview.css", "favicon.svg"):
        static = client.get(f"/preview/static/{asset}")
        assert static.status_code == 200
        assert static.headers["Cache-Control"] == "no-store"
        static.close()


def test_preview_answers_only_its_own_origin(client) -> None:
    response = client.get("/preview", base_url="http://127.0.0.1:8080")
    assert response.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8080"
    assert client.get("/cds-services").headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize(
    ("env", "preview"),
    [("production", None), ("test", None), ("dev", False), ("production", False)],
)
def test_page_is_absent_when_off(tmp_path: Path, env: str, preview: bool | None) -> None:
    client = make_client(tmp_path, env=env, preview=preview)
    for path in ("/preview", "/preview/fixtures", "/preview/static/preview.js", "/static/preview.js"):
        assert client.get(path).status_code == 404, path
    assert explain(client, request=fixture_request()).status_code == 404


def test_preview_can_be_turned_on_outside_dev(tmp_path: Path) -> None:
    client = make_client(tmp_path, env="test", preview=True)
    assert client.get("/preview").status_code == 200


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, True),
        ({"D3K2_ENV": "dev"}, True),
        ({"D3K2_ENV": "test"}, False),
        ({"D3K2_ENV": "production", "D3K2_TRUST_HOST_HEADER": "1"}, False),
        ({"D3K2_ENV": "production", "D3K2_TRUST_HOST_HEADER": "1", "D3K2_PREVIEW": "on"}, True),
        ({"D3K2_ENV": "dev", "D3K2_PREVIEW": "off"}, False),
        ({"D3K2_PREVIEW": ""}, True),
    ],
)
def test_d3k2_preview_setting(env: dict[str, str], expected: bool) -> None:
    assert from_env(env).preview_enabled is expected


def test_d3k2_preview_rejects_other_values() -> None:
    with pytest.raises(ConfigError, match="D3K2_PREVIEW must be on or off"):
        from_env({"D3K2_PREVIEW": "yes"})


def test_preview_needs_no_jwt_when_hooks_do(tmp_path: Path) -> None:
    trust = tmp_path / "trust.json"
    write_trust(trust)
    client = make_client(tmp_path, auth="required", trust_file=trust, preview=True)
    assert client.post("/cds-services/d3k2-patient-view", json=fixture_request()).status_code == 401
    assert client.get("/preview").status_code == 200
    assert explain(client, request=fixture_request()).status_code == 200


# ---------------------------------------------------------------- fixtures


def test_fixture_listing_and_one_fixture(client) -> None:
    listing = client.get("/preview/fixtures")
    assert listing.status_code == 200
    assert listing.headers["Cache-Control"] == "no-store"
    found = {(f["hook"], f["case"]) for f in listing.get_json()["fixtures"]}
    on_disk = {(p.parent.parent.name, p.parent.name) for p in FIXTURES.glob("*/*/request.json")}
    assert found == on_disk

    one = client.get(f"/preview/fixtures/{SANDBOX_CASE}")
    assert one.status_code == 200
    data = one.get_json()
    expected = json.loads((FIXTURES / SANDBOX_CASE / "expected.json").read_text(encoding="utf-8"))
    assert data["request"] == recorded_request()
    assert (data["today"], data["profile"]) == (expected["today"], expected["profile"])
    assert data["hook"] == "patient-view"


@pytest.mark.parametrize(
    "path",
    [
        "/preview/fixtures/patient-view/no-such-case",
        "/preview/fixtures/no-such-hook/sandbox-patient-view",
        "/preview/fixtures/patient-view/..",
        "/preview/fixtures/../cards",
        "/preview/fixtures/patient-view/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/preview/fixtures/..%2f..%2fcards/profiles.toml",
        "/preview/fixtures/patient-view/sandbox-patient-view/request.json",
    ],
)
def test_fixture_paths_cannot_escape(client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "resourceType" not in response.get_data(as_text=True)


def copy_cards(tmp_path: Path) -> Path:
    cards = tmp_path / "repo" / "cards"
    shutil.copytree(CARDS, cards)
    return cards


def test_no_fixtures_directory_no_fixtures(tmp_path: Path) -> None:
    client = make_client(tmp_path, cards_dir=copy_cards(tmp_path))
    assert client.get("/preview/fixtures").get_json() == {"fixtures": []}
    assert client.get(f"/preview/fixtures/{SANDBOX_CASE}").status_code == 404
    assert "no fixtures directory" in client.get("/preview").get_data(as_text=True)


def test_server_rendered_text_is_escaped(tmp_path: Path) -> None:
    cards = copy_cards(tmp_path)
    case = cards.parent / "fixtures" / "patient-view" / "hostile"
    case.mkdir(parents=True)
    (case / "request.json").write_text(json.dumps(fixture_request()))
    (case / "expected.json").write_text(json.dumps({"description": HOSTILE, "today": "2026-11-24"}))
    html = make_client(tmp_path, cards_dir=cards).get("/preview").get_data(as_text=True)
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert HOSTILE not in html
    assert "<img" not in html


# ---------------------------------------------------------------- explain


def test_explain_a_fixture_request_matches_its_golden(client) -> None:
    response = explain(client, request=fixture_request(), profile="seed")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    report = response.get_json()
    expected = json.loads((FIXTURES / SANDBOX_CASE / "expected.json").read_text(encoding="utf-8"))
    assert report["response"] == expected["response"]
    assert report["facts"]["vitd"]["source"] == "Observation/d3k2-vitd-1"
    verdicts = {r["rule"]: r["verdict"] for r in report["rules"]}
    assert verdicts["kidney-advanced"] == "fired"
    # Kidney disease and sarcoidosis keep K2 off: warfarin alone gives no warfarin/K2 card (CLINICAL.md 6a).
    assert verdicts["vka-k2"] == "silent"
    assert verdicts["vitd-deficient"] == "silent"


def test_explain_with_overrides(client) -> None:
    report = explain(
        client, request=fixture_request(), overrides=["warfarin=off", "egfr=75", "vitd=20nmol/L"]
    ).get_json()
    assert "vka-k2" not in topics(report)
    assert "kidney-advanced" not in topics(report)
    assert [o["override"] for o in report["overrides"]] == ["warfarin=off", "egfr=75", "vitd=20nmol/L"]
    assert report["overrides"][0]["removed"] == ["MedicationStatement/d3k2-warfarin-1"]
    assert report["facts"]["vitd"]["source"] == "Observation/whatif-vitd"
    assert report["facts"]["egfr"]["source"] == "Observation/whatif-egfr"


def test_explain_a_bundle_with_hook_patient_and_today(client) -> None:
    sent = bundle(vitd(18))
    report = explain(client, bundle=sent, hook="patient-view", patient="pv-1", today="2026-11-24").get_json()
    assert report["service"] == "d3k2-patient-view"
    assert report["patient"] == "pv-1"
    assert report["today"] == "2026-11-24"
    assert "vitd-deficient" in topics(report)
    again = explain(client, bundle=sent, hook="patient-view", today="2026-11-24").get_json()
    assert [c["uuid"] for c in again["cards"]] == [c["uuid"] for c in report["cards"]]

    what_if = explain(client, bundle=sent, overrides=["vitd=50ng/mL", "pregnant=yes"]).get_json()
    assert "vitd-deficient" not in topics(what_if)
    assert "pregnancy-d3" in topics(what_if)


def test_explain_today_defaults_to_today_utc(client) -> None:
    before = datetime.now(UTC).date().isoformat()
    response = client.post("/preview/explain", json={"bundle": bundle(vitd(18))})
    after = datetime.now(UTC).date().isoformat()
    assert response.status_code == 200
    assert response.get_json()["today"] in {before, after}  # a call across midnight UTC may see either


def test_explain_returns_fhir_text_as_json_not_html(client) -> None:
    sarcoidosis = {
        "resourceType": "Condition",
        "id": "pv-sarcoid",
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "31541009"}], "text": HOSTILE},
        "subject": {"reference": "Patient/pv-1"},
    }
    response = explain(client, bundle=bundle(vitd(18), sarcoidosis))
    assert response.mimetype == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    report = response.get_json()
    assert report["facts"]["conditions"]["sarcoidosis"][0]["text"] == HOSTILE
    detail = next(
        c["detail"] for c in report["response"]["cards"] if c["source"]["topic"]["code"] == "granulomatous"
    )
    assert HOSTILE in detail


@pytest.mark.parametrize(
    ("body", "status", "error", "detail"),
    [
        ({"request": fixture_request(), "overrides": ["vitd=lots"]}, 400, "override-invalid", "vitd"),
        (
            {"request": fixture_request(), "overrides": ["warfarin=maybe"]},
            400,
            "override-invalid",
            "on or off",
        ),
        ({"request": fixture_request(), "overrides": "warfarin=off"}, 400, "bad-request", "list of strings"),
        ({"request": fixture_request(), "overrides": ["k2=on"] * 21}, 400, "bad-request", "at most 20"),
        ({"request": fixture_request(), "profile": "nope"}, 400, "bad-request", "unknown profile"),
        ({"request": fixture_request(), "today": "24.11.2026"}, 400, "bad-request", "YYYY-MM-DD"),
        ({"request": fixture_request(), "hook": "order-sign"}, 400, "bad-request", "was chosen"),
        ({"request": fixture_request(), "bundle": bundle()}, 400, "bad-request", "exactly one"),
        ({}, 400, "bad-request", "exactly one"),
        ({"bundle": bundle(), "hook": "chart-open"}, 400, "bad-request", "unknown hook"),
        ({"bundle": {"resourceType": "Patient"}}, 400, "bad-request", "not a FHIR Bundle"),
        ({"request": {"hook": "chart-open"}}, 400, "bad-request", "not served"),
        ({"request": ["not", "an", "object"]}, 400, "bad-request", "CDS Hooks request"),
    ],
)
def test_explain_refuses_bad_input(
    client, body: dict[str, Any], status: int, error: str, detail: str
) -> None:
    response = explain(client, **body)
    assert response.status_code == status
    assert response.get_json()["error"] == error
    assert detail in response.get_json()["detail"]


def test_explain_needs_a_json_object(client) -> None:
    assert client.post("/preview/explain", data="{}", content_type="text/plain").status_code == 415
    assert client.post("/preview/explain", data="{", content_type="application/json").status_code == 400
    assert client.post("/preview/explain", data="[]", content_type="application/json").status_code == 400


def test_explain_body_limit(tmp_path: Path) -> None:
    client = make_client(tmp_path, max_body_bytes=2000)
    big = bundle(*(vitd(18, f"v{i}") for i in range(20)))
    response = client.post(
        "/preview/explain", data=json.dumps({"bundle": big}), content_type="application/json"
    )
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload-too-large"


def test_what_is_sent_is_never_logged(client, caplog: pytest.LogCaptureFixture) -> None:
    secret_id, secret_name, secret_value = "zq-secret-4471", "Quillfeather", 17.531
    sent = bundle(vitd(secret_value))
    sent["entry"][0]["resource"].update(id=secret_id, name=[{"family": secret_name}])
    sent["entry"][1]["resource"]["subject"] = {"reference": f"Patient/{secret_id}"}
    caplog.set_level(logging.DEBUG)
    response = explain(client, bundle=sent, patient=secret_id, overrides=["egfr=42.123"])
    assert response.status_code == 200
    assert secret_id in response.get_data(as_text=True)
    bad = explain(client, bundle=sent, patient=secret_id, overrides=["vitd=99.871 furlongs"])
    assert bad.status_code == 400
    assert caplog.records, "the request line is logged"
    formatter = JsonFormatter()
    logged = "\n".join(
        [
            caplog.text,
            *(formatter.format(r) for r in caplog.records),
            *(str(r.__dict__) for r in caplog.records),
        ]
    )
    for secret in (secret_id, secret_name, str(secret_value), "42.123", "99.871", "<script>"):
        assert secret not in logged, secret
