"""The OpenAPI 3.1 document at /openapi.json is kept true: every golden response and a live response for
every status the edge answers validate against it (JSON Schema 2020-12, the OpenAPI 3.1 dialect)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from builders import CARDS, TODAY, fixtures, ruleset, sandbox_request
from d3k2.config import Settings
from d3k2.http.app import create_app
from d3k2.http.openapi import ERRORS, build_openapi
from d3k2.store.feedback import FeedbackStore
from jwt_keys import ISSUER, es384, jwks

DOC_URI = "urn:d3k2:openapi"
HEADERS = {"X-D3K2-Today": TODAY.isoformat()}
LIVE_STATUSES: set[tuple[str, str, int]] = set()


def document() -> dict[str, Any]:
    return build_openapi(ruleset())


def _rebase(schema: Any) -> Any:
    """Local refs (#/components/...) point into the document, whose URI is DOC_URI."""
    if isinstance(schema, dict):
        return {
            k: (f"{DOC_URI}{v}" if k == "$ref" and v.startswith("#") else _rebase(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_rebase(v) for v in schema]
    return schema


def _validate(schema: dict[str, Any], instance: Any, doc: dict[str, Any]) -> None:
    rebased = _rebase(schema)
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    checker = Draft202012Validator(rebased, registry=registry, format_checker=FormatChecker())
    errors = sorted(checker.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The documented operation for a concrete path: a literal path before a templated one (OAS 3.1)."""
    paths = doc["paths"]
    if path in paths:
        return paths[path][method]
    for template, item in paths.items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if "{" in template and re.match(pattern, path):
            return item[method]
    raise AssertionError(f"{method.upper()} {path} is not documented")


def check_response(doc: dict[str, Any], method: str, path: str, response: Any) -> None:
    """The status is documented for the operation and the body matches its schema."""
    op = operation(doc, method, path)
    status = str(response.status_code)
    assert status in op["responses"], f"{method.upper()} {path} answered undocumented {status}"
    content = op["responses"][status]["content"]
    media = response.mimetype
    assert media in content, f"{method.upper()} {path} {status} answered {media}"
    _validate(content[media]["schema"], response.get_json(), doc)
    LIVE_STATUSES.add((method, path, response.status_code))


def trust(tmp_path) -> Any:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps({"issuers": {ISSUER: {"jwks": jwks(es384())}}}))
    return path


def settings(tmp_path, **changes: Any) -> Settings:
    return replace(Settings(env="test", cards_dir=CARDS, data_dir=tmp_path, auth="off"), **changes)


@pytest.fixture
def client(tmp_path):
    with create_app(settings(tmp_path), ruleset()).test_client() as c:
        yield c


def post(client, path: str, body: Any, **kwargs: Any):
    data = body if isinstance(body, str) else json.dumps(body)
    kwargs.setdefault("content_type", "application/json")
    return client.post(path, data=data, headers={**HEADERS, **kwargs.pop("headers", {})}, **kwargs)


def sandbox(name: str) -> dict[str, Any]:
    return sandbox_request(name)


# ---------------------------------------------------------------- the document itself


def test_document_is_served_without_auth_and_matches_the_rule_set(tmp_path) -> None:
    app = create_app(settings(tmp_path, auth="required", trust_file=trust(tmp_path)), ruleset())
    with app.test_client() as c:
        response = c.get("/openapi.json")
        assert c.get("/cds-services").status_code == 401, "the API itself stays protected"
    assert response.status_code == 200
    assert response.get_json() == document()


def test_document_is_openapi_3_1_with_valid_2020_12_schemas() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"]), "every $ref resolves"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"], f"{method} {path}"
            for status, response in op["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d", status)
                for media in response["content"].values():
                    Draft202012Validator.check_schema(media["schema"])


def test_every_service_has_its_own_path_with_its_hook() -> None:
    doc = document()
    for service in ruleset().services.values():
        op = doc["paths"][f"/cds-services/{service.id}"]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["properties"]["hook"] == {"const": service.hook}
        assert set(schema["properties"]["prefetch"]["properties"]) == set(service.prefetch)


def test_documented_examples_validate_and_answer_200(client) -> None:
    doc = document()
    for path, item in doc["paths"].items():
        op = item.get("post")
        if op is None or "example" not in op["requestBody"]["content"]["application/json"]:
            continue
        media = op["requestBody"]["content"]["application/json"]
        _validate(media["schema"], media["example"], doc)
        concrete = path.replace("{service_id}", "d3k2-patient-view")
        response = post(client, concrete, media["example"])
        assert response.status_code == 200, (path, response.get_json())
        check_response(doc, "post", concrete, response)


# ---------------------------------------------------------------- golden responses


GOLDEN = fixtures()


@pytest.mark.parametrize("fixture", GOLDEN, ids=[f.id for f in GOLDEN])
def test_golden_response_matches_the_document(fixture) -> None:
    doc = document()
    path = f"/cds-services/{fixture.expected['service']}"
    op = operation(doc, "post", path)
    status = str(fixture.expected.get("status", 200))
    assert status in op["responses"]
    if status == "200":
        _validate(op["requestBody"]["content"]["application/json"]["schema"], fixture.request, doc)
    _validate(
        op["responses"][status]["content"]["application/json"]["schema"], fixture.expected["response"], doc
    )


# ---------------------------------------------------------------- live responses, one per status


def test_discovery_health_readiness_and_document_match(client) -> None:
    doc = document()
    for path in ("/cds-services", "/healthz", "/readyz", "/openapi.json"):
        response = client.get(path)
        assert response.status_code == 200, path
        check_response(doc, "get", path, response)


@pytest.mark.parametrize(
    ("service", "request_file"),
    [
        ("d3k2-patient-view", "patient-view.request.json"),
        ("d3k2-order-select", "order-select.request.json"),
        ("d3k2-order-sign", "order-sign.request.json"),
    ],
)
def test_sandbox_calls_match(tmp_path, service, request_file) -> None:
    # No fhirServer: the recorded requests' missing keys would otherwise be fetched (and time out).
    body = sandbox(request_file)
    body.pop("fhirServer", None)
    for key in ruleset().services[service].prefetch:
        body.setdefault("prefetch", {}).setdefault(key, None)
    with create_app(settings(tmp_path), ruleset()).test_client() as c:
        response = post(c, f"/cds-services/{service}", body)
    assert response.status_code == 200
    check_response(document(), "post", f"/cds-services/{service}", response)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        (
            '{"hook": "order-sign", "hookInstance": "x", "context": {"patientId": "p"}}',
            "application/json",
            400,
        ),
        ("[" * 100 + "]" * 100, "application/json", 400),
        ("{}", "text/plain", 415),
        (
            '{"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p"}}',
            "application/json",
            412,
        ),
    ],
)
def test_error_statuses_of_a_service_call_match(client, body, content_type, status) -> None:
    response = post(client, "/cds-services/d3k2-patient-view", body, content_type=content_type)
    assert response.status_code == status
    check_response(document(), "post", "/cds-services/d3k2-patient-view", response)


def test_unknown_service_404_matches(client) -> None:
    doc = document()
    for path in ("/cds-services/nope", "/cds-services/nope/feedback"):
        response = post(client, path, {"feedback": [{"card": "c", "outcome": "accepted"}]})
        assert response.status_code == 404
        check_response(doc, "post", path, response)


def test_unknown_path_and_wrong_method_are_error_bodies(client) -> None:
    doc = document()
    for response, status in (
        (client.get("/nowhere"), 404),
        (client.get("/cds-services/d3k2-patient-view"), 405),
    ):
        assert response.status_code == status
        _validate(doc["components"]["schemas"]["Error"], response.get_json(), doc)
        LIVE_STATUSES.add(("get", "(any)", status))


def test_413_matches(tmp_path) -> None:
    with create_app(settings(tmp_path, max_body_bytes=500), ruleset()).test_client() as c:
        response = post(c, "/cds-services/d3k2-patient-view", sandbox("patient-view.request.json"))
    assert response.status_code == 413
    check_response(document(), "post", "/cds-services/d3k2-patient-view", response)


def test_403_fhir_server_off_the_allow_list_matches(tmp_path) -> None:
    with create_app(settings(tmp_path, fhir_allowed=()), ruleset()).test_client() as c:
        response = post(c, "/cds-services/d3k2-patient-view", sandbox("patient-view.request.json"))
    assert response.status_code == 403
    check_response(document(), "post", "/cds-services/d3k2-patient-view", response)


def test_401_matches_with_auth_required(tmp_path) -> None:
    app = create_app(settings(tmp_path, auth="required", trust_file=trust(tmp_path)), ruleset())
    doc = document()
    with app.test_client() as c:
        missing = c.get("/cds-services")
        token = es384().sign(aud="https://elsewhere.test/cds-services")
        wrong_audience = c.get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    for response in (missing, wrong_audience):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        check_response(doc, "get", "/cds-services", response)


def test_feedback_200_400_415_and_503_match(tmp_path, client) -> None:
    doc = document()
    path = "/cds-services/d3k2-patient-view/feedback"
    ok = post(client, path, sandbox("feedback-accepted.request.json"))
    bad = post(client, path, {"feedback": []})
    media = post(client, path, "{}", content_type="text/plain")
    for response, status in ((ok, 200), (bad, 400), (media, 415)):
        assert response.status_code == status
        check_response(doc, "post", path, response)
    down = FeedbackStore("postgresql://d3k2:x@127.0.0.1:1/d3k2")
    with create_app(settings(tmp_path), ruleset(), store=down).test_client() as c:
        response = post(c, path, sandbox("feedback-accepted.request.json"))
        ready = c.get("/readyz")
    assert response.status_code == 503
    check_response(doc, "post", path, response)
    assert ready.status_code == 503
    check_response(doc, "get", "/readyz", ready)


def test_every_documented_error_status_was_seen_live(request) -> None:
    """Runs last in this module: the tests above must have produced every error status documented."""
    if request.config.option.keyword or any("::" in arg for arg in request.config.args):
        pytest.skip("needs every test of this module to have run")
    seen = {status for _m, _p, status in LIVE_STATUSES}
    assert {int(s) for s in ERRORS} <= seen, f"documented but never produced: {set(map(int, ERRORS)) - seen}"
