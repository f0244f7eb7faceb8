"""Issue 24 (hardening after the pre-launch attack), in process: the audience is never taken from a
client's Host header in production, production fetches from no FHIR server until told which, bad input
that gave 500 is a 4xx, non-finite JWT times are refused, 405 says what is allowed, feedback is bounded.

What needs a real gunicorn (forwarded headers, SCRIPT_NAME, chunked bodies, slow clients) is in
tests/integration/test_edge.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from builders import CARDS, HEADERS, SERVICE, close, hook_request, make_app, post, refused_url, ruleset
from d3k2.config import ConfigError, Settings, from_env
from d3k2.core.hooks import MAX_FEEDBACK_ITEMS, MAX_ID_LENGTH, MAX_TEXT_LENGTH, parse_feedback
from d3k2.http.app import create_app
from jwt_keys import BASE_URL, NOW, es384, write_trust

FEEDBACK = f"/cds-services/{SERVICE}/feedback"


@pytest.fixture
def client(tmp_path: Path):
    app = make_app(tmp_path)
    with app.test_client() as c:
        yield c
    close(app)


def error_of(response: Any) -> str:
    body = response.get_json()
    assert set(body) >= {"error", "detail"}, body
    return str(body["error"])


# ---------------------------------------------------------------- 1. audience from the Host header


def test_production_refuses_to_start_without_a_public_base_url() -> None:
    with pytest.raises(ConfigError, match="D3K2_PUBLIC_BASE_URL") as raised:
        from_env({"D3K2_ENV": "production"})
    assert "D3K2_TRUST_HOST_HEADER=1" in str(raised.value)
    with pytest.raises(ConfigError, match="D3K2_PUBLIC_BASE_URL"):
        create_app(Settings(env="production", cards_dir=CARDS, auth="off"), ruleset())


def test_production_starts_with_a_public_base_url_or_the_explicit_opt_out() -> None:
    named = from_env({"D3K2_ENV": "production", "D3K2_PUBLIC_BASE_URL": "https://cds.example.org/"})
    assert named.public_base_url == "https://cds.example.org"
    assert from_env({"D3K2_ENV": "production", "D3K2_TRUST_HOST_HEADER": "1"}).trust_host_header
    assert not from_env({"D3K2_TRUST_HOST_HEADER": "0"}).trust_host_header
    with pytest.raises(ConfigError, match="D3K2_TRUST_HOST_HEADER must be 0 or 1"):
        from_env({"D3K2_TRUST_HOST_HEADER": "yes"})


def trusting_app(tmp_path: Path, **changes: Any):
    trust = tmp_path / "trust.json"
    write_trust(trust)
    settings = Settings(
        env="test",
        cards_dir=CARDS,
        data_dir=tmp_path,
        auth="required",
        trust_file=trust,
        **({"jti_db": tmp_path / "jti.sqlite3"} | changes),
    )
    app = create_app(settings, ruleset())
    app.extensions["d3k2.http.auth"].clock = lambda: NOW
    return app


def test_a_token_minted_for_the_host_header_is_refused_when_the_base_url_is_configured(
    tmp_path: Path,
) -> None:
    app = trusting_app(tmp_path, public_base_url=BASE_URL)
    evil = es384().sign(aud="http://evil.example/cds-services")
    headers = {"Authorization": f"Bearer {evil}", "X-Forwarded-Proto": "https"}
    response = app.test_client().get("/cds-services", base_url="http://evil.example", headers=headers)
    assert response.status_code == 401
    assert BASE_URL in response.get_json()["detail"]


def test_a_jti_store_that_cannot_be_written_refuses_with_503_not_500(tmp_path: Path) -> None:
    """A data directory that is not writable (here: a file where the directory should be) gave 500 and a
    'bug' in the log; the call is refused as 503, retryable, with a JSON body, and no token goes through
    unchecked for replay."""
    (tmp_path / "not-a-dir").write_text("")
    app = trusting_app(tmp_path, public_base_url=BASE_URL, jti_db=tmp_path / "not-a-dir" / "jti.sqlite3")
    token = es384().sign()
    response = app.test_client().get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json()["error"] == "replay-store-unavailable"
    close(app)


# ---------------------------------------------------------------- 5. 5xx on bad input → 4xx


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize(
    "number", [math.nan, math.inf, -math.inf, 10**400], ids=["nan", "inf", "-inf", "1e400"]
)
def test_non_finite_time_claims_are_refused(tmp_path: Path, claim: str, number: float) -> None:
    """exp NaN gave 500 (the jti store cannot keep NaN); iat NaN with a 30-day exp passed every time
    check, defeating the one-hour cap."""
    app = trusting_app(tmp_path, public_base_url=BASE_URL)
    changes: dict[str, Any] = {claim: number}
    if claim == "iat":
        changes["exp"] = NOW + 30 * 86400
    token = es384().sign(**changes)
    response = app.test_client().get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, response.get_data(as_text=True)
    assert f"claim {claim} must be a finite number" in response.get_json()["detail"]


@pytest.mark.parametrize("token", ["tökén", "abc€def", "a b", "abc\n"])
def test_an_access_token_that_is_no_bearer_token_is_400(client: FlaskClient, token: str) -> None:
    """A non-Latin-1 character cannot go into the Authorization header sent to the FHIR server (500)."""
    request = {**hook_request(), "fhirServer": refused_url(), "prefetch": {}}
    request["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "subject": "x"}
    response = post(client, f"/cds-services/{SERVICE}", request)
    assert response.status_code == 400
    assert error_of(response) == "bad-request"
    assert "fhirAuthorization.access_token" in response.get_json()["detail"]
    assert token not in response.get_data(as_text=True)


def test_a_jwt_like_access_token_is_accepted(client: FlaskClient) -> None:
    request = {**hook_request(), "fhirServer": refused_url()}
    request["fhirAuthorization"] = {"access_token": "eyJhbGciOi.eyJzdWIi-_x.sig+/==", "token_type": "Bearer"}
    assert post(client, f"/cds-services/{SERVICE}", request).status_code == 200


@pytest.mark.parametrize(
    "stamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00.5+00:01"]
)
def test_an_outcome_timestamp_outside_the_years_1_to_9999_in_utc_is_400(
    client: FlaskClient, stamp: str
) -> None:
    item = {"card": "c1", "outcome": "accepted", "outcomeTimestamp": stamp}
    response = post(client, FEEDBACK, {"feedback": [item]})
    assert response.status_code == 400
    assert "between the years 1 and 9999" in response.get_json()["detail"]


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00", "0001-01-01T00:00:00+00:00", "yesterday", ""])
def test_other_outcome_timestamps_are_kept(client: FlaskClient, stamp: str) -> None:
    item = {"card": "c1", "outcome": "accepted", "outcomeTimestamp": stamp}
    assert post(client, FEEDBACK, {"feedback": [item]}).status_code == 200


# ---------------------------------------------------------------- 6. production's FHIR allow-list


def test_production_fetches_from_no_fhir_server_unless_told() -> None:
    opted_out = {"D3K2_ENV": "production", "D3K2_TRUST_HOST_HEADER": "1"}
    assert from_env(opted_out).fhir_allowed == ()
    named = {**opted_out, "D3K2_FHIR_ALLOWED": "https://*.ehr.example.org:443"}
    assert from_env(named).fhir_allowed == ("https://*.ehr.example.org:443",)
    assert "http://127.0.0.1:*" in from_env({}).fhir_allowed
    assert "http://127.0.0.1:*" in from_env({"D3K2_ENV": "test"}).fhir_allowed


def test_production_refuses_a_loopback_fhir_server(tmp_path: Path) -> None:
    env = {
        "D3K2_ENV": "production",
        "D3K2_TRUST_HOST_HEADER": "1",
        "D3K2_AUTH": "off",
        "D3K2_DATA_DIR": str(tmp_path),
        "D3K2_CARDS_DIR": str(CARDS),
    }
    app = create_app(from_env(env), ruleset())
    request = {**hook_request(), "fhirServer": refused_url(), "prefetch": {}}
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=request)
    assert response.status_code == 403
    app.extensions["d3k2.store"].close()


# ---------------------------------------------------------------- 9. 405, feedback bounds


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/cds-services", {"GET", "HEAD", "OPTIONS"}),
        ("GET", FEEDBACK, {"POST", "OPTIONS"}),
        ("PUT", f"/cds-services/{SERVICE}", {"POST", "OPTIONS"}),
        ("POST", "/healthz", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_405_names_the_allowed_methods(
    client: FlaskClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.open(path, method=method, headers=HEADERS)
    assert response.status_code == 405
    assert {part.strip() for part in response.headers["Allow"].split(",")} == allowed
    assert error_of(response) == "method-not-allowed"


def test_too_many_feedback_items_is_413(client: FlaskClient) -> None:
    items = [{"card": f"c{i}", "outcome": "accepted"} for i in range(MAX_FEEDBACK_ITEMS + 1)]
    response = post(client, FEEDBACK, {"feedback": items})
    assert response.status_code == 413
    assert error_of(response) == "payload-too-large"
    assert post(client, FEEDBACK, {"feedback": items[:MAX_FEEDBACK_ITEMS]}).status_code == 200


@pytest.mark.parametrize(
    "item",
    [
        {"card": "c" * (MAX_ID_LENGTH + 1), "outcome": "accepted"},
        {"card": "c1", "outcome": "accepted", "acceptedSuggestions": [{"id": "s" * (MAX_ID_LENGTH + 1)}]},
        {"card": "c1", "outcome": "accepted", "acceptedSuggestions": [f"s{i}" for i in range(21)]},
        {
            "card": "c1",
            "outcome": "overridden",
            "overrideReason": {"userComment": "x" * (MAX_TEXT_LENGTH + 1)},
        },
        {"card": "c1", "outcome": "overridden", "overrideReason": {"reason": {"code": "r" * 257}}},
        {"card": "c1", "outcome": "overridden", "overrideReason": {"reason": {"system": "s" * 257}}},
        {"card": "c1", "outcome": "overridden", "overrideReason": {"reason": {"display": "d" * 4001}}},
    ],
    ids=["card", "suggestion-id", "suggestions", "comment", "code", "system", "display"],
)
def test_oversized_feedback_text_is_400(client: FlaskClient, item: dict[str, Any]) -> None:
    response = post(client, FEEDBACK, {"feedback": [item]})
    assert response.status_code == 400
    assert error_of(response) == "bad-request"
    assert response.get_json()["detail"].startswith("invalid feedback")


def test_feedback_text_at_the_caps_is_stored(client: FlaskClient) -> None:
    item = {
        "card": "c" * MAX_ID_LENGTH,
        "outcome": "overridden",
        "overrideReason": {"reason": {"code": "r"}, "userComment": "x" * MAX_TEXT_LENGTH},
    }
    assert post(client, FEEDBACK, {"feedback": [item]}).status_code == 200


def test_the_item_cap_applies_before_validation() -> None:
    from d3k2.core.errors import PayloadTooLarge

    with pytest.raises(PayloadTooLarge):
        parse_feedback({"feedback": [None] * (MAX_FEEDBACK_ITEMS + 1)})
