"""Bounds at the HTTP edge (body size, JSON depth, prefetch entries, fhirServer allow-list) and security
headers: every refusal is a 4xx with a JSON body, never a 5xx."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import assert_no_connection
from d3k2.config import Settings
from d3k2.core.limits import bracket_skeleton, json_too_deep, nests_deeper, prefetch_entries
from d3k2.core.loader import load_ruleset
from d3k2.core.ruleset import RuleSet
from d3k2.http.app import create_app

TODAY = {"X-D3K2-Today": "2026-11-24"}


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_ruleset(Settings().cards_dir)


def make_app(ruleset: RuleSet, tmp_path: Path, **changes: Any) -> Flask:
    settings = Settings(env="test", auth="off", data_dir=tmp_path, **changes)
    return create_app(settings, ruleset)


@pytest.fixture
def client(ruleset: RuleSet, tmp_path: Path) -> FlaskClient:
    return make_app(ruleset, tmp_path).test_client()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def feedback(extra: Any) -> dict[str, Any]:
    return {"feedback": [{"card": "c1", "outcome": "overridden", "extra": extra}]}


def patient_view(prefetch: dict[str, Any] | None, fhir_server: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": "9d5c2b0e-limits",
        "context": {"patientId": "lim-p1", "userId": "Practitioner/lim-u1"},
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {"access_token": "limits-secret-token", "token_type": "Bearer"}
    return body


def assert_json_error(response: Any, status: int, error: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/json"
    assert response.json["error"] == error
    assert response.json["detail"]


# ---------------------------------------------------------------- JSON nesting depth


@pytest.mark.parametrize(
    ("text", "limit", "too_deep"),
    [
        (b"[[1]]", 2, False),
        (b"[[[1]]]", 2, True),
        (b'{"a":{"b":[]}}', 3, False),
        (b'{"a":{"b":[{}]}}', 3, True),
        (b'["[[[[[[", "{{{{"]', 1, False),
        (b'["\\"[[[[", 1]', 1, False),
        (b'["\\\\", [[1]]]', 2, True),
        (b'"[[[[[[[["', 0, False),
        (b"", 0, False),
    ],
)
def test_json_too_deep_ignores_brackets_in_strings(text: bytes, limit: int, too_deep: bool) -> None:
    assert json_too_deep(text, limit) is too_deep


def _reference_too_deep(raw: bytes, limit: int) -> bool:
    """The plain definition: walk the text, skip strings with their escapes, count open brackets."""
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif byte in b"]}":
            depth -= 1
    return False


_JSON_TEXT = st.recursive(
    st.none() | st.integers(-5, 5) | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(value=_JSON_TEXT, limit=st.integers(min_value=0, max_value=12))
def test_json_too_deep_agrees_with_the_plain_definition_on_json(value: Any, limit: int) -> None:
    raw = orjson.dumps(value)
    assert json_too_deep(raw, limit) is _reference_too_deep(raw, limit)


_TEXT = st.binary(max_size=60) | st.text(alphabet='[]{}"\\\\a', max_size=60).map(str.encode)


@settings(max_examples=600, derandomize=True, deadline=None)
@given(raw=_TEXT, limit=st.integers(0, 8))
def test_json_too_deep_shortcut_never_changes_the_answer(raw: bytes, limit: int) -> None:
    """On any bytes at all, valid JSON or not, the pass-count shortcut agrees with the exact count."""
    assert json_too_deep(raw, limit) is nests_deeper(bracket_skeleton(raw), limit)


def test_depth_at_the_limit_is_parsed(client: FlaskClient) -> None:
    response = client.post("/cds-services/d3k2-patient-view/feedback", json=feedback(nested(61)))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps(feedback(nested(62))),
        b"[" * 1100 + b"]" * 1100,  # past orjson's own recursion limit
        b"[" * 100_000,  # and never closed
    ],
    ids=["65", "1100", "100000-unclosed"],
)
def test_deeper_json_is_400(client: FlaskClient, body: bytes) -> None:
    response = client.post(
        "/cds-services/d3k2-patient-view/feedback", data=body, content_type="application/json"
    )
    assert_json_error(response, 400, "bad-request")
    assert "deeper than 64 levels" in response.json["detail"]


def test_depth_limit_is_configurable(ruleset: RuleSet, tmp_path: Path) -> None:
    client = make_app(ruleset, tmp_path, max_json_depth=5).test_client()
    response = client.post("/cds-services/d3k2-patient-view/feedback", json=feedback(nested(3)))
    assert_json_error(response, 400, "bad-request")


# ---------------------------------------------------------------- prefetch entries and body size


def test_prefetch_entries_counts_bundle_entries() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{}, {}, {}]}
    payload = {"prefetch": {"a": bundle, "b": {"resourceType": "Patient"}, "c": None, "d": "x"}}
    assert prefetch_entries(payload) == 4
    assert prefetch_entries({"prefetch": []}) == 0
    assert prefetch_entries([]) == 0


def test_too_many_prefetch_entries_is_413(ruleset: RuleSet, tmp_path: Path) -> None:
    client = make_app(ruleset, tmp_path, max_prefetch_entries=20).test_client()
    observation = {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}}
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [observation] * 21}
    response = client.post("/cds-services/d3k2-patient-view", json=patient_view({"vitd": bundle}))
    assert_json_error(response, 413, "payload-too-large")
    assert "at most 20" in response.json["detail"]


def test_body_over_the_limit_is_413(ruleset: RuleSet, tmp_path: Path) -> None:
    client = make_app(ruleset, tmp_path, max_body_bytes=1000).test_client()
    body = orjson.dumps(feedback("x" * 2000))
    response = client.post(
        "/cds-services/d3k2-patient-view/feedback", data=body, content_type="application/json"
    )
    assert_json_error(response, 413, "payload-too-large")


def test_chunked_body_over_the_limit_is_413(ruleset: RuleSet, tmp_path: Path) -> None:
    client = make_app(ruleset, tmp_path, max_body_bytes=1000).test_client()
    response = client.post(
        "/cds-services/d3k2-patient-view/feedback",
        input_stream=io.BytesIO(orjson.dumps(feedback("x" * 2000))),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        # What gunicorn and Werkzeug's server set for a chunked body: no Content-Length to check up front.
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_json_error(response, 413, "payload-too-large")


# ---------------------------------------------------------------- fhirServer allow-list at the edge


def test_fhir_server_off_the_allow_list_is_refused_and_never_contacted(
    ruleset: RuleSet, tmp_path: Path, listener: socket.socket
) -> None:
    client = make_app(ruleset, tmp_path, fhir_allowed=("https://*.example.org:443",)).test_client()
    fhir_server = f"http://127.0.0.1:{listener.getsockname()[1]}/fhir"
    response = client.post(
        "/cds-services/d3k2-patient-view", json=patient_view(None, fhir_server), headers=TODAY
    )
    assert_json_error(response, 403, "fhir-server-not-allowed")
    assert "limits-secret-token" not in response.get_data(as_text=True)
    assert_no_connection(listener)


# ---------------------------------------------------------------- security headers


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/cds-services", None),
        ("post", "/cds-services/d3k2-patient-view", patient_view({})),
        ("post", "/cds-services/d3k2-patient-view", {"not": "a hook call"}),
        ("get", "/healthz", None),
        ("get", "/no-such-path", None),
    ],
)
def test_security_headers_on_every_response(
    client: FlaskClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = getattr(client, method)(path, json=body, headers=TODAY)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"


def test_card_response_is_not_cached(client: FlaskClient) -> None:
    prefetch = dict.fromkeys(("patient", "vitd", "egfr", "calcium", "pregnancy"))
    prefetch |= dict.fromkeys(("medstatements", "medrequests", "conditions"))
    response = client.post("/cds-services/d3k2-patient-view", json=patient_view(prefetch), headers=TODAY)
    assert response.status_code == 200, response.json
    assert "cards" in response.json
    assert response.headers["Cache-Control"] == "no-store"
